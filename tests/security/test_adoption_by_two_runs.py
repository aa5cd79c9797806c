"""Two enforce runs that read a region before either adopted its janitor tags: the one whose writes the
ledger refuses reports no adoption, writes no clock tag and decides nothing on its own adopted view."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.executor import apply_plan
from ami_janitor.core import trust
from ami_janitor.core.model import iso
from ami_janitor.core.policy import CANDIDATE_TAG, parse_policy
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
        "defaults": {
            "keep_latest": 1,
            "min_age_days": 30,
            "limits": {"max_fraction_per_family": 1.0},
            "lifecycle": {"deprecate_after_days": 7, "disable_after_days": 14, "deregister_after_days": 21},
        },
        "families": [{"name": "app", "match": {"tags": {"Project": "App"}, "name": "app-*"}}],
    }
)


def _read(fake: FakeEC2, now: datetime):  # type: ignore[no-untyped-def]
    view = trust.adopted_view(fake.describe(permissions=True), RULES, now)
    return view, plan_run([view], RULES, now)


def _apply(fake: FakeEC2, view, plan, now: datetime):  # type: ignore[no-untyped-def]
    fake.clock = now
    return apply_plan(
        plan,
        {REGION: view},
        lambda _: RegionClients(REGION, SESSION, ec2=fake),
        now,
        ledger_for=lambda _: fake.ledger,
    )


def test_a_second_run_that_read_before_the_adoption_leaves_the_mirror_as_the_ledger_says() -> None:
    """Two enforce runs of one region overlap during the upgrade (the scheduled run and an operator's
    `apply`, or a duplicated schedule event): both read the region before either marked it adopted.
    The first adopts; the second's adoption writes nothing to the ledger (its items exist, the region
    is marked), yet it reports the tags adopted and rewrites the clock's mirror tag to its own time,
    which the ledger does not say: every later run reports the janitor's own tag as tampered."""
    fake = FakeEC2(REGION, results_rate=1.0)
    fake.add_image(FakeImage("ami-new", "app-new", NOW - timedelta(days=60), tags={"Project": "App"}))
    fake.add_image(
        FakeImage(
            "ami-old",
            "app-old",
            NOW - timedelta(days=100),
            tags={"Project": "App", CANDIDATE_TAG: "2020-01-01T00:00:00Z"},
        )
    )
    second_now = NOW + timedelta(minutes=2)
    first_view, first_plan = _read(fake, NOW)
    second_view, second_plan = _read(fake, second_now)  # read before the first run wrote anything

    _apply(fake, first_view, first_plan, NOW)
    assert fake.ledger.adopted == NOW and fake.ledger.items["ami-old"].first_candidate == NOW
    second = _apply(fake, second_view, second_plan, second_now)

    # The ledger still says the first run's clock; the second run adopted nothing.
    assert fake.ledger.items["ami-old"].first_candidate == NOW
    assert [r for r in second.results if r.action == "adopt" and r.status == "ok"] == []
    # The mirror says what the ledger says, and the next run finds nothing tampered.
    assert fake.images["ami-old"].tags[CANDIDATE_TAG] == iso(NOW)
    _, later = _read(fake, NOW + timedelta(days=1))
    assert [t for t in later.tampered if t.image_id == "ami-old"] == []
