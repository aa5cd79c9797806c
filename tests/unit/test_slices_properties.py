"""Cutting a run's due stages into slices, and what holds an AMI back when its slice runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ami_janitor.core.model import Decision, Image, LedgerItem, LedgerStage, Stage, iso
from ami_janitor.core.policy import parse_policy
from ami_janitor.core.slices import (
    MAX_SLICE_ITEMS,
    SliceItem,
    WorkSlice,
    cut,
    done_before,
    hold_reason,
    item_cost,
    policy_digest,
    stale,
)
from builders import decision

NOW = datetime(2026, 11, 25, 3, tzinfo=UTC)
REFILL: dict[Stage, float] = {"deprecate": 5.0, "disable": 5.0, "deregister": 5.0}
POLICY = parse_policy(
    {
        "mode": "enforce",
        "regions": ["us-east-1"],
        "defaults": {
            "lifecycle": {"deprecate_after_days": 0, "disable_after_days": 0, "deregister_after_days": 0}
        },
        "families": [{"name": "app", "match": {"name": "app-*"}, "latest": {"tag": "Latest"}}],
    }
)
ALL: tuple[Stage, ...] = ("deprecate", "disable", "deregister")


def slices_of(decisions: list[Decision], budget: float) -> list[WorkSlice]:
    return cut(
        decisions,
        run="2026-11-25T03:00:00Z",
        region="us-east-1",
        planned_at=NOW,
        policy=policy_digest(POLICY),
        budget_seconds=budget,
        refill=REFILL,
    )


def image(**fields: object) -> Image:
    base: dict[str, object] = {
        "image_id": "ami-00000000000000001",
        "region": "us-east-1",
        "name": "app-1",
        "architecture": "x86_64",
        "state": "available",
        "created": NOW - timedelta(days=90),
        # The clock the run started before it queued the slice.
        "ledger": LedgerItem(image_id="ami-00000000000000001", first_candidate=NOW - timedelta(days=1)),
    }
    return Image.model_validate({**base, **fields})


ITEM = SliceItem(image_id="ami-00000000000000001", family="app", stages=("deregister",))


def test_only_the_regions_due_stages_are_cut_in_plan_order_within_the_budget() -> None:
    decisions = [
        decision(1, stages=ALL),
        decision(2, action="keep"),
        decision(3, action="wait"),
        decision(4, action="disable"),
        decision(5, region="eu-west-1"),
        decision(6),
    ]
    work = slices_of(decisions, budget=0.6)
    assert [[(i.image_id[-1], i.stages) for i in w.items] for w in work] == [
        [("1", ALL)],
        [("4", ("disable",)), ("6", ("deregister",))],
    ]
    assert [(w.index, w.count) for w in work] == [(0, 2), (1, 2)]
    assert work[0].key == "us-east-1/2026-11-25T03:00:00Z/0"


def test_no_due_stage_no_slice_and_a_slice_never_exceeds_its_item_limit() -> None:
    assert slices_of([decision(1, action="keep")], budget=300) == []
    work = slices_of([decision(n) for n in range(MAX_SLICE_ITEMS + 1)], budget=10_000)
    assert [len(w.items) for w in work] == [MAX_SLICE_ITEMS, 1]


def test_a_slice_of_amis_shared_with_many_accounts_stays_within_one_sqs_message() -> None:
    """500 AMIs shared with an organization of 150 accounts, each a consumer whose report the plan
    read: one slice by count and time, but over a megabyte; cut by size, each message fits."""
    decisions = [decision(n, stages=ALL) for n in range(500)]
    accounts = [f"{100000000000 + a}" for a in range(150)]
    work = cut(
        decisions,
        run="2026-11-25T03:00:00Z",
        region="us-east-1",
        planned_at=NOW,
        policy=policy_digest(POLICY),
        budget_seconds=10_000,
        refill=REFILL,
        consumers={d.image_id: accounts for d in decisions},
    )
    assert len(work) > 1 and sum(len(w.items) for w in work) == 500
    assert max(len(w.model_dump_json().encode()) for w in work) <= 256 * 1024


@given(
    st.lists(st.sampled_from([(), ("deregister",), ("disable", "deregister"), ALL]), max_size=60),
    st.floats(min_value=0.1, max_value=20),
)
def test_cutting_keeps_every_due_stage_once_in_order_and_each_slice_within_budget(
    stage_lists: list[tuple[Stage, ...]], budget: float
) -> None:
    decisions = [
        decision(n, action="keep" if not s else "deregister", stages=s) for n, s in enumerate(stage_lists)
    ]
    work = slices_of(decisions, budget)
    flat = [(i.image_id, i.stages) for w in work for i in w.items]
    assert flat == [(d.image_id, tuple(d.stages)) for d in decisions if d.stages]
    for w in work:
        cost = sum(item_cost(i, REFILL) for i in w.items)
        assert cost <= budget + 1e-9 or len(w.items) == 1  # one AMI too costly still gets its slice
        assert w.count == len(work)


def test_a_slice_survives_its_queue_message() -> None:
    [work] = slices_of([decision(1, stages=ALL)], budget=300)
    assert WorkSlice.model_validate_json(work.model_dump_json()) == work
    with pytest.raises(ValueError):
        WorkSlice.model_validate({**work.model_dump(), "items": []})
    # A message with a key the janitor never writes is not one of its slices, at either level.
    with pytest.raises(ValueError, match="extra"):
        WorkSlice.model_validate({**work.model_dump(), "force": True})
    [item] = work.model_dump()["items"]
    with pytest.raises(ValueError, match="extra"):
        WorkSlice.model_validate({**work.model_dump(), "items": [{**item, "skip_checks": True}]})
    with pytest.raises(ValueError, match="frozen"):
        work.items[0].image_id = "ami-00000000"


def test_the_policy_digest_changes_with_the_policy() -> None:
    other = POLICY.model_copy(update={"mode": "dry-run"})
    assert policy_digest(POLICY) == policy_digest(parse_policy(POLICY.model_dump(by_alias=True)))
    assert policy_digest(POLICY) != policy_digest(other)


def test_a_slice_older_than_half_a_day_is_stale() -> None:
    [work] = slices_of([decision(1)], budget=300)
    assert stale(work, NOW + timedelta(hours=11)) is None
    assert "the next run plans again" in (stale(work, NOW + timedelta(hours=13)) or "")


@pytest.mark.parametrize(
    ("fields", "references", "why"),
    [
        ({}, [], None),
        ({"state": "disabled"}, [], None),
        ({"state": "pending"}, [], "state pending since the plan"),
        ({"name": "web-1"}, [], "no longer matches family app"),
        ({"tags": {"ami-janitor:keep": "x"}}, [], "opted out (tag ami-janitor:keep) since the plan"),
        ({"deregistration_protection": True}, [], "deregistration protection is on"),
        ({"tags": {"Latest": "true"}}, [], "carries the Latest tag"),
        ({"last_launched": NOW + timedelta(minutes=5)}, [], "launched 2026-11-25T03:05:00Z, after the plan"),
        # A launch EC2 reported late (before the plan, unseen by it) keeps the AMI as the plan's rule does.
        ({"last_launched": NOW - timedelta(days=1)}, [], "launched 2026-11-24T03:00:00Z (within 14 days)"),
        ({"last_launched": NOW - timedelta(days=15)}, [], None),
        (
            {},
            ["referenced by ec2:LaunchTemplate lt-1"],
            "in use since the plan: referenced by ec2:LaunchTemplate lt-1",
        ),
    ],
)
def test_what_holds_an_ami_back_when_its_slice_runs(
    fields: dict[str, object], references: list[str], why: str | None
) -> None:
    assert hold_reason(ITEM, image(**fields), references, NOW, POLICY, NOW) == why


def test_an_ami_whose_clock_was_closed_since_the_plan_is_held_back() -> None:
    rescued = LedgerItem(image_id=ITEM.image_id, first_candidate=NOW - timedelta(days=1), closed=NOW)
    why = "no candidate clock open in the ledger (rescued since the plan)"
    assert hold_reason(ITEM, image(ledger=rescued), [], NOW, POLICY, NOW) == why
    assert hold_reason(ITEM, image(ledger=None), [], NOW, POLICY, NOW) == why


def test_a_vanished_ami_or_family_holds_the_item_back() -> None:
    assert hold_reason(ITEM, None, [], NOW, POLICY, NOW) == "no longer in the region"
    gone = SliceItem(image_id=ITEM.image_id, family="web", stages=("deregister",))
    assert hold_reason(gone, image(), [], NOW, POLICY, NOW) == "family web is no longer in the policy"


def test_a_gone_ami_is_done_only_where_the_ledger_shows_it_deregistered_since_the_plan() -> None:
    def item(at: datetime, confirmed: datetime | None) -> LedgerItem:
        stage = LedgerStage(at=at)
        return LedgerItem(image_id=ITEM.image_id, stages={"deregister": stage}, deregistered=confirmed)

    later = NOW + timedelta(minutes=5)
    why = f"done by an earlier delivery of this slice (deregistered {iso(later)})"
    assert done_before(ITEM, item(later, later), NOW) == why
    assert done_before(ITEM, item(later, None), NOW) is None  # not confirmed: held back as gone
    assert done_before(ITEM, item(NOW - timedelta(days=1), later), NOW) is None  # before the plan
    assert done_before(ITEM, None, NOW) is None
    disable_only = ITEM.model_copy(update={"stages": ("disable",)})
    assert done_before(disable_only, item(later, later), NOW) is None


def test_a_stage_the_ledgers_clock_does_not_make_due_is_held_back_whatever_the_slice_says() -> None:
    """Only the scheduled run's role may queue a slice; still, a slice cannot hurry a stage: the
    ledger's clock (a week to disable here) decides, and a stage the ledger recorded is done again."""
    weekly = parse_policy(
        {
            **POLICY.model_dump(mode="json", by_alias=True, exclude_none=True),
            "defaults": {"lifecycle": {"deprecate_after_days": 0, "disable_after_days": 7}},
        }
    )
    started = LedgerItem(image_id=ITEM.image_id, first_candidate=NOW - timedelta(days=3))
    both = SliceItem(image_id=ITEM.image_id, family="app", stages=("deprecate", "disable"))
    assert (
        hold_reason(both, image(ledger=started), [], NOW, weekly, NOW)
        == "disable is not due by the ledger's clock"
    )
    deprecate = SliceItem(image_id=ITEM.image_id, family="app", stages=("deprecate",))
    assert hold_reason(deprecate, image(ledger=started), [], NOW, weekly, NOW) is None
    # Deprecated three days ago: the disable is due four days on, not before.
    deprecated = started.model_copy(update={"stages": {"deprecate": LedgerStage(at=NOW - timedelta(days=3))}})
    disable = SliceItem(image_id=ITEM.image_id, family="app", stages=("disable",))
    shown = {"ledger": deprecated, "deprecation_time": NOW - timedelta(days=3)}
    assert (
        hold_reason(disable, image(**shown), [], NOW, weekly, NOW)
        == "disable is not due by the ledger's clock"
    )
    assert hold_reason(disable, image(**shown), [], NOW, weekly, NOW + timedelta(days=4)) is None
    # A stage the ledger recorded (a run that stopped before EC2 took it) is done again.
    recorded = deprecated.model_copy(
        update={"stages": {**deprecated.stages, "disable": LedgerStage(at=NOW - timedelta(hours=1))}}
    )
    assert hold_reason(disable, image(ledger=recorded), [], NOW, weekly, NOW) is None


def test_an_ami_tagged_into_a_second_family_is_held_back() -> None:
    two = parse_policy(
        {
            **POLICY.model_dump(mode="json", by_alias=True, exclude_none=True),
            "families": [
                {"name": "app", "match": {"name": "app-*"}},
                {"name": "tagged", "match": {"tags": {"Team": "web"}}},
            ],
        }
    )
    assert hold_reason(ITEM, image(), [], NOW, two, NOW) is None
    assert hold_reason(ITEM, image(tags={"Team": "web"}), [], NOW, two, NOW) == "matches family tagged too"
