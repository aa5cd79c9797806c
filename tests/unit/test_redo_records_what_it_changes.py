"""A stage done again because EC2 no longer shows it (the owner enabled the AMI, or set a deprecation time
of their own, after the janitor's change) records what it changes this time: a later rescue gives back
what the owner set since, not only what the first record saw (design.md, "The ledger": written before
the change it records). What the first record holds stands beside it (a rescue stopped half way may not
have granted it back yet), unless it was adopted from tags (in-memory EC2 and ledger)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ami_janitor.aws import executor
from ami_janitor.aws.clients import RegionClients
from ami_janitor.core import planner
from ami_janitor.core.model import LedgerItem, LedgerStage
from ami_janitor.core.policy import PRIOR_DEPRECATION_TAG
from ami_janitor.core.slices import SliceItem, share_hold
from ami_janitor.core.trust import Stage
from builders import policy
from fake_ec2 import FakeEC2, FakeImage

REGION = "us-east-1"
NOW = datetime(2026, 12, 1, 3, tzinfo=UTC)
STARTED = NOW - timedelta(days=10)
A, B = "user:111111111111", "user:222222222222"
OLD = "ami-0c0c0c0c"
# Shares retire with the AMI (allow_shared), as the design allows.
RULES = policy(defaults={"allow_shared": True})


def region(stages: dict[str, LedgerStage], **image: object) -> FakeEC2:
    """Two new AMIs keep_latest keeps, and OLD, a candidate since STARTED with `stages` recorded."""
    fake = FakeEC2(REGION, results_rate=1.0)
    fake.clock = NOW
    for n in (1, 2):
        fake.add_snapshot(f"snap-new{n}")
        fake.add_image(
            FakeImage(
                f"ami-0000000{n}",
                f"app-new{n}",
                NOW - timedelta(days=40 + n),
                tags={"Project": "App"},
                snapshot_ids=(f"snap-new{n}",),
            )
        )
    fake.add_snapshot("snap-c")
    fake.add_image(
        FakeImage(
            OLD,
            "app-c",
            NOW - timedelta(days=100),
            tags={"Project": "App"},
            snapshot_ids=("snap-c",),
            **image,  # type: ignore[arg-type]
        )
    )
    fake.ledger.items[OLD] = LedgerItem(image_id=OLD, first_candidate=STARTED, stages=stages)
    return fake


def redo(fake: FakeEC2, stage: Stage) -> None:
    """The plan does `stage` again, and a slice applies it."""
    read = fake.describe()
    plan = planner.plan([read], RULES, NOW)
    (decision,) = [d for d in plan.decisions if d.image_id == OLD]
    assert decision.stages == [stage], decision
    item = SliceItem(image_id=OLD, family="app", stages=(stage,))
    (result,) = executor.apply_stages(
        REGION,
        fake,
        fake.ledger,
        read,
        [(OLD, (stage,), None)],
        NOW,
        shares_keep=lambda image: share_hold(item, image, RULES),
    )
    assert result.status == "ok", result


def rescue(fake: FakeEC2) -> None:
    """OLD comes back into use: the rescue undoes what the janitor did."""
    image = next(i for i in fake.describe().images if i.image_id == OLD)
    (rescued,) = executor.rescue_image(RegionClients(REGION, ec2=fake), fake.ledger, image, NOW)
    assert rescued.status == "ok", rescued


def disabled_three_days_ago(**entry: object) -> dict[str, LedgerStage]:
    at = NOW - timedelta(days=3)
    return {
        "deprecate": LedgerStage(at=STARTED, confirmed=STARTED),
        "disable": LedgerStage(at=at, confirmed=at, **entry),  # type: ignore[arg-type]
    }


def test_a_disable_done_again_gives_back_the_shares_made_since() -> None:
    # Disabled 3 days ago with its one share, A, recorded; the owner has since enabled it and shared
    # it with A and B.
    fake = region(
        disabled_three_days_ago(prior_launch_permissions=(A,)),
        deprecation_time=STARTED + timedelta(minutes=1),
        permissions={A, B},
    )
    redo(fake, "disable")
    assert fake.images[OLD].state == "disabled" and fake.images[OLD].permissions == set()
    assert fake.ledger.items[OLD].stages["disable"].prior_launch_permissions == (A, B)

    rescue(fake)
    assert fake.images[OLD].state == "available"
    assert fake.images[OLD].permissions == {A, B}


def test_the_first_record_stands_beside_what_the_ami_holds_now() -> None:
    # A rescue that stopped half way (enabled, nothing granted back yet) leaves the AMI with B only, a
    # share made since: A, which the first disable removed, is still given back.
    fake = region(
        disabled_three_days_ago(prior_launch_permissions=(A,)),
        deprecation_time=STARTED + timedelta(minutes=1),
        permissions={B},
    )
    redo(fake, "disable")
    rescue(fake)
    assert fake.images[OLD].permissions == {A, B}


def test_an_owner_disable_done_again_by_the_janitor_is_its_own() -> None:
    # The owner had disabled it (nothing recorded to give back); enabled and shared with B since. The
    # janitor's DisableImage removes B: the rescue enables it and gives B back.
    fake = region(
        disabled_three_days_ago(already_disabled=True),
        deprecation_time=STARTED + timedelta(minutes=1),
        permissions={B},
    )
    redo(fake, "disable")
    entry = fake.ledger.items[OLD].stages["disable"]
    assert not entry.already_disabled and entry.redone == NOW
    rescue(fake)
    assert fake.images[OLD].state == "available" and fake.images[OLD].permissions == {B}


def test_a_record_adopted_from_tags_adds_nothing_to_what_the_janitor_records() -> None:
    # The tags an older janitor left named A (anyone may have written them); the AMI holds B. Done
    # again, the record is the janitor's own: B is given back, A never is.
    fake = region(
        disabled_three_days_ago(prior_launch_permissions=(A,), adopted=True),
        deprecation_time=STARTED + timedelta(minutes=1),
        permissions={B},
    )
    redo(fake, "disable")
    entry = fake.ledger.items[OLD].stages["disable"]
    assert entry.prior_launch_permissions == (B,) and not entry.adopted
    rescue(fake)
    assert fake.images[OLD].permissions == {B}


def test_a_deprecation_done_again_gives_back_the_owners_time_set_since() -> None:
    # Deprecated by the janitor 3 days ago (no deprecation before); the owner has since set their own
    # deprecation time, a year ahead.
    owners = NOW + timedelta(days=365)
    at = NOW - timedelta(days=3)
    fake = region({"deprecate": LedgerStage(at=at, confirmed=at)}, deprecation_time=owners)
    redo(fake, "deprecate")
    assert fake.images[OLD].deprecation_time is not None and fake.images[OLD].deprecation_time < owners
    assert fake.ledger.items[OLD].stages["deprecate"].prior_deprecation == owners
    # The mirror tag says the same as the ledger: no tampering reported.
    assert fake.images[OLD].tags[PRIOR_DEPRECATION_TAG] == "2027-12-01T03:00:00Z"

    rescue(fake)
    assert fake.images[OLD].deprecation_time == owners


def test_a_deprecation_done_again_that_the_run_did_not_confirm_is_the_janitors_own() -> None:
    # Recorded 10 days ago and never taken; done again 5 days ago, EC2 taking it, and that run stopped
    # before confirming it. EC2's deprecation time is then the janitor's own, not an owner's: not done a
    # third time (which would record the janitor's time as the one to give back), and a rescue cancels it.
    redone = NOW - timedelta(days=5)
    fake = region(
        {"deprecate": LedgerStage(at=STARTED, redone=redone)}, deprecation_time=redone + timedelta(minutes=1)
    )
    plan = planner.plan([fake.describe()], RULES, NOW)
    (decision,) = [d for d in plan.decisions if d.image_id == OLD]
    assert "deprecate" not in decision.stages, decision

    rescue(fake)
    assert fake.images[OLD].deprecation_time is None
