"""The snapshots of deregistrations a crash left unfinished are actions of max_actions_per_run too: a
run deletes those of whole items while they fit, and leaves the rest, in order, to the next runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ami_janitor.aws.executor import apply_plan
from ami_janitor.aws.ledger import Prior
from ami_janitor.core.model import Plan
from ami_janitor.core.policy import Policy, parse_policy
from ami_janitor.core.run_plan import plan_run
from fake_aws import region_clients
from fake_ec2 import FakeEC2, FakeImage

NOW = datetime(2026, 11, 25, 3, tzinfo=UTC)
REGION = "us-east-1"


def policy(cap: int) -> Policy:
    return parse_policy(
        {
            "mode": "enforce",
            "regions": [REGION],
            "defaults": {"limits": {"max_actions_per_run": cap, "max_fraction_per_family": 1.0}},
            "families": [{"name": "app", "match": {"name": "app-*"}}],
        }
    )


def crashed(fake: FakeEC2, image_id: str, snapshots: list[str]) -> None:
    """A run recorded the AMI's deregistration and its snapshots, deregistered it, and stopped."""
    for snapshot in snapshots:
        fake.add_snapshot(snapshot)
    fake.ledger.record_candidate(image_id, NOW - timedelta(days=30))
    fake.ledger.record_stage(
        image_id, "deregister", NOW - timedelta(days=1), Prior(), previous=None, snapshots=snapshots
    )


def run(fake: FakeEC2, cap: int) -> Plan:
    inventory = fake.describe()
    plan = plan_run([inventory], policy(cap), NOW)
    apply_plan(
        plan, {REGION: inventory}, lambda _: region_clients(fake), NOW, ledger_for=lambda _: fake.ledger
    )
    return plan


def test_unfinished_deregistrations_are_finished_whole_within_the_cap() -> None:
    fake = FakeEC2(REGION)
    fake.clock = NOW
    fake.add_image(FakeImage("ami-00000001", "app-1", NOW - timedelta(days=1), snapshot_ids=("snap-keep",)))
    crashed(fake, "ami-0000000a", ["snap-a1", "snap-a2"])
    crashed(fake, "ami-0000000b", ["snap-b1", "snap-b2"])

    first = run(fake, cap=3)
    assert first.unfinished_snapshots == ["snap-a1", "snap-a2"]
    assert sorted(fake.deleted_snapshots) == ["snap-a1", "snap-a2"]
    assert any(
        "unfinished deregistrations whose snapshots wait for a later run" in n and "ami-0000000b" in n
        for n in first.notes
    )

    second = run(fake, cap=3)  # a's item confirmed: b's snapshots now fit
    assert second.unfinished_snapshots == ["snap-b1", "snap-b2"]
    assert sorted(fake.deleted_snapshots) == ["snap-a1", "snap-a2", "snap-b1", "snap-b2"]
    assert run(fake, cap=3).unfinished_snapshots == []


def test_an_item_with_more_snapshots_than_the_cap_waits_for_it_to_be_raised() -> None:
    fake = FakeEC2(REGION)
    fake.clock = NOW
    fake.add_image(FakeImage("ami-00000001", "app-1", NOW - timedelta(days=1), snapshot_ids=("snap-keep",)))
    crashed(fake, "ami-0000000f", ["snap-1", "snap-2", "snap-3"])

    plan = run(fake, cap=1)
    assert plan.unfinished_snapshots == [] and fake.deleted_snapshots == []
    assert any("alone outnumber it waits until it is raised): ami-0000000f" in n for n in plan.notes)
    assert run(fake, cap=3).unfinished_snapshots == ["snap-1", "snap-2", "snap-3"]
    assert sorted(fake.deleted_snapshots) == ["snap-1", "snap-2", "snap-3"]
