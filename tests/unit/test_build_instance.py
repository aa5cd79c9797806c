"""Which instance a bake images: a pinned id, else the only running or stopped tagged instance."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest

from ami_janitor.core.build_instance import PINNED, choose, is_named_by
from ami_janitor.core.model import BuildInstance
from ami_janitor.core.policy import Family, PolicyError
from builders import NOW, policy

ROLE = {"Role": "build"}
BUILDER = "i-0b0b0b0b0b0b0b0b0"
ATTACKER = "i-0a0a0a0a0a0a0a0a0"


def family(**bake: Any) -> Family:
    return policy({"name": "app", "bake": bake}).families[0]


def instance(
    instance_id: str, *, state: str = "running", tags: dict[str, str] | None = None, days_ago: int = 1
) -> BuildInstance:
    return BuildInstance(
        instance_id=instance_id,
        state=state,
        launched=NOW - timedelta(days=days_ago),
        tags=ROLE if tags is None else tags,
    )


def test_the_only_live_tagged_instance_is_chosen_when_running_or_stopped() -> None:
    found = [
        instance(BUILDER, state="stopped", days_ago=30),
        instance("i-0000000000000000d", state="shutting-down", days_ago=0),
        instance("i-0000000000000000f", tags={"Role": "other"}),
    ]

    choice = choose(family(instance_tag=ROLE), "us-east-1", found)

    assert (choice.instance_id, choice.reason) == (BUILDER, "the only instance tagged Role=build")
    assert not choice.refused


@pytest.mark.parametrize("state", ["pending", "stopping"])
def test_a_lookalike_is_not_chosen_while_the_build_instance_starts_or_stops(state: str) -> None:
    """Counting only running or stopped instances, another tagged instance was the only one while the
    build instance was on its way between the two: it was imaged as the family's build."""
    found = [instance(BUILDER, state=state, days_ago=30), instance(ATTACKER, days_ago=0)]

    choice = choose(family(instance_tag=ROLE), "us-east-1", found)

    assert choice.refused
    assert (
        f"2 instances in us-east-1 carry the tags Role=build (bake.instance_tag): {ATTACKER} (running), "
        in (choice.reason)
    )
    assert f"{BUILDER} ({state})" in choice.reason


@pytest.mark.parametrize("state", ["pending", "stopping"])
def test_the_only_tagged_instance_on_its_way_is_not_imaged_yet(state: str) -> None:
    choice = choose(family(instance_tag=ROLE), "us-east-1", [instance(BUILDER, state=state)])

    assert choice.refused
    assert choice.reason == (
        f"family app: the only instance in us-east-1 tagged Role=build, {BUILDER}, is {state}; only a "
        "running or stopped instance is baked"
    )


def test_several_tagged_instances_are_refused_naming_each() -> None:
    # The attacker's instance is the most recently launched: it must not win by being newest.
    found = [instance(BUILDER, days_ago=30), instance(ATTACKER, days_ago=0)]

    choice = choose(family(instance_tag=ROLE), "us-east-1", found)

    assert choice.refused and choice.instance_id is None
    assert "2 instances in us-east-1 carry the tags Role=build" in choice.reason
    assert f"{ATTACKER} (running), {BUILDER} (running)" in choice.reason
    assert "pin the build instance with bake.instance_id or pass --instance-id" in choice.reason


def test_no_tagged_instance_is_refused_naming_the_tags() -> None:
    choice = choose(family(instance_tag={"Role": "build", "Stage": "x"}), "eu-west-1", [instance(BUILDER)])

    assert choice.refused
    assert choice.reason == (
        "family app: no running or stopped instance in eu-west-1 carries the tags Role=build, Stage=x "
        "(bake.instance_tag)"
    )


def test_a_pinned_instance_is_chosen_whatever_else_carries_the_tags() -> None:
    found = [instance(BUILDER, state="stopped", days_ago=30), instance(ATTACKER, days_ago=0)]

    for bake in ({"instance_id": BUILDER}, {"instance_id": BUILDER, "instance_tag": ROLE}):
        choice = choose(family(**bake), "us-east-1", found)
        assert (choice.instance_id, choice.reason) == (BUILDER, PINNED)


@pytest.mark.parametrize(
    ("found", "bake", "reason"),
    [
        (
            [instance(ATTACKER)],
            {"instance_id": BUILDER},
            f"bake.instance_id {BUILDER} does not exist in us-east-1",
        ),
        (
            [instance(BUILDER, state="terminated")],
            {"instance_id": BUILDER},
            f"bake.instance_id {BUILDER} is terminated; only a running or stopped instance is baked",
        ),
        (
            [instance(BUILDER, tags={"Role": "other"})],
            {"instance_id": BUILDER, "instance_tag": ROLE},
            f"bake.instance_id {BUILDER} does not carry the tags Role=build (bake.instance_tag)",
        ),
    ],
    ids=["missing", "terminated", "untagged"],
)
def test_a_pinned_instance_that_cannot_be_baked_is_refused(
    found: list[BuildInstance], bake: dict[str, Any], reason: str
) -> None:
    choice = choose(family(**bake), "us-east-1", found)

    assert choice.refused
    assert choice.reason == f"family app: {reason}"


def test_a_family_without_bake_has_no_build_instance() -> None:
    assert choose(policy().families[0], "us-east-1", [instance(BUILDER)]).refused
    assert not is_named_by(policy().families[0], BUILDER, ROLE)


def test_what_a_bake_names_is_what_the_inventory_keeps() -> None:
    pinned = family(instance_id=BUILDER, instance_tag=ROLE)
    tagged = family(instance_tag=ROLE)

    assert is_named_by(pinned, BUILDER, {})  # kept even untagged: the plan says why it would refuse
    assert not is_named_by(pinned, ATTACKER, ROLE)
    assert is_named_by(tagged, ATTACKER, {**ROLE, "Name": "x"})
    assert not is_named_by(tagged, ATTACKER, {"Role": "other"})


@pytest.mark.parametrize(
    ("bake", "message"),
    [
        ({}, "families[0].bake: give instance_id and/or instance_tag"),
        ({"instance_tag": {}}, "families[0].bake.instance_tag: must not be empty"),
        ({"instance_id": "i-XYZ"}, "families[0].bake.instance_id: string should match pattern"),
        # i- and 8 or 17 hexadecimal digits, as EC2's ids and `bake --instance-id` take them.
        ({"instance_id": "i-0123"}, "families[0].bake.instance_id: string should match pattern"),
        ({"instance_id": "i-0123456789abcdef"}, "families[0].bake.instance_id: string should match pattern"),
    ],
)
def test_the_policy_names_the_build_instance(bake: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)):
        family(**bake)
    assert family(instance_id=BUILDER).bake is not None
