"""A stage an earlier run recorded and stopped before EC2 took it is done again by the next slice, but
not once a rescue closed the AMI's ledger item after the slice read it (in-memory EC2 and ledger)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ami_janitor.aws import executor
from ami_janitor.aws.clients import RegionClients
from ami_janitor.core.model import LedgerItem, LedgerSnapshot, LedgerStage
from ami_janitor.core.trust import Stage
from fake_ec2 import FakeEC2, FakeImage

REGION = "us-east-1"
NOW = datetime(2026, 12, 1, 3, tzinfo=UTC)
STARTED = NOW - timedelta(days=14)


def region_with_a_recorded_stage(stage: Stage) -> FakeEC2:
    """ami-old, whose `stage` was recorded yesterday and then refused by EC2 (not confirmed)."""
    fake = FakeEC2(REGION, results_rate=1.0)
    fake.clock = NOW
    fake.add_snapshot("snap-1")
    disabled = stage == "deregister"
    fake.add_image(
        FakeImage(
            "ami-old",
            "app-old",
            NOW - timedelta(days=100),
            state="disabled" if disabled else "available",
            snapshot_ids=("snap-1",),
            deprecation_time=NOW - timedelta(days=13),
        )
    )
    stages = {"deprecate": LedgerStage(at=STARTED, confirmed=STARTED)}
    if disabled:
        stages["disable"] = LedgerStage(at=STARTED + timedelta(days=7), confirmed=STARTED + timedelta(days=7))
    stages[stage] = LedgerStage(at=NOW - timedelta(days=1))
    fake.ledger.items["ami-old"] = LedgerItem(
        image_id="ami-old",
        first_candidate=STARTED,
        stages=stages,
        snapshots=(LedgerSnapshot(snapshot_id="snap-1", image_id="ami-old"),) if disabled else (),
    )
    return fake


@pytest.mark.parametrize("stage", ["disable", "deregister"])
def test_a_recorded_stage_is_done_again(stage: Stage) -> None:
    fake = region_with_a_recorded_stage(stage)

    (result,) = executor.apply_stages(
        REGION, fake, fake.ledger, fake.describe(), [("ami-old", (stage,), None)], NOW
    )

    assert result.status == "ok", result
    if stage == "deregister":
        assert "ami-old" not in fake.images and fake.deleted_snapshots == ["snap-1"]
    else:
        assert fake.images["ami-old"].state == "disabled"


@pytest.mark.parametrize("stage", ["disable", "deregister"])
def test_not_after_a_rescue_since_the_slice_read_the_ami(stage: Stage) -> None:
    fake = region_with_a_recorded_stage(stage)
    read = fake.describe()  # the slice's read, at its start
    clients = RegionClients(REGION, ec2=fake)
    rescued = []

    def out_of_time() -> bool:
        # Asked just before the AMI's turn: an operator's `ami-janitor rescue` lands here.
        rescued.extend(executor.rescue_image(clients, fake.ledger, fake.describe().images[0], NOW))
        return False

    (result,) = executor.apply_stages(
        REGION, fake, fake.ledger, read, [("ami-old", (stage,), None)], NOW, out_of_time=out_of_time
    )

    assert rescued and rescued[0].status == "ok" and fake.ledger.items["ami-old"].closed is not None
    assert result.status == "skipped", result
    assert "ami-old" in fake.images and fake.images["ami-old"].state == "available"
    assert fake.deleted_snapshots == []
