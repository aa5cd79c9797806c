"""A rescue and a slice's stage on one AMI at once (in-memory EC2 and ledger): the rescue closes the
clock only where no stage was recorded since it read the AMI, and a slice whose stage landed after a
rescue closed the clock opens it again. Either way, an AMI back in use does not stay disabled."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from ami_janitor.aws import executor
from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.ledger import Ledger
from ami_janitor.core import planner
from ami_janitor.core.model import Decision, LedgerItem, LedgerStage, Reference
from builders import policy
from fake_ec2 import FakeEC2, FakeImage

REGION = "us-east-1"
NOW = datetime(2026, 12, 1, 3, tzinfo=UTC)
STARTED = NOW - timedelta(days=8)


def region() -> FakeEC2:
    """ami-c: a candidate deprecated 8 days ago; its disable stage (after 7 days) is due."""
    fake = FakeEC2(REGION, results_rate=1.0)
    fake.clock = NOW
    fake.add_snapshot("snap-c")
    fake.add_image(
        FakeImage(
            "ami-c",
            "app-c",
            NOW - timedelta(days=100),
            tags={"Project": "App"},
            snapshot_ids=("snap-c",),
            deprecation_time=STARTED + timedelta(minutes=1),
        )
    )
    fake.ledger.items["ami-c"] = LedgerItem(
        image_id="ami-c",
        first_candidate=STARTED,
        stages={"deprecate": LedgerStage(at=STARTED, confirmed=STARTED)},
    )
    return fake


def back_in_use(fake: FakeEC2) -> None:
    fake.references.append(
        Reference(image_id="ami-c", kind="launch-template", resource_id="lt-1", detail="referenced by lt-1")
    )


def rescue(fake: FakeEC2, read: Any) -> executor.ActionResult:
    decision = Decision(
        region=REGION,
        family="app",
        architecture="x86_64",
        image_id="ami-c",
        name="app-c",
        created="2026-08-23T03:00:00Z",
        action="rescue",
        reasons=["referenced by launch template lt-1"],
    )
    run = executor._RegionRun(REGION, fake, fake.ledger, read, NOW)
    run.rescue(decision, None)
    (result,) = run.results
    return result


def next_decision(fake: FakeEC2) -> str:
    later = planner.plan([fake.describe()], policy(), NOW + timedelta(days=1))
    return next(d.action for d in later.decisions if d.image_id == "ami-c")


def test_a_rescue_on_a_read_from_before_a_slices_disable_undoes_it_too() -> None:
    """The slice read ami-c unused and disables it; the scheduled run read it before that, back in use,
    and rescues it: its close finds the disable recorded since, and it reads ami-c again and enables it."""
    fake = region()
    slice_read = fake.describe()
    back_in_use(fake)
    run_read = fake.describe()
    (disabled,) = executor.apply_stages(
        REGION, fake, fake.ledger, slice_read, [("ami-c", ("disable",), None)], NOW
    )
    assert disabled.status == "ok" and fake.images["ami-c"].state == "disabled"

    rescued = rescue(fake, run_read)

    assert rescued.status == "ok", rescued
    assert "enabled" in (rescued.detail or "") and "candidate clock closed" in (rescued.detail or "")
    assert fake.images["ami-c"].state == "available"
    assert fake.ledger.items["ami-c"].closed == NOW
    assert next_decision(fake) == "keep"


def test_a_disable_that_lands_after_a_rescue_closed_the_clock_opens_it_again() -> None:
    """`ami-janitor rescue ami-c` lands between the slice's record of the disable and its DisableImage:
    the rescue sees the stage recorded and nothing disabled yet, and closes. The slice's confirmation then
    finds the clock closed and opens it again: the next run rescues ami-c, still in use, and enables it."""
    fake = region()
    slice_read = fake.describe()
    back_in_use(fake)
    record = fake.ledger.record_stage
    rescues: list[executor.ActionResult] = []

    def record_then_rescue(*args: Any, **kwargs: Any) -> Any:
        written = record(*args, **kwargs)
        clients = RegionClients(REGION, ec2=fake)
        rescues.extend(executor.rescue_image(clients, fake.ledger, fake.describe().images[0], NOW))
        return written

    fake.ledger.record_stage = record_then_rescue  # type: ignore[method-assign]
    (disabled,) = executor.apply_stages(
        REGION, fake, fake.ledger, slice_read, [("ami-c", ("disable",), None)], NOW
    )
    fake.ledger.record_stage = record  # type: ignore[method-assign]

    assert [r.status for r in rescues] == ["ok"]
    assert "opened again" in (disabled.detail or ""), disabled
    assert fake.images["ami-c"].state == "disabled" and fake.ledger.items["ami-c"].is_open
    assert next_decision(fake) == "rescue"
    assert rescue(fake, fake.describe()).status == "ok"
    assert fake.images["ami-c"].state == "available" and not fake.ledger.items["ami-c"].is_open


def test_a_rescue_that_keeps_finding_new_stages_fails_and_leaves_the_clock_open() -> None:
    fake = region()
    back_in_use(fake)
    fake.ledger.close = lambda *args, **kwargs: "already-recorded"  # type: ignore[method-assign]

    rescued = rescue(fake, fake.describe())

    assert rescued.status == "failed" and "each of the 3 times" in (rescued.error or ""), rescued
    assert fake.ledger.items["ami-c"].is_open


PARTNER = "user:111122223333"


def owner_enabled_a_disabled_candidate() -> FakeEC2:
    """ami-c: deprecated 8 days ago and disabled yesterday by the janitor (both recorded and confirmed);
    its owner has enabled it since and shared it again, so EC2 no longer shows the disable stage and the
    next slice does it again (a redo: redone in the ledger, last_stage unchanged)."""
    fake = FakeEC2(REGION, results_rate=1.0)
    fake.clock = NOW
    fake.add_snapshot("snap-c")
    fake.add_image(
        FakeImage(
            "ami-c",
            "app-c",
            NOW - timedelta(days=100),
            tags={"Project": "App"},
            snapshot_ids=("snap-c",),
            deprecation_time=STARTED + timedelta(minutes=1),
            permissions={PARTNER},
        )
    )
    disabled_at = NOW - timedelta(days=1)
    fake.ledger.items["ami-c"] = LedgerItem(
        image_id="ami-c",
        first_candidate=STARTED,
        stages={
            "deprecate": LedgerStage(at=STARTED, confirmed=STARTED),
            "disable": LedgerStage(
                at=disabled_at, confirmed=disabled_at, prior_launch_permissions=(PARTNER,)
            ),
        },
    )
    return fake


def test_a_rescue_whose_read_predates_a_slices_redone_disable_does_not_close_over_it() -> None:
    """The slice read ami-c unused; ami-c then comes back into use and an operator runs
    `ami-janitor rescue ami-c`. The rescue reads ami-c (available: nothing to enable) and undoes what it
    sees; before its close, the slice does the recorded disable again (redo_stage: allowed, the item is
    still open) and DisableImage takes it. The redo leaves last_stage as it was, so the rescue's close,
    conditioned on last_stage only, succeeds over it: ami-c, in use, stays disabled with its clock
    closed, and no later run rescues it (the ledger says nothing is left to undo)."""
    fake = owner_enabled_a_disabled_candidate()
    ledger = Ledger(RegionClients(REGION, ec2=fake, dynamodb=fake.dynamodb), fake.ledger.table)
    slice_read = fake.describe()  # the slice's read at its start: ami-c unused
    fake.references.append(
        Reference(image_id="ami-c", kind="launch-template", resource_id="lt-1", detail="referenced by lt-1")
    )
    rescue_read = fake.describe().images[0]  # the rescue's read: ami-c in use, available

    close = ledger.close
    slice_results: list[executor.ActionResult] = []

    def slice_lands_before_close(*args: Any, **kwargs: Any) -> Any:
        if not slice_results:  # the slice's disable lands between the rescue's undo and its close
            slice_results.extend(
                executor.apply_stages(REGION, fake, ledger, slice_read, [("ami-c", ("disable",), None)], NOW)
            )
        return close(*args, **kwargs)

    ledger.close = slice_lands_before_close  # type: ignore[method-assign]
    (rescued,) = executor.rescue_image(RegionClients(REGION, ec2=fake), ledger, rescue_read, NOW)
    ledger.close = close  # type: ignore[method-assign]

    (disabled,) = slice_results
    assert disabled.status == "ok", disabled  # the slice did disable ami-c again
    item = fake.ledger.items["ami-c"]
    # Either the rescue saw the redo and enabled ami-c again, or the clock stays open for the next run.
    assert fake.images["ami-c"].state == "available" or item.is_open, (
        f"ami-c, in use, left {fake.images['ami-c'].state} with its clock closed "
        f"(rescue: {rescued.status} {rescued.detail})"
    )
    later = planner.plan([fake.describe()], policy(), NOW + timedelta(days=1))
    action = next(d.action for d in later.decisions if d.image_id == "ami-c")
    assert fake.images["ami-c"].state == "available" or action == "rescue", action
