"""What the ledger records of an AMI's stages stays true of EC2 (in-memory EC2 and ledger): the mirror
tags of stages an AMI kept after its deregistration failed, and a disable the janitor did again after
the owner enabled the AMI, undone by a rescue."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from ami_janitor.aws import executor
from ami_janitor.aws.clients import RegionClients
from ami_janitor.core import trust
from ami_janitor.core.model import LedgerItem, LedgerStage
from ami_janitor.core.policy import PRIOR_DEPRECATION_TAG, PRIOR_PERMISSIONS_TAG
from fake_ec2 import FakeEC2, FakeImage

REGION = "us-east-1"
NOW = datetime(2026, 12, 1, 3, tzinfo=UTC)
STARTED = NOW - timedelta(days=14)
STAGES = [("deprecate", 0), ("disable", 7), ("deregister", 30)]


def region_with_old_ami(**fields: Any) -> FakeEC2:
    """A region holding `ami-old`, 100 days old, with its own snapshot."""
    fake = FakeEC2(REGION, results_rate=1.0)
    fake.clock = NOW
    fake.add_snapshot("snap-1")
    fake.add_image(
        FakeImage("ami-old", "app-old", NOW - timedelta(days=100), snapshot_ids=("snap-1",), **fields)
    )
    return fake


def test_a_deregistration_throttled_past_the_retries_leaves_the_stages_mirrored() -> None:
    fake = region_with_old_ami(permissions={"user:200000000001"})
    fake.ledger.record_candidate("ami-old", NOW)
    fake.next_call_faults = {"DeregisterImage": "throttle"}

    results = executor.apply_stages(
        REGION,
        fake,
        fake.ledger,
        fake.describe(),
        [("ami-old", ("deprecate", "disable", "deregister"), None)],
        NOW,
    )

    assert [r.status for r in results] == ["ok", "ok", "failed"], results
    image = fake.images["ami-old"]
    assert image.state == "disabled"
    # The AMI stays, deprecated and disabled: its mirror says what the ledger recorded.
    assert PRIOR_DEPRECATION_TAG in image.tags, image.tags
    assert PRIOR_PERMISSIONS_TAG in image.tags, image.tags


def test_a_rescue_enables_an_ami_the_janitor_disabled_again() -> None:
    # Disabled by its owner when the disable stage came (recorded as already disabled), enabled since.
    fake = region_with_old_ami(state="available", deprecation_time=STARTED + timedelta(minutes=1))
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
