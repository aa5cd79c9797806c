"""Share planning: grant share_with, revoke only the janitor's own grants, never leave a wrongly public AMI;
and the record those grants are kept in (numbered tags of whole values)."""

from __future__ import annotations

from typing import Any

import pytest

from ami_janitor.core import planner
from ami_janitor.core.model import Image, LedgerItem, RegionInventory, Share
from ami_janitor.core.policy import CANDIDATE_TAG, SHARED_BY_JANITOR_TAG, parse_policy
from ami_janitor.core.sharing import (
    grants_checked,
    organization_checks,
    organizations_in,
    plan_shares,
    recorded_grants,
    share_for,
)
from ami_janitor.core.tags import TAG_VALUE_MAX, is_part_key, joined_values, part_keys, split_values
from builders import NOW, granted, image, inventory, ledger_item, policy

A, B, C = "111111111111", "222222222222", "333333333333"
ORG = "arn:aws:organizations::123456789012:organization/o-abc123"
OU = "arn:aws:organizations::123456789012:ou/o-abc123/ou-ab12-cd34ef56"


def sharing(accounts: list[str] | None = None, **family: Any) -> Any:
    share_with = {"accounts": accounts or [], "organizations": family.pop("organizations", [])}
    return policy({"share_with": share_with, **family})


def parse_policy_families(families: list[dict[str, Any]]) -> Any:
    return parse_policy({"regions": ["us-east-1"], "families": families})


def recorded(*grants: str) -> dict[str, str]:
    """The tag that mirrors the grants (for people; never read to decide)."""
    return {SHARED_BY_JANITOR_TAG: ",".join(grants)}


def shared(*grants: str, **fields: Any) -> Image:
    """An AMI whose ledger item records the grants the janitor made (and whose tag mirrors them)."""
    return granted(image(tags=recorded(*grants), **fields), *grants)


def test_a_new_ami_gets_every_share_with_grant() -> None:
    fresh = image(days_old=1)
    shares = plan_shares([inventory(fresh)], sharing([A, B], organizations=[ORG]), NOW)
    assert shares == [
        Share(image_id=fresh.image_id, region="us-east-1", add=[f"org:{ORG}", f"user:{A}", f"user:{B}"])
    ]


def test_the_steady_state_plans_nothing() -> None:
    # Launch permissions are not loaded in the steady state (one call per AMI), or match the record.
    done = shared(f"user:{A}", f"user:{B}", days_old=1, perms=None)
    checked = shared(f"user:{A}", f"user:{B}", days_old=2, perms=(f"user:{A}", f"user:{B}"))
    assert plan_shares([inventory(done, checked)], sharing([B, A]), NOW) == []
    # Nothing shared and nothing to share: no record is needed either.
    assert plan_shares([inventory(image(days_old=1))], sharing(), NOW) == []


def test_only_grants_the_janitor_made_are_revoked() -> None:
    # A was granted by the janitor and left share_with; C was shared by hand and is not touched.
    mine = shared(f"user:{A}", f"user:{B}", days_old=1, perms=(f"user:{A}", f"user:{B}", f"user:{C}"))
    assert plan_shares([inventory(mine)], sharing([B]), NOW) == [
        Share(image_id=mine.image_id, region="us-east-1", remove=[f"user:{A}"])
    ]
    # The tag says the janitor granted C: a tag is no record, C stays.
    forged = mine.model_copy(
        update={"tags": {**mine.tags, **recorded(f"user:{A}", f"user:{B}", f"user:{C}")}}
    )
    assert plan_shares([inventory(forged)], sharing([B]), NOW) == [
        Share(image_id=mine.image_id, region="us-east-1", remove=[f"user:{A}"])
    ]


def test_a_grant_removed_by_hand_is_granted_again_when_permissions_are_loaded() -> None:
    unloaded = shared(f"user:{A}", f"user:{B}", days_old=1, perms=None)
    loaded = shared(f"user:{A}", f"user:{B}", days_old=2, perms=(f"user:{B}",))
    shares = plan_shares([inventory(unloaded, loaded)], sharing([A, B]), NOW)
    assert shares == [Share(image_id=loaded.image_id, region="us-east-1", add=[f"user:{A}"])]


def test_a_grant_found_in_place_is_neither_planned_again_nor_revoked() -> None:
    # C was shared by hand before share_with listed it: the ledger keeps it apart from the janitor's own.
    mine = shared(f"user:{A}", days_old=1, perms=None)
    assert mine.ledger is not None
    found = mine.model_copy(
        update={"ledger": mine.ledger.model_copy(update={"grants_found": (f"user:{C}",)})}
    )
    assert plan_shares([inventory(found)], sharing([A, C]), NOW) == []
    assert plan_shares([inventory(found)], sharing([]), NOW) == [
        Share(image_id=found.image_id, region="us-east-1", remove=[f"user:{A}"])
    ]
    # Loaded, and no longer there: the family lists it, so it is granted (then the janitor's own).
    gone = found.model_copy(update={"launch_permissions": image(perms=(f"user:{A}",)).launch_permissions})
    assert plan_shares([inventory(gone)], sharing([A, C]), NOW) == [
        Share(image_id=found.image_id, region="us-east-1", add=[f"user:{C}"])
    ]


def test_public_is_removed_unless_the_family_says_public_true() -> None:
    public = shared(f"user:{A}", days_old=1, public=True, perms=None)
    shares = plan_shares([inventory(public)], sharing([A]), NOW)
    assert shares == [Share(image_id=public.image_id, region="us-east-1", remove=["group:all"])]
    # allow_shared lets a shared AMI retire; it does not allow it to be public.
    assert plan_shares([inventory(public)], sharing([A], allow_shared=True), NOW) == shares
    recorded_public = granted(public, "group:all", f"user:{A}")
    assert plan_shares([inventory(recorded_public)], sharing([A], public=True), NOW) == []


def test_a_public_family_makes_its_amis_public() -> None:
    private = image(days_old=1)
    assert plan_shares([inventory(private)], sharing(public=True), NOW) == [
        Share(image_id=private.image_id, region="us-east-1", add=["group:all"])
    ]
    # Recorded as public, but made private by hand: Public comes with DescribeImages, so it is seen.
    hidden = shared("group:all", days_old=1)
    assert plan_shares([inventory(hidden)], sharing(public=True), NOW) == [
        Share(image_id=hidden.image_id, region="us-east-1", add=["group:all"])
    ]


@pytest.mark.parametrize(
    "fields",
    [
        {"state": "disabled"},
        {"state": "pending"},
        {"state": "failed"},
        {"ledger": ledger_item(20), "public": True},
    ],
)
def test_disabled_pending_and_candidate_amis_are_left_to_the_stages(fields: dict[str, Any]) -> None:
    assert plan_shares([inventory(image(days_old=1, **fields))], sharing([A]), NOW) == []


def test_replicas_in_every_usable_region_are_shared_in_order() -> None:
    us = [image(days_old=d) for d in (5, 1)]
    eu = image(days_old=3, region="eu-west-1")
    broken = RegionInventory(region="ap-south-1", images=(image(days_old=1, region="ap-south-1"),), error="x")
    shares = plan_shares([inventory(eu, region="eu-west-1"), broken, inventory(*us)], sharing([A]), NOW)
    assert [(s.region, s.image_id) for s in shares] == [
        ("eu-west-1", eu.image_id),
        ("us-east-1", us[1].image_id),
        ("us-east-1", us[0].image_id),
    ]


def test_amis_of_several_families_and_of_no_family_are_left_alone() -> None:
    both = policy(
        {"share_with": {"accounts": [A]}},
        families=[
            {
                "name": "app",
                "match": {"tags": {"Project": "App"}, "name": "app-*"},
                "share_with": {"accounts": [A]},
            },
            {"name": "all", "match": {"name": "app-*"}},
        ],
    )
    assert plan_shares([inventory(image(days_old=1))], both, NOW) == []
    other = image(days_old=1, tags={"Project": "Other"}, public=True)
    assert plan_shares([inventory(other)], sharing([A]), NOW) == []


def test_a_family_matched_by_tags_alone_revokes_no_launch_permission() -> None:
    """Anyone who may tag can enroll an AMI in a family matched by tags alone: a public AMI tagged into it
    stays public, and grants the janitor recorded while the AMI was in a family that shared (its tag
    taken off, the other's put on) stay in place (a share the family does not list keeps the AMI)."""
    by_tags = policy({"name": "pets", "match": {"tags": {"Project": "PetTracker"}}})
    public = image(days_old=1, tags={"Project": "PetTracker"}, public=True, perms=None)
    moved = shared(f"user:{A}", days_old=2, perms=(f"user:{A}",))
    moved = moved.model_copy(update={"tags": {**moved.tags, "Project": "PetTracker"}})
    assert plan_shares([inventory(public, moved)], by_tags, NOW) == []
    # The same AMIs in a family its name glob selects: the public one is made private, the grant revoked.
    named = policy({"name": "pets", "match": {"name": "app-*"}})
    assert [s.remove for s in plan_shares([inventory(public, moved)], named, NOW)] == [
        ["group:all"],
        [f"user:{A}"],
    ]


def test_in_a_family_matched_by_tags_alone_the_janitors_grants_keep_the_ami() -> None:
    """Left in place there, the grants the janitor made count as any share the family does not list: an
    old member still holding one is kept (its disable stage would remove the grant, and a rescue would
    not give it back: the family shares nothing), unless the family allows shares."""
    by_tags = policy({"name": "pets", "match": {"tags": {"Project": "PetTracker"}}})
    old = shared(f"user:{A}", days_old=100, perms=(f"user:{A}",))
    old = old.model_copy(update={"tags": {**old.tags, "Project": "PetTracker"}})
    newer = [image(days_old=d, tags={"Project": "PetTracker"}) for d in (1, 2)]

    [decision] = [
        d
        for d in planner.plan([inventory(old, *newer)], by_tags, NOW).decisions
        if d.image_id == old.image_id
    ]

    assert decision.action == "keep"
    assert f"shared with user:{A} (not in share_with)" in decision.reasons
    named = policy({"name": "pets", "match": {"name": "app-*"}})
    [retired] = [
        d for d in planner.plan([inventory(old, *newer)], named, NOW).decisions if d.image_id == old.image_id
    ]
    assert retired.action != "keep"  # in a family its name selects, the janitor's grant retires with it


def test_lost_grants_are_checked_only_where_they_would_be_granted_again() -> None:
    """A lost grant is looked for (one call per account, or per AMI granted an organization) only on an
    AMI in exactly one family that is not matched by tags alone: share_for grants nothing elsewhere."""
    mine = shared(f"user:{A}", f"org:{ORG}", days_old=1, perms=None)
    tagged = mine.model_copy(
        update={"image_id": "ami-0000000000000tag", "tags": {**mine.tags, "Project": "PetTracker"}}
    )
    both = parse_policy_families(
        [
            {
                "name": "app",
                "match": {"name": "app-*"},
                "share_with": {"accounts": [A], "organizations": [ORG]},
            },
            {"name": "pets", "match": {"tags": {"Project": "PetTracker"}}},
        ]
    )
    alone = parse_policy_families([{"name": "pets", "match": {"tags": {"Project": "App"}}}])

    # tagged: two families, left alone
    assert grants_checked(both, [mine, tagged]) == {mine.image_id: {f"user:{A}", f"org:{ORG}"}}
    assert grants_checked(alone, [mine]) == {}
    assert grants_checked(both, [image(days_old=1)]) == {}  # nothing recorded: nothing to check


def test_a_grant_found_in_place_is_checked_while_the_family_lists_it() -> None:
    """A grant the family lists that somebody else made first (`grants_found`) goes with a disable and
    enable as the janitor's own do: it is looked for while the family lists it (share_for then grants it
    again), not once the family no longer does (it would not be made again)."""
    fresh = image(days_old=1)
    item = LedgerItem(image_id=fresh.image_id, grants_found=(f"user:{A}", f"user:{B}"))
    found = fresh.model_copy(update={"ledger": item})
    lists_a = parse_policy_families(
        [{"name": "app", "match": {"name": "app-*"}, "share_with": {"accounts": [A]}}]
    )
    lists_none = parse_policy_families([{"name": "app", "match": {"name": "app-*"}}])
    assert grants_checked(lists_a, [found]) == {found.image_id: {f"user:{A}"}}
    assert grants_checked(lists_none, [found]) == {}


def test_share_for_one_image_matches_the_plan() -> None:
    fresh = image(days_old=1)
    family = sharing([A]).families[0]
    assert share_for(fresh, family) == plan_shares([inventory(fresh)], sharing([A]), NOW)[0]


# ---- the record ---------------------------------------------------------------------------------


def test_the_record_packs_whole_grants_into_numbered_tags() -> None:
    grants = [f"user:{n:012d}" for n in range(100000000001, 100000000041)] + [f"ou:{OU}", f"org:{ORG}"]
    tags = split_values(SHARED_BY_JANITOR_TAG, grants)
    assert list(tags) == [
        SHARED_BY_JANITOR_TAG,
        f"{SHARED_BY_JANITOR_TAG}:2",
        f"{SHARED_BY_JANITOR_TAG}:3",
        f"{SHARED_BY_JANITOR_TAG}:4",
    ]
    assert all(len(value) <= TAG_VALUE_MAX for value in tags.values())
    # Every part reads on its own: no grant is cut in two.
    assert all(set(value.split(",")) <= set(grants) for value in tags.values())
    assert joined_values(SHARED_BY_JANITOR_TAG, {**tags, "Other": "x"}) == sorted(grants)
    assert split_values(SHARED_BY_JANITOR_TAG, []) == {SHARED_BY_JANITOR_TAG: ""}
    assert joined_values(SHARED_BY_JANITOR_TAG, {SHARED_BY_JANITOR_TAG: ""}) == []


def test_record_parts_are_read_in_any_order_and_gaps_are_tolerated() -> None:
    tags = {
        f"{SHARED_BY_JANITOR_TAG}:3": f"user:{C}",
        SHARED_BY_JANITOR_TAG: f"user:{A}",
        "ami-janitor:shared-x": "no",
    }
    assert joined_values(SHARED_BY_JANITOR_TAG, tags) == [f"user:{A}", f"user:{C}"]
    assert part_keys(SHARED_BY_JANITOR_TAG, tags) == [SHARED_BY_JANITOR_TAG, f"{SHARED_BY_JANITOR_TAG}:3"]
    assert not is_part_key(SHARED_BY_JANITOR_TAG, f"{SHARED_BY_JANITOR_TAG}:1")
    assert not is_part_key(SHARED_BY_JANITOR_TAG, f"{SHARED_BY_JANITOR_TAG}:x")


def test_a_part_number_is_ascii_digits_only() -> None:
    # str.isdigit() holds for these, and int() cannot read the first: anyone may write such a key.
    for number in ("\u00b2", "\u0663", "\uff12"):
        assert not is_part_key(SHARED_BY_JANITOR_TAG, f"{SHARED_BY_JANITOR_TAG}:{number}")
        assert joined_values(SHARED_BY_JANITOR_TAG, {f"{SHARED_BY_JANITOR_TAG}:{number}": f"user:{A}"}) == []


def test_a_value_that_cannot_be_recorded_is_refused() -> None:
    for bad in ("", "a,b", "x" * 257):
        with pytest.raises(ValueError, match="cannot record"):
            split_values(SHARED_BY_JANITOR_TAG, [bad])


def test_unreadable_record_entries_are_ignored() -> None:
    junk = shared(f"user:{A}", "nonsense", "group:everyone", "user:", days_old=1)
    assert recorded_grants(junk) == {f"user:{A}"}


def test_a_forged_candidate_tag_does_not_stop_a_share() -> None:
    forged = image(days_old=1, tags={CANDIDATE_TAG: "2026-11-01T00:00:00Z"})
    [share] = plan_shares([inventory(forged)], sharing([A]), NOW)
    assert share.add == [f"user:{A}"]


# ---- the organizations' grants a scheduled run checks ----------------------------------------------


def test_the_amis_granted_an_organization_or_ou_are_checked_and_no_other() -> None:
    """EC2 cannot be asked which AMIs an organization may launch: the AMIs the janitor granted one are
    read. Not an AMI granted accounts only (DescribeImages by account tells those apart), nor one whose
    organization grant never answered, nor a candidate or a disabled AMI (no grant shows there)."""
    org, ou = shared(f"org:{ORG}", days_old=1), shared(f"ou:{OU}", f"user:{A}", days_old=2)
    accounts_only = shared(f"user:{A}", days_old=3)
    unconfirmed = shared(f"org:{ORG}", days_old=4)
    assert unconfirmed.ledger is not None
    unconfirmed = unconfirmed.model_copy(
        update={"ledger": unconfirmed.ledger.model_copy(update={"granting": (f"org:{ORG}",)})}
    )
    candidate = granted(image(days_old=5, ledger=ledger_item(20)), f"org:{ORG}")
    disabled = shared(f"org:{ORG}", days_old=6, state="disabled")
    images = [org, ou, accounts_only, unconfirmed, candidate, disabled]
    shares = parse_policy_families(
        [{"name": "app", "match": {"name": "app-*"}, "share_with": {"accounts": [A], "organizations": [ORG]}}]
    )
    expected = grants_checked(shares, images)
    assert organizations_in(expected[ou.image_id]) == {f"ou:{OU}"}
    assert organization_checks(expected, day=0) == sorted([org.image_id, ou.image_id])
    assert organization_checks(grants_checked(shares, [accounts_only, candidate]), day=0) == []
