"""How a pydantic validation error is told: one `path: message` per problem. The one formatter of the
policy file, the handlers' events and environment, and the replication queue's messages."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

# The names pydantic puts in a location for the validator or union branch it tried: not keys.
_BRANCH_NAMES = frozenset(
    {"str", "int", "literal['all','default-and-latest']", "literal['all', 'default-and-latest']"}
)


def field_path(loc: tuple[int | str, ...]) -> str:
    """`families[1].match.name`: keys joined by dots, list indexes in brackets."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-after", "function-before")) or part in _BRANCH_NAMES:
            continue
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _plain(error: ErrorDetails) -> str:
    """pydantic's own message, without its `Value error, ` prefix on what a validator raised."""
    if error["type"] == "value_error":
        return str((error.get("ctx") or {}).get("error", error["msg"]))
    return error["msg"]


def _friendly(error: ErrorDetails) -> str:
    """The message reworded for a person editing a file."""
    kind = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}"
    if kind == "extra_forbidden":
        return "unknown key (check the spelling)"
    if kind == "missing":
        return "required"
    if kind == "value_error":
        return _plain(error)
    if kind == "too_short":
        return "must not be empty"
    msg = str(error["msg"])
    return msg[0].lower() + msg[1:] if msg else kind


# The problems named, at most: a document of many thousand bad values (another account's usage report)
# is named by its first ones and a count, in a message of bounded length, made in bounded time.
MAX_PROBLEMS_NAMED = 20


def describe_validation_error(
    error: ValidationError, *, separator: str = "; ", friendly: bool = False
) -> str:
    """Each problem once, as `path: message`, the first MAX_PROBLEMS_NAMED of them (then how many there
    are in all). `friendly` rewords pydantic's messages (a policy file); without it they are pydantic's
    own (events, environment, queue messages)."""
    lines: dict[str, None] = {}  # in order, each once
    for item in error.errors(include_url=False, include_input=False):
        line = f"{field_path(tuple(item['loc']))}: {_friendly(item) if friendly else _plain(item)}"
        lines.setdefault(line)
        if len(lines) > MAX_PROBLEMS_NAMED:
            named = separator.join(list(lines)[:MAX_PROBLEMS_NAMED])
            return f"{named}{separator}... ({error.error_count():,} problems in all)"
    return separator.join(lines)
