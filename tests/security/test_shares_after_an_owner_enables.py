"""The grants a janitor's DisableImage removed are no longer the janitor's once the AMI's owner enables
it again by hand (EnableImage restores none). A share the owner then makes to such an account (one share_with no longer lists) is the owner's: it keeps the AMI
(rule 5) and is never revoked by the janitor. In-memory EC2 and ledger (fake_ec2.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ami_janitor.aws import executor
from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.executor import apply_plan
from ami_janitor.aws.sharer import apply_shares
from ami_janitor.core.model import LedgerItem, LedgerStage
from ami_janitor.core.policy import Policy, parse_policy
from ami_janitor.core.run_plan import plan_run
from ami_janitor.core.sharing import plan_shares
from fake_ec2 import FakeEC2, FakeImage
from sessions import botocore_session

REGION = "us-east-1"
NOW = datetime(2026, 12, 1, 3, tzinfo=UTC)
STARTED = NOW - timedelta(days=20)
PARTNER = "200000000001"
SESSION = botocore_session(REGION, "x", "x")


def policy(partners: list[str]) -> Policy:
    return parse_policy(
        {
            "mode": "enforce",
            "regions": [REGION],
            "defaults": {
                "keep_latest": 1,
                "min_age_days": 0,
                "launched_within_days": 1,
                "limits": {"max_fraction_per_family": 1.0},
                "lifecycle": {
                    "deprecate_after_days": 0,
                    "disable_after_days": 7,
                    "deregister_after_days": 60,
                },
            },
            "families": [
                {
                    "name": "app",
                    "match": {"tags": {"Project": "App"}, "name": "app-*"},
                    "share_with": {"accounts": partners},
                }
            ],
        }
    )


def disabled_by_the_janitor_then_enabled_and_shared_by_its_owner() -> FakeEC2:
    """ami-old: the janitor granted PARTNER (share_with listed it then), and its disable stage removed
    that grant (DisableImage, confirmed). share_with has dropped PARTNER since. The owner enabled the AMI
    by hand and shared it with PARTNER again, by hand: that launch permission is the owner's."""
    fake = FakeEC2(REGION, results_rate=1.0)
    fake.clock = NOW
    fake.add_image(FakeImage("ami-new", "app-new", NOW - timedelta(days=2), tags={"Project": "App"}))
    fake.add_image(
        FakeImage(
            "ami-old",
            "app-old",
            NOW - timedelta(days=100),
            tags={"Project": "App"},
            state="available",  # enabled by its owner
            deprecation_time=STARTED + timedelta(minutes=1),
            permissions={f"user:{PARTNER}"},  # shared by its owner after enabling it
        )
    )
    disabled_at = STARTED + timedelta(days=7)
    fake.ledger.items["ami-old"] = LedgerItem(
        image_id="ami-old",
        first_candidate=STARTED,
        stages={
            "deprecate": LedgerStage(at=STARTED, confirmed=STARTED),
            "disable": LedgerStage(
                at=disabled_at, confirmed=disabled_at, prior_launch_permissions=(f"user:{PARTNER}",)
            ),
        },
        grants=(f"user:{PARTNER}",),  # made by the janitor before, removed by its DisableImage
    )
    return fake


def test_a_share_its_owner_made_after_enabling_a_disabled_ami_keeps_it() -> None:
    """The owner's share outside share_with keeps the AMI (rule 5): the plan rescues it rather than
    disabling it again, which would take the owner's share away."""
    fake = disabled_by_the_janitor_then_enabled_and_shared_by_its_owner()
    rules = policy(partners=[])
    inventory = fake.describe(permissions=True)
    plan = plan_run([inventory], rules, NOW)
    [old] = [d for d in plan.decisions if d.image_id == "ami-old"]
    assert old.action == "rescue", old
    assert any(f"user:{PARTNER}" in reason for reason in old.reasons), old

    apply_plan(
        plan,
        {REGION: inventory},
        lambda _: RegionClients(REGION, SESSION, ec2=fake),
        NOW,
        ledger_for=lambda _: fake.ledger,
    )
    assert fake.images["ami-old"].state == "available"
    assert fake.images["ami-old"].permissions == {f"user:{PARTNER}"}


def test_a_rescue_of_an_ami_its_owner_enabled_revokes_no_share_the_owner_made() -> None:
    """`ami-janitor rescue` of that AMI (its owner enabled it): the janitor's grant to PARTNER went with
    its DisableImage, so once the clock is closed the share planning must not take the owner's share
    of PARTNER away as if it were the janitor's."""
    fake = disabled_by_the_janitor_then_enabled_and_shared_by_its_owner()
    rules = policy(partners=[])
    clients = RegionClients(REGION, SESSION, ec2=fake)
    [image] = [i for i in fake.describe().images if i.image_id == "ami-old"]
    [rescued] = executor.rescue_image(clients, fake.ledger, image, NOW, shared=frozenset())
    assert rescued.status == "ok", rescued
    assert fake.ledger.items["ami-old"].closed is not None

    inventory = fake.describe()
    shares = [s for s in plan_shares([inventory], rules, NOW) if s.image_id == "ami-old"]
    apply_shares(lambda _: clients, shares, [inventory], lambda _: fake.ledger)
    assert fake.images["ami-old"].permissions == {f"user:{PARTNER}"}, shares
