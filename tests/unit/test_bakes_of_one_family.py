"""A family whose bakes another family would select too is refused when the policy loads, at any time
of day the bakes are named with, not only at one example time."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ami_janitor.core import baking
from ami_janitor.core.policy import parse_policy


def _policy(other_glob: str) -> dict[str, object]:
    return {
        "mode": "enforce",
        "regions": ["us-east-1"],
        "families": [
            {
                "name": "web",
                "match": {"name": "web-*"},
                "bake": {"instance_id": "i-0123456789abcdef0", "schedule": "cron(0 2 * * ? *)"},
            },
            {"name": "web-nightly", "match": {"name": other_glob}},
        ],
    }


def test_a_family_that_selects_the_scheduled_bakes_of_another_is_refused_when_the_policy_loads() -> None:
    # Matching two families, the image would never be made Latest, shared or copied. A glob that
    # selects the 02:00 bakes this schedule makes (web-*T02*) must be refused, though it does not
    # select a bake named at 03:00.
    baked = baking.image_name(
        parse_policy(_policy("other-*"), source="test").family("web"),
        datetime(2026, 11, 26, 2, 0, tzinfo=UTC),
    )
    assert baked == "web-20261126T020000Z"
    with pytest.raises(ValueError, match="selects"):
        parse_policy(_policy("web-*T02*"), source="test")


def test_a_family_that_selects_no_bake_of_another_loads() -> None:
    assert parse_policy(_policy("web-*T02*-arm64"), source="test").family("web-nightly") is not None
    tagged = _policy("other-*")
    tagged["families"][1]["match"] = {"tags": {"Version": "latest"}}  # type: ignore[index]
    assert parse_policy(tagged, source="test").family("web-nightly") is not None
    tagged["families"][1]["match"] = {"tags": {"Version": "20270101T020000Z"}}  # type: ignore[index]
    with pytest.raises(ValueError, match="selects"):
        parse_policy(tagged, source="test")
