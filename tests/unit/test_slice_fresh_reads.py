"""What a slice finds changed since its plan, on the in-memory EC2 (tests/fake_ec2.py): the slice
reads its AMIs again and holds back any that the one-invocation path would have kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ami_janitor.aws import slicer
from ami_janitor.aws.clients import RegionClients
from ami_janitor.core.model import Reference
from ami_janitor.core.policy import parse_policy
from ami_janitor.core.slices import SliceItem, WorkSlice, policy_digest
from fake_aws import Inbox, account_region, region_clients
from fake_ec2 import FakeEC2, FakeImage

REGION = "us-east-1"
START = datetime(2026, 11, 25, 3, tzinfo=UTC)
ACCOUNT = "123456789012"
RETIRE = ("deprecate", "disable", "deregister")
POINTER = "/ami/app/latest"
# Latest published in an SSM parameter only (no tag): the parameter is all that names it.
POLICY = parse_policy(
    {
        "mode": "enforce",
        "regions": [REGION],
        "defaults": {
            "lifecycle": {"deprecate_after_days": 0, "disable_after_days": 0, "deregister_after_days": 0}
        },
        "families": [
            {"name": "app", "match": {"name": "app-*"}, "latest": {"tag": None, "ssm_parameter": POINTER}}
        ],
    }
)


def fleet(count: int) -> FakeEC2:
    """`count` AMIs of family app, 100 days old, each with its own snapshot and a candidate clock."""
    fake = FakeEC2(REGION)
    fake.clock = START
    for n in range(count):
        image_id = f"ami-{n:08x}"
        fake.add_image(
            FakeImage(image_id, f"app-{n}", START - timedelta(days=100), snapshot_ids=(f"snap-{n:08x}",))
        )
        fake.ledger.record_candidate(image_id, START - timedelta(days=30))
    return fake


def clients(fake: FakeEC2) -> RegionClients:
    """The region's clients on the fakes: EC2 (with DescribeImageReferences) and the ledger, SSM, Auto
    Scaling, Batch, EMR."""
    return region_clients(fake, account=ACCOUNT)


def work(*image_ids: str) -> WorkSlice:
    return WorkSlice(
        run="2026-11-25T03:00:00Z",
        region=REGION,
        index=0,
        count=1,
        planned_at=START,
        policy=policy_digest(POLICY),
        items=tuple(SliceItem(image_id=i, family="app", stages=RETIRE) for i in image_ids),
    )


def test_an_ami_the_latest_parameter_names_since_the_plan_is_held_back() -> None:
    """The Latest AMI went bad after the plan and the pointer was moved back to an older AMI (by the
    event rotation, or by hand): the plan keeps the value of the family's parameter (rule 2), so the
    slice does not retire the AMI launches now resolve."""
    fake = fleet(2)
    fake.references = [
        Reference(image_id="ami-00000000", kind="ssm-parameter", resource_id=POINTER, detail="pointer")
    ]

    done = slicer.run_slice(clients(fake), fake.ledger, POLICY, work("ami-00000000", "ami-00000001"), START)

    assert done.held == {
        "ami-00000000": f"in use since the plan: referenced by ssm:Parameter {POINTER} (DescribeImageReferences)"
    }
    assert "ami-00000000" in fake.images and fake.images["ami-00000000"].state == "available"
    assert "ami-00000001" not in fake.images  # the other AMI of the slice retires as planned
    assert [r.status for r in done.results if r.image_id == "ami-00000000"] == ["skipped"] * 3


def test_a_launch_configuration_made_since_the_plan_holds_its_ami_back() -> None:
    """DescribeImageReferences does not look at launch configurations (nor Auto Scaling groups' pinned
    template versions, fleets, Batch or EMR): the slice reads those sources again itself."""
    fake = fleet(2)
    region = account_region(fake, ACCOUNT, Inbox())
    region.services["autoscaling"].launch_configurations.append(
        {"LaunchConfigurationName": "web-since-the-plan", "ImageId": "ami-00000000"}
    )

    done = slicer.run_slice(region.clients, fake.ledger, POLICY, work("ami-00000000", "ami-00000001"), START)

    assert done.held == {
        "ami-00000000": "in use since the plan: referenced by launch configuration web-since-the-plan"
    }
    assert fake.images["ami-00000000"].state == "available"
    assert "ami-00000001" not in fake.images
    assert region.calls["autoscaling:DescribeLaunchConfigurations"] == 1


def test_a_plain_text_parameter_made_since_the_plan_holds_its_ami_back() -> None:
    """DescribeImageReferences may look only at parameters of the aws:ec2:image data type, where the
    plan reads every plain-text value: the slice reads again the parameters changed since its plan,
    and only those."""
    fake = fleet(3)
    region = account_region(fake, ACCOUNT, Inbox(), parameters={"/old/config": "ami-00000002"})
    ssm = region.services["ssm"]
    ssm.modified["/old/config"] = START - timedelta(days=3)  # the plan read it: it kept ami-00000002
    ssm.put("/app/config", '{"image": "ami-00000000"}')

    done = slicer.run_slice(region.clients, fake.ledger, POLICY, work("ami-00000000", "ami-00000001"), START)

    assert done.held == {"ami-00000000": "in use since the plan: value of SSM parameter /app/config"}
    assert fake.images["ami-00000000"].state == "available"
    assert "ami-00000001" not in fake.images
    assert region.calls["ssm:GetParameters"] == 1  # /app/config alone: /old/config is older than the plan
