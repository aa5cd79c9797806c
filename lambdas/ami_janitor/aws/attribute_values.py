"""DynamoDB attribute values to and from Python, as boto3's TypeSerializer and TypeDeserializer make
them (numbers read as Decimal, string and number sets as sets, binary as bytes), for the ledger.

The functions make their clients with botocore alone: importing boto3 (its session, resources and
transfer modules) for these two conversions was about a twentieth of the cleanup function's cold
start. `tests/unit/test_attribute_values.py` checks both directions against boto3's."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Clamped, Context, Decimal, Inexact, Overflow, Rounded, Underflow
from typing import Any

# DynamoDB's numbers: 38 digits, exponents -130 to +125; anything it would round or clamp is refused.
DYNAMODB_CONTEXT = Context(
    Emin=-128, Emax=126, prec=38, traps=[Clamped, Overflow, Inexact, Rounded, Underflow]
)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | Decimal) and not isinstance(value, bool)


def _number(value: int | Decimal) -> str:
    text = str(DYNAMODB_CONTEXT.create_decimal(value))
    if text in ("Infinity", "NaN", "-Infinity", "sNaN", "-NaN", "-sNaN"):
        raise TypeError(f"Infinity and NaN not supported by DynamoDB: {value}")
    return text


def to_attribute(value: Any) -> dict[str, Any]:
    """The attribute value of `value` (None, bool, int, Decimal, str, bytes, a set of numbers, strings
    or bytes, a mapping or a list/tuple of these). A float is refused: DynamoDB stores decimals."""
    if value is None:
        return {"NULL": True}
    if isinstance(value, bool):
        return {"BOOL": value}
    if _is_number(value):
        return {"N": _number(value)}
    if isinstance(value, float):
        raise TypeError("Float types are not supported. Use Decimal types instead.")
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, bytes | bytearray):
        return {"B": bytes(value)}
    if isinstance(value, set | frozenset):
        if all(_is_number(v) for v in value):
            return {"NS": [_number(v) for v in value]}
        if all(isinstance(v, str) for v in value):
            return {"SS": list(value)}
        if all(isinstance(v, bytes | bytearray) for v in value):
            return {"BS": [bytes(v) for v in value]}
        raise TypeError(f"Unsupported type: a set of mixed types {value!r}")
    if isinstance(value, Mapping):
        return {"M": {key: to_attribute(item) for key, item in value.items()}}
    if isinstance(value, list | tuple):
        return {"L": [to_attribute(item) for item in value]}
    raise TypeError(f'Unsupported type "{type(value)}" for value "{value}"')


def from_attribute(attribute: Mapping[str, Any]) -> Any:
    """The Python value of a DynamoDB attribute value."""
    if len(attribute) != 1:
        raise TypeError(
            f"Value must be a nonempty dictionary whose key is a valid dynamodb type: {attribute!r}"
        )
    ((kind, value),) = attribute.items()
    if kind == "NULL":
        return None
    if kind == "BOOL":
        return value
    if kind == "N":
        return DYNAMODB_CONTEXT.create_decimal(value)
    if kind == "S":
        return value
    if kind == "B":
        return bytes(value)
    if kind == "NS":
        return {DYNAMODB_CONTEXT.create_decimal(v) for v in value}
    if kind == "SS":
        return set(value)
    if kind == "BS":
        return {bytes(v) for v in value}
    if kind == "L":
        return [from_attribute(item) for item in value]
    if kind == "M":
        return {key: from_attribute(item) for key, item in value.items()}
    raise TypeError(f"Dynamodb type {kind} is not supported")
