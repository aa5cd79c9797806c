"""A disable stage recorded on an AMI its owner had disabled, then enabled by the owner: the janitor
disables it again (the stage done again under its first record); a rescue must enable it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ami_janitor.aws import executor
from ami_janitor.aws.clients import RegionClients
from ami_janitor.core import trust
from ami_janitor.core.model import LedgerItem, LedgerStage
from fake_ec2 import FakeEC2, FakeImage

REGION = "us-east-1"
NOW = datetime(2026, 12, 1, 3, tzinfo=UTC)
STARTED = NOW - timedelta(days=14)
STAGES = [("deprecate", 0), ("disable", 7), ("deregister", 30)]


def test_a_rescue_enables_an_ami_the_janitor_disabled_again() -> None:
    fake = FakeEC2(REGION, results_rate=1.0)
    fake.clock = NOW
    fake.add_snapshot("snap-1")
    # Disabled by its owner when the disable stage came (recorded as already disabled), enabled since.
    fake.add_image(
        FakeImage(
            "ami-old",
            "app-old",
            NOW - timedelta(days=100),
            state="available",
            snapshot_ids=("snap-1",),
            deprecation_time=STARTED + timedelta(minutes=1),
        )
    )
    disabled_at = STARTED + timedelta(days=7)
    fake.ledger.items["ami-old"] = LedgerItem(
        image_id="ami-old",
        first_candidate=STARTED,
        stages={
            "deprecate": LedgerStage(at=STARTED, confirmed=STARTED),
            "disable": LedgerStage(at=disabled_at, already_disabled=True, confirmed=disabled_at),
        },
    )
    image = fake.describe().images[0]
    planned = trust.stage_plan(image, STAGES, NOW)  # type: ignore[arg-type]
    assert planned.due == ["disable"] and planned.finishing == "disable"

    (result,) = executor.apply_stages(
        REGION, fake, fake.ledger, fake.describe(), [("ami-old", ("disable",), None)], NOW
    )
    assert result.status == "ok", result
    assert fake.images["ami-old"].state == "disabled"  # the janitor's own DisableImage

    # The AMI comes back into use: the rescue undoes what the janitor did.
    (rescued,) = executor.rescue_image(
        RegionClients(REGION, ec2=fake), fake.ledger, fake.describe().images[0], NOW
    )
    assert rescued.status == "ok", rescued
    assert fake.images["ami-old"].state == "available", rescued.detail
