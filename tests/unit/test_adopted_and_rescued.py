"""An AMI adopted from an older janitor's tag record (here `prior-deprecation` alone) and rescued in
the adopting run: its adopted clock is closed at once, so no `candidate-since` tag is mirrored on it
(its rescue removes only the janitor tags the plan read). Before, the janitor's own tag was left
disagreeing with the closed ledger item and reported as tampered on every later run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.executor import apply_plan
from ami_janitor.core import trust
from ami_janitor.core.policy import CANDIDATE_TAG, PRIOR_DEPRECATION_TAG, parse_policy
from ami_janitor.core.run_plan import plan_run
from fake_ec2 import FakeEC2, FakeImage
from sessions import botocore_session

REGION = "us-east-1"
NOW = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(days=1)
SESSION = botocore_session(REGION, "x", "x")
RULES = parse_policy(
    {
        "mode": "enforce",
        "regions": [REGION],
        "defaults": {"keep_latest": 2, "min_age_days": 30, "limits": {"max_fraction_per_family": 1.0}},
        "families": [{"name": "app", "match": {"tags": {"Project": "App"}, "name": "app-*"}}],
    }
)


def enforce_run(fake: FakeEC2, now: datetime):  # type: ignore[no-untyped-def]
    """One enforce run as engine.run makes it: the plan on the adopted view, then apply_plan."""
    fake.clock = now
    view = trust.adopted_view(fake.describe(permissions=True), RULES, now)
    plan = plan_run([view], RULES, now)
    apply_plan(
        plan,
        {REGION: view},
        lambda _: RegionClients(REGION, SESSION, ec2=fake),
        now,
        ledger_for=lambda _: fake.ledger,
    )
    return plan


def test_an_ami_adopted_and_rescued_in_one_run_keeps_no_clock_tag_and_is_not_tampered() -> None:
    fake = FakeEC2(REGION, results_rate=1.0)
    # The newest AMI (kept by keep_latest) carries an older janitor's prior-deprecation record only.
    fake.add_image(
        FakeImage(
            "ami-new",
            "app-new",
            NOW - timedelta(days=1),
            tags={"Project": "App", PRIOR_DEPRECATION_TAG: "none"},
        )
    )
    fake.add_image(FakeImage("ami-old", "app-old", NOW - timedelta(days=100), tags={"Project": "App"}))

    enforce_run(fake, NOW)  # adopts (clock starts), then rescues it: the clock is closed
    assert fake.ledger.adopted is not None and fake.ledger.items["ami-new"].closed is not None

    later = enforce_run(fake, NOW + timedelta(days=1))
    assert [t for t in later.tampered if t.image_id == "ami-new"] == []
    assert CANDIDATE_TAG not in fake.images["ami-new"].tags
