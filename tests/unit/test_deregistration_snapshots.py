"""A deregistration and its snapshots when EC2's answers are late or lost: DeregisterImage
(DeleteAssociatedSnapshots=True) whose answer does not come back is done where the AMI is gone, its
snapshots counted as deleted; a snapshot EC2 still calls in use just after the deregistration (naming
the AMI just deregistered) is deleted by a later run. Against the in-memory EC2 and ledger of
fake_ec2.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.executor import ApplyResult, apply_plan
from ami_janitor.core.policy import Policy, parse_policy
from ami_janitor.core.run_plan import plan_run
from fake_ec2 import FakeEC2, FakeImage
from sessions import botocore_session

REGION = "us-east-1"
BASE = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(days=1)
SESSION = botocore_session(REGION, "x", "x")


def policy() -> Policy:
    return parse_policy(
        {
            "mode": "enforce",
            "regions": [REGION],
            "defaults": {
                "keep_latest": 1,
                "min_age_days": 0,
                "limits": {"max_fraction_per_family": 1.0},
                "lifecycle": {"deprecate_after_days": 0, "disable_after_days": 0, "deregister_after_days": 0},
            },
            "families": [{"name": "app", "match": {"tags": {"Project": "App"}, "name": "app-*"}}],
        }
    )


def fleet(results_rate: float) -> FakeEC2:
    """The newest AMI (kept) and an old one with its own snapshot (retired at once)."""
    fake = FakeEC2(REGION, results_rate=results_rate)
    fake.add_image(FakeImage("ami-new", "app-new", BASE - timedelta(days=1), tags={"Project": "App"}))
    fake.add_image(
        FakeImage(
            "ami-old",
            "app-old",
            BASE - timedelta(days=100),
            tags={"Project": "App"},
            snapshot_ids=("snap-0",),
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


def test_a_deregistration_whose_answer_is_lost_for_good_is_done_when_ec2_no_longer_shows_the_ami() -> None:
    """As for DisableImage (test_lost_answers): the retries ran out, but EC2 took the call."""
    fake, rules = fleet(results_rate=0.0), policy()
    fake.next_call_faults = {"DeregisterImage": "lost"}
    result = apply(fake, rules, BASE)
    assert not fake.next_call_faults, "the fault was never met"
    assert "ami-old" not in fake.images  # EC2 deregistered it
    [deregister] = [r for r in result.results if r.action == "deregister"]
    assert (deregister.status, deregister.error) == ("ok", None)
    assert fake.snapshots == {}, fake.snapshots  # its own snapshot deleted in the same run
    assert fake.ledger.items["ami-old"].deregistered == BASE


def test_snapshots_ec2_deleted_on_a_retried_deregistration_count_as_deleted() -> None:
    """The SDK sends DeregisterImage again after its answer was lost: the retry meets a gone AMI and
    no DeleteSnapshotResults, yet EC2 deleted the AMI's snapshot on the first attempt."""
    fake, rules = fleet(results_rate=1.0), policy()
    fake.next_call_faults = {"DeregisterImage": "retried"}
    result = apply(fake, rules, BASE)
    assert not fake.next_call_faults, "the fault was never met"
    assert fake.deleted_snapshots == ["snap-0"]  # EC2 deleted it (DeleteAssociatedSnapshots)
    assert result.failed == 0
    assert result.snapshots_deleted == ["snap-0"], [(r.action, r.detail) for r in result.results]


def test_a_snapshot_ec2_still_calls_in_use_just_after_the_deregistration_is_deleted_by_a_later_run() -> None:
    """Without DeleteSnapshotResults (an older partition, the emulator) the snapshots are deleted one by
    one right after DeregisterImage, and for a while EC2 still answers InvalidSnapshot.InUse naming the
    AMI just deregistered. No remaining AMI uses the snapshot: a later run must delete it."""
    fake, rules = fleet(results_rate=0.0), policy()
    fake.deregistration_lag = 60.0
    first = apply(fake, rules, BASE)
    assert "ami-old" not in fake.images
    assert fake.refused_in_use == ["snap-0"]  # EC2: "in use by ami-old", the AMI just deregistered
    assert fake.used_snapshots() == {*fake.images["ami-new"].snapshot_ids}  # no remaining AMI uses it
    fake.advance(3600)  # an hour on: EC2 has settled
    later = apply(fake, rules, BASE + timedelta(hours=1))
    assert "snap-0" not in fake.snapshots, (
        [(r.action, r.status, r.detail) for r in first.results if r.image_id == "ami-old"][-1],
        later.results,
        fake.ledger.items["ami-old"].deregistered,
    )
