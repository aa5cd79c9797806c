"""With usage_reports, a share made since the plan holds the AMI in the slice as the plan would keep it.

The plan weighed the usage reports of the accounts the AMI was shared with then (the slice item's
consumers). Shared since with another account (one share_with lists, so rule 5's own check passes), that
account's report was never read: the disable stage, and the deregister stage of an AMI never disabled,
hold the AMI back until the next plan reads it, instead of disabling or deregistering an AMI the account
reports in use.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ami_janitor.aws import slicer
from ami_janitor.core.policy import Policy, parse_policy
from ami_janitor.core.slices import SliceItem, WorkSlice, policy_digest
from ami_janitor.core.usage import UsageReport
from fake_aws import Inbox, account_region
from fake_ec2 import FakeEC2, FakeImage

REGION = "us-east-1"
START = datetime(2026, 11, 25, 3, tzinfo=UTC)
OWNER = "123456789012"
CONSUMER = "210987654321"
AMI = "ami-00000000"


def usage_policy(disable_after_days: int | None, units: tuple[str, ...] = ()) -> Policy:
    return parse_policy(
        {
            "mode": "enforce",
            "regions": [REGION],
            "usage_reports": {"inbox": "s3://inbox/org", "required": True},
            "defaults": {
                "lifecycle": {
                    "deprecate_after_days": 0,
                    "disable_after_days": disable_after_days,
                    "deregister_after_days": 0,
                }
            },
            "families": [
                {
                    "name": "app",
                    "match": {"name": "app-*"},
                    "latest": {"tag": None},
                    "share_with": {"accounts": [CONSUMER], "organizational_units": list(units)},
                }
            ],
        }
    )


OU = "arn:aws:organizations::123456789012:ou/o-abcdefghij/ou-abcd-12345678"


def run_slice(
    policy: Policy, item: SliceItem, granted: list[str], uses: dict[str, list[str]]
) -> tuple[FakeEC2, slicer.SliceResult]:
    """The slice of `item` on an AMI granted `granted` since the plan (as EC2 shows it now), the
    consumer's fresh report saying it uses `uses`."""
    ec2 = FakeEC2(REGION)
    ec2.clock = START
    ec2.add_image(FakeImage(AMI, "app-0", START - timedelta(days=100), snapshot_ids=("snap-0",)))
    ec2.ledger.record_candidate(AMI, START - timedelta(days=30))
    inbox = Inbox()
    region = account_region(ec2, OWNER, inbox)
    ec2.images[AMI].permissions.update(granted)
    consumer = account_region(FakeEC2(REGION), CONSUMER, inbox)
    report = UsageReport(account=CONSUMER, region=REGION, generated_at=START, uses=uses)
    assert policy.usage_reports is not None
    consumer.services["s3"].put_object(
        Bucket="inbox", Key=policy.usage_reports.report_key(CONSUMER, REGION), Body=report.model_dump_json()
    )
    work = WorkSlice(
        run="2026-11-25T03:00:00Z",
        region=REGION,
        index=0,
        count=1,
        planned_at=START,
        policy=policy_digest(policy),
        items=(item,),
    )
    return ec2, slicer.run_slice(region.clients, ec2.ledger, policy, work, START)


@pytest.mark.parametrize(
    ("stages", "disable_after_days"),
    [(("deprecate", "disable", "deregister"), 0), (("deprecate", "deregister"), None)],
)
@pytest.mark.parametrize("consumers", [(), (CONSUMER,)])
def test_a_share_since_the_plan_holds_the_ami_until_its_report_is_read(
    stages: tuple[str, ...], disable_after_days: int | None, consumers: tuple[str, ...]
) -> None:
    # Since the plan: shared with an account share_with lists, whose fresh report says it uses the AMI.
    # () as in a plan that saw no share; (CONSUMER,) as in one that read that account's report.
    item = SliceItem(image_id=AMI, family="app", stages=stages, consumers=consumers)
    uses = {AMI: [f"referenced by launch template lt-1 in {CONSUMER}"]}

    ec2, done = run_slice(usage_policy(disable_after_days), item, [f"user:{CONSUMER}"], uses)

    assert AMI in done.held, [r.model_dump() for r in done.results]
    assert AMI in ec2.images and ec2.images[AMI].state == "available"
    assert "snap-0" in ec2.snapshots
    expected = "whose usage report the plan did not read" if not consumers else "launch template lt-1"
    assert expected in done.held[AMI]


@pytest.mark.parametrize("expanded", [False, True])
def test_an_ou_granted_since_the_plan_holds_the_ami_though_the_plan_read_another_consumer(
    expanded: bool,
) -> None:
    """The plan read the report of the one account the AMI was shared with, which does not use it; an OU
    share_with lists was granted since. Its accounts' reports were never read: the slice holds the AMI.
    Where the plan expanded that OU into its consumers, the slice acts (the stages all due at once)."""
    policy = usage_policy(0, units=(OU,))
    item = SliceItem(
        image_id=AMI,
        family="app",
        stages=("deprecate", "disable", "deregister"),
        consumers=(CONSUMER,),
        grants=(f"ou:{OU}",) if expanded else (),
    )

    ec2, done = run_slice(policy, item, [f"user:{CONSUMER}", f"ou:{OU}"], {})

    if expanded:
        assert AMI not in done.held and AMI not in ec2.images
    else:
        assert done.held[AMI].startswith(f"shared with ou:{OU}, whose usage report the plan did not read")
        assert AMI in ec2.images and ec2.images[AMI].state == "available"
        assert "snap-0" in ec2.snapshots
