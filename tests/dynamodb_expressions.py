"""DynamoDB's update and condition expressions on items of attribute values, for the fake table of
tests/fake_ec2.py: exactly the grammar the ledger (aws/ledger.py) and the run records (aws/runs.py)
write, with DynamoDB's semantics for it.

Update: `SET path = :value, ...`, `REMOVE path, ...`, `ADD path :value, ...` (a number added, a set
joined), in any order; a path is names and #names joined by dots (map members; no list indexes), and a
SET into a map that is not there is DynamoDB's ValidationException. Condition: `attribute_exists(path)`,
`attribute_not_exists(path)`, `contains(path, :value)`, `path = :value`, `<>`, `<`, `<=`, `>`, `>=`,
NOT, AND, OR (in that precedence) and parentheses. Anything else raises ExpressionError, so a new
expression fails here until the fake knows it.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

Item = dict[str, Any]  # attribute name -> attribute value ({"S": ...}, {"N": ...}, {"M": {...}}...)

_TOKEN = re.compile(r"\s*(<>|<=|>=|[=<>(),.]|#\w+|:\w+|[A-Za-z_]\w*)")


class ExpressionError(ValueError):
    """An expression the fake does not know (or DynamoDB would refuse)."""


class InvalidPath(ValueError):
    """A SET into a map that is not there: DynamoDB's "document path ... invalid for update"."""


def _tokens(expression: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    while position < len(expression.rstrip()):
        match = _TOKEN.match(expression, position)
        if match is None:
            raise ExpressionError(f"cannot read {expression[position:]!r}")
        tokens.append(match.group(1))
        position = match.end()
    return tokens


class _Reader:
    def __init__(self, expression: str, names: Mapping[str, str], values: Mapping[str, Any]) -> None:
        self.tokens = _tokens(expression)
        self.at = 0
        self.names = names
        self.values = values
        self.used: set[str] = set()

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token.upper() != expected):
            raise ExpressionError(f"expected {expected or 'more'} at {token!r}")
        self.at += 1
        return token

    def path(self) -> list[str]:
        parts = [self._name(self.take())]
        while self.peek() == ".":
            self.take(".")
            parts.append(self._name(self.take()))
        return parts

    def _name(self, token: str) -> str:
        if token.startswith("#"):
            if token not in self.names:
                raise ExpressionError(f"{token} is not in ExpressionAttributeNames")
            self.used.add(token)
            return self.names[token]
        if not re.fullmatch(r"[A-Za-z_]\w*", token):
            raise ExpressionError(f"{token!r} is no attribute name")
        return token

    def value(self) -> Any:
        token = self.take()
        if not token.startswith(":") or token not in self.values:
            raise ExpressionError(f"{token} is not in ExpressionAttributeValues")
        self.used.add(token)
        return self.values[token]


def _get(item: Item, path: list[str]) -> Any:
    value: Any = {"M": item}
    for part in path:
        members = value.get("M") if isinstance(value, dict) else None
        if members is None or part not in members:
            return None
        value = members[part]
    return value


def _parent(item: Item, path: list[str]) -> dict[str, Any]:
    members: Any = item
    for part in path[:-1]:
        value = members.get(part)
        if not isinstance(value, dict) or "M" not in value:
            raise InvalidPath("The document path provided in the update expression is invalid for update")
        members = value["M"]
    return members  # type: ignore[no-any-return]


def update(
    item: Item,
    expression: str,
    names: Mapping[str, str],
    values: Mapping[str, Any],
    used: set[str] | None = None,
    *,
    paths_checked: bool = True,
) -> Item:
    """The item after the update (a new one: `item` is left as it was); `used` is given the names and
    values the expression used (DynamoDB refuses a request with others). Not `paths_checked`: a path
    the item cannot take is passed over (DynamoDB checks the condition before the update's paths: a
    failed condition is answered as such, whatever the update would have met)."""
    new = copy.deepcopy(item)
    reader = _Reader(expression, names, values)
    while reader.peek() is not None:
        clause = reader.take().upper()
        while True:
            path = reader.path()
            with contextlib.suppress(*(() if paths_checked else (InvalidPath,))):
                if clause == "SET":
                    reader.take("=")
                    value = copy.deepcopy(reader.value())
                    _parent(new, path)[path[-1]] = value
                elif clause == "REMOVE":
                    with contextlib.suppress(InvalidPath):  # nothing there to remove
                        _parent(new, path).pop(path[-1], None)
                elif clause == "ADD":
                    value = reader.value()
                    _add(_parent(new, path), path[-1], value)
                elif clause == "DELETE":
                    value = reader.value()
                    _delete(_parent(new, path), path[-1], value)
                else:
                    raise ExpressionError(f"unknown clause {clause}")
            if reader.peek() != ",":
                break
            reader.take(",")
    if used is not None:
        used |= reader.used
    return new


def _add(members: dict[str, Any], name: str, value: Any) -> None:
    old = members.get(name)
    if "N" in value:
        total = Decimal(value["N"]) + (Decimal(old["N"]) if old is not None else 0)
        members[name] = {"N": str(total)}
    elif "SS" in value or "NS" in value:
        kind = "SS" if "SS" in value else "NS"
        if old is not None and kind not in old:
            raise ExpressionError(f"ADD of a {kind} to a {next(iter(old))}")
        members[name] = {kind: sorted({*(old or {}).get(kind, []), *value[kind]})}
    else:
        raise ExpressionError(f"ADD takes a number or a set, not {next(iter(value))}")


def _delete(members: dict[str, Any], name: str, value: Any) -> None:
    """DELETE of a set's members: those there are taken out; a set left empty is removed (DynamoDB keeps
    no empty set)."""
    kind = next(iter(value))
    if kind not in ("SS", "NS", "BS"):
        raise ExpressionError(f"DELETE takes a set, not {kind}")
    old = members.get(name)
    if old is None:
        return
    if kind not in old:
        raise ExpressionError(f"DELETE of a {kind} from a {next(iter(old))}")
    left = sorted(set(old[kind]) - set(value[kind]))
    if left:
        members[name] = {kind: left}
    else:
        del members[name]


def holds(
    item: Item,
    expression: str,
    names: Mapping[str, str],
    values: Mapping[str, Any],
    used: set[str] | None = None,
) -> bool:
    """Whether the condition holds on `item` ({} where there is none); `used` as for `update`."""
    reader = _Reader(expression, names, values)
    result = _or(reader, item)
    if reader.peek() is not None:
        raise ExpressionError(f"unexpected {reader.peek()!r}")
    if used is not None:
        used |= reader.used
    return result


def _or(reader: _Reader, item: Item) -> bool:
    result = _and(reader, item)
    while (reader.peek() or "").upper() == "OR":
        reader.take()
        right = _and(reader, item)
        result = result or right
    return result


def _and(reader: _Reader, item: Item) -> bool:
    result = _not(reader, item)
    while (reader.peek() or "").upper() == "AND":
        reader.take()
        right = _not(reader, item)
        result = result and right
    return result


def _not(reader: _Reader, item: Item) -> bool:
    if (reader.peek() or "").upper() == "NOT":
        reader.take()
        return not _not(reader, item)
    return _primary(reader, item)


_COMPARISONS = {
    "=": lambda a, b: a == b,
    "<>": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _primary(reader: _Reader, item: Item) -> bool:
    token = reader.peek()
    if token == "(":
        reader.take("(")
        result = _or(reader, item)
        reader.take(")")
        return result
    function = (token or "").lower()
    if function in ("attribute_exists", "attribute_not_exists", "contains") and reader.tokens[
        reader.at + 1 : reader.at + 2
    ] == ["("]:
        reader.take()
        reader.take("(")
        value = _get(item, reader.path())
        if function == "contains":
            reader.take(",")
            wanted = reader.value()
            reader.take(")")
            return _contains(value, wanted)
        reader.take(")")
        return (value is not None) == (function == "attribute_exists")
    left = _get(item, reader.path())
    operator = reader.take()
    if operator not in _COMPARISONS:
        raise ExpressionError(f"unknown comparison {operator!r}")
    right = reader.value()
    if left is None or next(iter(left)) != next(iter(right)) or next(iter(left)) not in ("S", "N"):
        return False  # a missing attribute or another type compares false
    kind = next(iter(left))
    a, b = (Decimal(left["N"]), Decimal(right["N"])) if kind == "N" else (left["S"], right["S"])
    return bool(_COMPARISONS[operator](a, b))


def _contains(value: Any, wanted: Any) -> bool:
    if value is None:
        return False
    if "SS" in value and "S" in wanted:
        return wanted["S"] in value["SS"]
    if "NS" in value and "N" in wanted:
        return Decimal(wanted["N"]) in {Decimal(n) for n in value["NS"]}
    if "S" in value and "S" in wanted:
        return wanted["S"] in value["S"]
    if "L" in value:
        return wanted in value["L"]
    return False
