"""The ledger's attribute values are boto3's: every value converts as TypeSerializer and
TypeDeserializer convert it, or is refused as they refuse it."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from boto3.dynamodb.types import Binary, TypeDeserializer, TypeSerializer
from hypothesis import given
from hypothesis import strategies as st

from ami_janitor.aws.attribute_values import from_attribute, to_attribute

numbers = st.integers(min_value=-(10**40), max_value=10**40) | st.decimals(
    allow_nan=False, allow_infinity=False, places=None
)
scalars = st.none() | st.booleans() | numbers | st.text(max_size=8) | st.binary(max_size=8) | st.floats()
sets = (
    st.frozensets(st.text(max_size=4), max_size=4).map(set)
    | st.frozensets(st.integers(-1000, 1000), max_size=4).map(set)
    | st.frozensets(st.binary(max_size=4), min_size=1, max_size=4).map(set)
)
values = st.recursive(
    scalars | sets,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)


def _outcome(convert: Any, value: Any) -> tuple[str, Any]:
    try:
        return "made", convert(value)
    except Exception as error:  # the same refusal, whatever its message
        return "refused", type(error)


def _unwrapped(value: Any) -> Any:
    """boto3 reads binary as its Binary wrapper; the ledger's codec as bytes."""
    if isinstance(value, Binary):
        return value.value
    if isinstance(value, dict):
        return {k: _unwrapped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrapped(v) for v in value]
    if isinstance(value, set):
        return {_unwrapped(v) for v in value}
    return value


@given(values)
def test_every_value_is_written_as_boto3_writes_it_or_refused_as_it_refuses_it(value: Any) -> None:
    assert _outcome(to_attribute, value) == _outcome(TypeSerializer().serialize, value)


@given(values)
def test_every_stored_value_is_read_as_boto3_reads_it(value: Any) -> None:
    try:
        stored = TypeSerializer().serialize(value)
    except Exception:
        return
    assert from_attribute(stored) == _unwrapped(TypeDeserializer().deserialize(stored))


def test_numbers_are_read_as_decimals_and_string_sets_as_sets() -> None:
    assert from_attribute(
        {"M": {"n": {"N": "12"}, "s": {"SS": ["a", "b"]}, "l": {"L": [{"NULL": True}]}}}
    ) == {
        "n": Decimal(12),
        "s": {"a", "b"},
        "l": [None],
    }


@pytest.mark.parametrize("number", [Decimal("Infinity"), Decimal("-Infinity"), Decimal("NaN")])
def test_a_number_dynamodb_cannot_store_is_refused(number: Decimal) -> None:
    with pytest.raises(TypeError):
        to_attribute(number)


@pytest.mark.parametrize("attribute", [{"X": "1"}, {}, {"S": "a", "N": "1"}])
def test_an_attribute_value_of_no_known_type_is_refused(attribute: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        from_attribute(attribute)
