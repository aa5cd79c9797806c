"""A mutating call whose first answer is lost, retried by the SDK: the retry meets the state the first
attempt set, and the call counts as done (nothing failed, the later stages go on, the next run has
nothing left to do). Against the in-memory EC2 and ledger of fake_ec2.py, whose "retried" fault is the
SDK's retry; the ledger's own side of it runs on moto in tests/integration/test_ledger.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.executor import ApplyResult, apply_plan
from ami_janitor.aws.sharer import ShareResult, apply_shares
from ami_janitor.core.model import Reference
from ami_janitor.core.policy import Policy, parse_policy
from ami_janitor.core.run_plan import plan_run
from ami_janitor.core.sharing import plan_shares
from fake_ec2 import MUTATING, Crash, FakeEC2, FakeImage
from sessions import botocore_session

REGION = "us-east-1"
BASE = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(days=1)
PARTNER = "200000000001"
SESSION = botocore_session(REGION, "x", "x")


def policy(deregister_after_days: int, partners: list[str] | None = None) -> Policy:
    return parse_policy(
        {
            "mode": "enforce",
            "regions": [REGION],
            "defaults": {
                "keep_latest": 1,
                "min_age_days": 0,
                "limits": {"max_fraction_per_family": 1.0},
                "lifecycle": {
                    "deprecate_after_days": 0,
                    "disable_after_days": 0,
                    "deregister_after_days": deregister_after_days,
                },
            },
            "families": [
                {
                    "name": "app",
                    "match": {"tags": {"Project": "App"}, "name": "app-*"},
                    "share_with": {"accounts": [PARTNER] if partners is None else partners},
                }
            ],
        }
    )


def fleet() -> FakeEC2:
    """The newest AMI (kept) and two older ones with a snapshot each, one shared with a partner."""
    fake = FakeEC2(REGION, results_rate=0.0)  # DeleteSnapshot is called (no DeleteSnapshotResults)
    fake.add_image(FakeImage("ami-new", "app-new", BASE - timedelta(days=1), tags={"Project": "App"}))
    for n, image_id in enumerate(("ami-old1", "ami-old2")):
        fake.add_image(
            FakeImage(
                image_id,
                f"app-{image_id}",
                BASE - timedelta(days=100 + n),
                tags={"Project": "App"},
                snapshot_ids=(f"snap-{n}",),
                permissions={f"user:{PARTNER}"} if n else set(),
            )
        )
    return fake


def apply(fake: FakeEC2, rules: Policy, now: datetime) -> ApplyResult:
    fake.clock = now
    inventory = fake.describe(permissions=True)
    return apply_plan(
        plan_run([inventory], rules, now),
        {REGION: inventory},
        lambda _: RegionClients(REGION, SESSION, ec2=fake),
        now,
        ledger_for=lambda _: fake.ledger,
    )


def assert_done(result: ApplyResult) -> None:
    """Nothing failed, and nothing was taken for another run's write (which would block the AMI)."""
    assert result.failed == 0, result.results
    assert not [r for r in result.results if "another run" in (r.detail or "")], result.results


def assert_converged(fake: FakeEC2, rules: Policy, now: datetime) -> None:
    start = len(fake.calls)
    assert_done(apply(fake, rules, now))
    assert fake.mutations(start) == [], fake.mutations(start)


RETIREMENT_CALLS = [
    "ledger_record_candidate",
    "ledger_record_stage",
    "ledger_confirm_stage",
    "ledger_confirm_deregistered",
    "CreateTags",
    "EnableImageDeprecation",
    "DisableImage",
    "DeregisterImage",
    "DeleteSnapshot",
]


@pytest.mark.parametrize("call", RETIREMENT_CALLS)
def test_a_retried_call_of_the_retirement_counts_as_done(call: str) -> None:
    fake, rules = fleet(), policy(deregister_after_days=0)
    fake.next_call_faults = {call: "retried"}
    result = apply(fake, rules, BASE)
    assert not fake.next_call_faults, "the fault was never met"
    assert_done(result)
    assert [c for c in fake.calls if c.retry], "the SDK never sent the call again"
    # Every stage ran in the one run, the later ones too.
    stages = {(r.image_id, r.action, r.status) for r in result.results if r.action != "mark-candidate"}
    assert stages == {
        (i, a, "ok") for i in ("ami-old1", "ami-old2") for a in ("deprecate", "disable", "deregister")
    }
    assert set(fake.images) == {"ami-new"}
    assert set(fake.snapshots) == set(), fake.snapshots
    assert all(item.deregistered == BASE for item in fake.ledger.items.values())
    assert_converged(fake, rules, BASE)


def test_a_snapshot_whose_delete_answer_was_lost_counts_as_deleted() -> None:
    """The retry finds it gone because the first attempt deleted it: the run's count of snapshots
    deleted, and of GiB freed (an upper bound), must not leave it out."""
    fake, rules = fleet(), policy(deregister_after_days=0)
    fake.next_call_faults = {"DeleteSnapshot": "retried"}
    result = apply(fake, rules, BASE)
    assert not fake.next_call_faults, "the fault was never met"
    deleted = sorted(s for r in result.results for s in r.snapshots_deleted)
    assert deleted == ["snap-0", "snap-1"], result.results
    assert set(fake.snapshots) == set()


RESCUE_CALLS = [
    "EnableImage",
    "DisableImageDeprecation",
    "ModifyImageAttribute",
    "DeleteTags",
    "ledger_close",
]


@pytest.mark.parametrize("call", RESCUE_CALLS)
def test_a_retried_call_of_a_rescue_counts_as_done(call: str) -> None:
    fake, rules = fleet(), policy(deregister_after_days=30)
    assert_done(apply(fake, rules, BASE))
    assert {fake.images[i].state for i in ("ami-old1", "ami-old2")} == {"disabled"}
    fake.references = [
        Reference(image_id=i, kind="instance", resource_id=f"i-{i}", detail="running")
        for i in ("ami-old1", "ami-old2")
    ]
    fake.next_call_faults = {call: "retried"}
    result = apply(fake, rules, BASE + timedelta(days=1))
    assert not fake.next_call_faults, "the fault was never met"
    assert_done(result)
    assert sorted((r.image_id, r.action, r.status) for r in result.results) == [
        ("ami-old1", "rescue", "ok"),
        ("ami-old2", "rescue", "ok"),
    ]
    for image_id in ("ami-old1", "ami-old2"):
        image = fake.images[image_id]
        assert (image.state, image.deprecation_time) == ("available", None)
        assert not [k for k in image.tags if k.startswith("ami-janitor:")], image.tags
        assert not fake.ledger.items[image_id].is_open
    assert fake.images["ami-old2"].permissions == {f"user:{PARTNER}"}
    assert_converged(fake, rules, BASE + timedelta(days=1))


def test_a_state_change_whose_answer_is_lost_for_good_is_done_when_ec2_shows_it() -> None:
    """The retries ran out (the caller sees the error), but the first attempt took effect: EC2 shows
    the state asked for, so the stage is done and the next one goes on."""
    fake, rules = fleet(), policy(deregister_after_days=0)
    fake.next_call_faults = {"DisableImage": "lost"}
    result = apply(fake, rules, BASE)
    assert_done(result)
    assert set(fake.images) == {"ami-new"}


def test_a_refused_state_change_is_still_a_failure_when_ec2_does_not_show_it() -> None:
    fake, rules = fleet(), policy(deregister_after_days=0)
    fake.next_call_faults = {"DisableImage": "throttle"}
    result = apply(fake, rules, BASE)
    [failed] = [r for r in result.results if r.status == "failed"]
    assert (failed.action, failed.error) == ("disable", "RequestLimitExceeded: Rate exceeded.")
    assert [(r.action, r.status) for r in result.results if r.image_id == failed.image_id][-1] == (
        "deregister",
        "skipped",
    )
    assert_converged_later(fake, rules)


def assert_converged_later(fake: FakeEC2, rules: Policy) -> None:
    assert_done(apply(fake, rules, BASE + timedelta(days=1)))
    assert set(fake.images) == {"ami-new"}
    assert not [c for c in fake.mutations() if c.operation not in MUTATING]


def share(fake: FakeEC2, rules: Policy) -> ShareResult:
    """Share the newest AMI alone (the janitor's first share: the first call's fault is its)."""
    inventory = fake.describe()
    planned = [s for s in plan_shares([inventory], rules, BASE) if s.image_id == "ami-new"]
    [result] = apply_shares(
        lambda _: RegionClients(REGION, SESSION, ec2=fake), planned, [inventory], lambda _: fake.ledger
    )
    return result


def test_a_grant_whose_answer_is_lost_stays_recorded_so_it_is_revoked_when_no_longer_wanted() -> None:
    """The retries ran out, but the first attempt took effect: EC2 shows the grant, so the ledger keeps
    it as the janitor's own, and it is revoked once the partner leaves share_with."""
    fake, rules = fleet(), policy(deregister_after_days=30)
    fake.next_call_faults = {"ModifyImageAttribute": "lost"}
    failed = share(fake, rules)
    assert (failed.status, failed.error) == ("failed", "InternalError: An internal error has occurred")
    assert fake.images["ami-new"].permissions == {f"user:{PARTNER}"}
    assert fake.ledger.items["ami-new"].grants == (f"user:{PARTNER}",)
    unshared = policy(deregister_after_days=30, partners=[])
    revoked = share(fake, unshared)
    assert (revoked.status, revoked.removed) == ("ok", [f"user:{PARTNER}"])
    assert fake.images["ami-new"].permissions == set()


def test_a_grant_recorded_by_a_run_that_died_before_making_it_is_made_by_the_next_run() -> None:
    fake, rules = fleet(), policy(deregister_after_days=30)
    fake.next_call_faults = {"ModifyImageAttribute": "crash"}
    with pytest.raises(Crash):
        share(fake, rules)
    assert fake.images["ami-new"].permissions == set()
    assert fake.ledger.items["ami-new"].granting == (f"user:{PARTNER}",)  # recorded, never made
    granted = share(fake, rules)
    assert (granted.status, granted.added) == ("ok", [f"user:{PARTNER}"])
    assert fake.images["ami-new"].permissions == {f"user:{PARTNER}"}
    item = fake.ledger.items["ami-new"]
    assert (item.grants, item.granting) == ((f"user:{PARTNER}",), ())
    left = [s for s in plan_shares([fake.describe()], rules, BASE) if s.image_id == "ami-new"]
    assert not left  # made and confirmed: nothing left to do


def test_an_unmade_grant_the_family_no_longer_lists_is_taken_back() -> None:
    fake, rules = fleet(), policy(deregister_after_days=30)
    fake.next_call_faults = {"ModifyImageAttribute": "crash"}
    with pytest.raises(Crash):
        share(fake, rules)
    unshared = policy(deregister_after_days=30, partners=[])
    revoked = share(fake, unshared)
    assert (revoked.status, revoked.removed) == ("ok", [f"user:{PARTNER}"])
    item = fake.ledger.items["ami-new"]
    assert (item.grants, item.granting, fake.images["ami-new"].permissions) == ((), (), set())


def test_a_refused_grant_is_taken_back_from_the_ledger() -> None:
    fake, rules = fleet(), policy(deregister_after_days=30)
    fake.next_call_faults = {"ModifyImageAttribute": "throttle"}
    failed = share(fake, rules)
    assert failed.status == "failed"
    assert fake.images["ami-new"].permissions == set()
    assert fake.ledger.items["ami-new"].grants == ()
    granted = share(fake, rules)
    assert (granted.status, granted.added) == ("ok", [f"user:{PARTNER}"])
    assert fake.images["ami-new"].permissions == {f"user:{PARTNER}"}


def test_a_throttled_confirmation_after_deregister_image_reports_the_deregistration_done() -> None:
    """DeregisterImage took effect and the snapshot is gone; only the ledger's confirmation failed. The
    result says what was done (the snapshot deleted) and the next run writes the confirmation."""
    fake = fleet()
    fake.next_call_faults["ledger_confirm_deregistered"] = "throttle"
    rules = policy(deregister_after_days=0)

    first = apply(fake, rules, BASE)

    [confirmed_late] = [
        r
        for r in first.results
        if r.action == "deregister" and "confirmation not written" in (r.detail or "")
    ]
    assert confirmed_late.status == "ok" and confirmed_late.error is None
    assert confirmed_late.snapshots_deleted == [
        fake.ledger.items[confirmed_late.image_id].snapshots[0].snapshot_id
    ]
    assert "(ThrottlingException: Rate exceeded.): the next run writes it" in (confirmed_late.detail or "")
    assert confirmed_late.image_id not in fake.images
    assert fake.ledger.items[confirmed_late.image_id].deregistered is None
    assert first.failed == 0, first.results

    second = apply(fake, rules, BASE + timedelta(hours=1))

    [finished] = [r for r in second.results if r.image_id == confirmed_late.image_id]
    assert (finished.action, finished.status, finished.snapshots_deleted) == (
        "finish-deregistration",
        "ok",
        [],
    )
    assert fake.ledger.items[confirmed_late.image_id].deregistered == BASE + timedelta(hours=1)


def test_a_throttled_confirmation_of_a_stage_reports_the_stage_done() -> None:
    """EnableImageDeprecation took effect, its confirmation was throttled: reported done (the detail
    says the confirmation is left), the AMI's later stages go on, and the next run confirms it."""
    fake = fleet()
    fake.next_call_faults["ledger_confirm_stage"] = "throttle"
    rules = policy(deregister_after_days=7)

    first = apply(fake, rules, BASE)

    assert first.failed == 0, first.results
    [late] = [r for r in first.results if "confirmation not written" in (r.detail or "")]
    assert late.action == "deprecate" and late.status == "ok"
    assert late.detail is not None and late.detail.startswith("recorded in the ledger; deprecated at ")
    assert fake.ledger.items[late.image_id].stages["deprecate"].confirmed is None
    disabled = [r for r in first.results if r.image_id == late.image_id and r.action == "disable"]
    assert [r.status for r in disabled] == ["ok"]

    apply(fake, rules, BASE + timedelta(hours=1))

    assert fake.ledger.items[late.image_id].stages["deprecate"].confirmed == BASE + timedelta(hours=1)
