"""An AMI whose deregistration fails in the run that deprecated and disabled it keeps the stages'
mirror tags (in-memory EC2 and ledger)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ami_janitor.aws import executor
from ami_janitor.core.policy import PRIOR_DEPRECATION_TAG, PRIOR_PERMISSIONS_TAG
from fake_ec2 import FakeEC2, FakeImage

REGION = "us-east-1"
NOW = datetime(2026, 12, 1, 3, tzinfo=UTC)


def test_a_deregistration_throttled_past_the_retries_leaves_the_stages_mirrored() -> None:
    fake = FakeEC2(REGION, results_rate=1.0)
    fake.clock = NOW
    fake.add_snapshot("snap-1")
    fake.add_image(
        FakeImage(
            "ami-old",
            "app-old",
            NOW - timedelta(days=100),
            snapshot_ids=("snap-1",),
            permissions={"user:200000000001"},
        )
    )
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
