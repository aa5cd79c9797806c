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


def describe_validation_error(
    error: ValidationError, *, separator: str = "; ", friendly: bool = False
) -> str:
    """Each problem once, as `path: message`. `friendly` rewords pydantic's messages (a policy file);
    without it they are pydantic's own (events, environment, queue messages)."""
    lines: list[str] = []
    for item in error.errors():
        line = f"{field_path(tuple(item['loc']))}: {_friendly(item) if friendly else _plain(item)}"
        if line not in lines:
            lines.append(line)
    return separator.join(lines)
