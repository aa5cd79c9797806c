"""The in-memory EC2 answers a slice's reads (aws/slicer.read_slice) as EC2 and DynamoDB would: the
filters and pages of DescribeImages, DescribeImageReferences, DescribeInstances and the ledger items,
each request checked against botocore's model and throttled by the non-mutating bucket."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import ClientError

from ami_janitor.aws import slicer
from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.errors import error_code
from ami_janitor.aws.inventory.reading import SourceFailed, items
from ami_janitor.aws.ledger import Prior
from ami_janitor.core.model import Reference
from ami_janitor.core.policy import parse_policy
from ami_janitor.core.slices import SliceItem, WorkSlice, policy_digest
from fake_aws import region_clients
from fake_ec2 import FakeEC2, FakeImage
from fake_throttle import AccountBuckets

REGION = "us-east-1"
START = datetime(2026, 11, 25, 3, tzinfo=UTC)
POLICY = parse_policy(
    {"mode": "enforce", "regions": [REGION], "families": [{"name": "app", "match": {"name": "app-*"}}]}
)


def fleet(count: int, throttle: AccountBuckets | None = None) -> FakeEC2:
    fake = FakeEC2(REGION, throttle=throttle)
    fake.clock = START
    for n in range(count):
        fake.add_image(
            FakeImage(
                f"ami-{n:08x}", f"app-{n}", START - timedelta(days=100), snapshot_ids=(f"snap-{n:08x}",)
            )
        )
    return fake


def clients(fake: FakeEC2) -> RegionClients:
    return region_clients(fake)


def work(*image_ids: str) -> WorkSlice:
    return WorkSlice(
        run="2026-11-25T03:00:00Z",
        region=REGION,
        index=0,
        count=1,
        planned_at=START,
        policy=policy_digest(POLICY),
        items=tuple(SliceItem(image_id=i, family="app", stages=("deregister",)) for i in image_ids),
    )


def test_describe_images_pages_by_filter_in_every_state_asked_for() -> None:
    fake = fleet(30)
    fake.images["ami-00000003"].state = "disabled"
    fake.images["ami-00000004"].deprecation_time = START
    ids = [f"ami-{n:08x}" for n in range(2, 12)]
    raws = list(items(fake, "describe_images", "Images", 3, Filters=[{"Name": "image-id", "Values": ids}]))
    assert [r["ImageId"] for r in raws] == [i for i in ids if i != "ami-00000003"]  # no disabled AMI
    shown = items(
        fake,
        "describe_images",
        "Images",
        3,
        IncludeDisabled=True,
        Filters=[{"Name": "block-device-mapping.snapshot-id", "Values": ["snap-00000003", "snap-00000004"]}],
    )
    assert [r["ImageId"] for r in shown] == ["ami-00000003", "ami-00000004"]
    pages = [c for c in fake.calls if c.operation == "describe_images"]
    assert len(pages) == 3 + 1  # 9 AMIs, 3 a page (the last without NextToken); then one page
    assert pages[1].params["NextToken"] == "3" and pages[0].params["MaxResults"] == 3


def test_the_fake_refuses_what_ec2_refuses() -> None:
    fake = fleet(1)
    values = [f"ami-{n:08x}" for n in range(201)]
    with pytest.raises(ClientError) as many:
        fake.describe_images(Filters=[{"Name": "image-id", "Values": values}])
    assert error_code(many.value) == "FilterLimitExceeded"
    with pytest.raises(ClientError) as unknown:
        fake.describe_images(Filters=[{"Name": "image-idd", "Values": ["ami-00000000"]}])
    assert error_code(unknown.value) == "InvalidParameterValue"
    with pytest.raises(ClientError) as misspelt:
        fake.describe_image_references(ImageIds=["ami-00000000"], IncludeAllResourceType=True)
    assert "IncludeAllResourceType" in str(misspelt.value)
    with pytest.raises(ClientError) as eleven:
        fake.describe_image_references(ImageIds=[f"ami-{n:08x}" for n in range(11)])
    assert error_code(eleven.value) == "InvalidParameterValue"
    with pytest.raises(ClientError) as small:
        fake.describe_instances(MaxResults=2)
    assert error_code(small.value) == "InvalidParameterValue"
    with pytest.raises(ClientError) as batch:
        fake.dynamodb.batch_get_item(RequestItems={"ami-janitor-ledger": {"Key": []}})
    assert error_code(batch.value) == "ValidationException"


def test_a_slice_reads_its_amis_references_live_instances_and_ledger_items() -> None:
    fake = fleet(5)
    fake.add_image(FakeImage("ami-0000sh", "app-sh", START, snapshot_ids=("snap-00000001",)))
    fake.references = [
        Reference(image_id="ami-00000000", kind="instance", resource_id="i-live", detail="x"),
        Reference(image_id="ami-00000001", kind="instance", resource_id="i-gone", detail="x"),
        Reference(image_id="ami-00000002", kind="ssm-parameter", resource_id="/app/pinned", detail="x"),
        Reference(image_id="ami-00000003", kind="auto-scaling-group", resource_id="asg", detail="x"),
    ]
    fake.instances["i-gone"] = "terminated"
    fake.ledger.record_candidate("ami-00000001", START - timedelta(days=30))
    fake.ledger.record_stage("ami-00000001", "deprecate", START - timedelta(days=30), Prior())
    inventory = slicer.read_slice(clients(fake), POLICY, work("ami-00000000", "ami-00000001", "ami-00000002"))
    assert [i.image_id for i in inventory.images] == [
        "ami-00000000",
        "ami-00000001",
        "ami-00000002",
        "ami-0000sh",  # shares a snapshot with ami-00000001
    ]
    assert sorted((r.image_id, r.kind, r.resource_id) for r in inventory.references) == [
        ("ami-00000000", "instance", "i-live"),
        ("ami-00000002", "ssm-parameter", "/app/pinned"),
    ]  # the terminated instance does not count; DescribeImageReferences sees no Auto Scaling group
    item = inventory.images[1].ledger
    assert item == fake.ledger.items["ami-00000001"]
    assert fake.dynamodb.calls == {"BatchGetItem": 1}


def test_many_instances_of_a_slices_amis_are_asked_within_ec2s_200_filter_values_a_call() -> None:
    """The instance ids and the live states share one call's 200 filter values."""
    fake = fleet(2)
    fake.references = [
        Reference(image_id="ami-00000000", kind="instance", resource_id=f"i-{n:08x}", detail="x")
        for n in range(400)
    ]
    fake.instances.update({f"i-{n:08x}": "terminated" for n in range(0, 400, 2)})
    inventory = slicer.read_slice(clients(fake), POLICY, work("ami-00000000"))
    assert len(inventory.references) == 200  # the running half
    asked = [c for c in fake.calls if c.operation == "describe_instances"]
    assert len(asked) == 3 and all(sum(len(f["Values"]) for f in c.params["Filters"]) <= 200 for c in asked)


def test_a_slice_without_the_ledger_table_reads_no_items() -> None:
    fake = fleet(2)
    fake.ledger.table = "another-table"
    inventory = slicer.read_slice(clients(fake), POLICY, work("ami-00000000"))
    assert inventory.ledger is not None and inventory.ledger.items == {}
    assert fake.dynamodb.calls == {"BatchGetItem": 1}  # its answer says the table is missing


def test_the_reads_draw_on_the_non_mutating_bucket() -> None:
    fake = fleet(1, throttle=AccountBuckets())
    for _ in range(100):
        fake.describe_instances()
    with pytest.raises(SourceFailed, match="RequestLimitExceeded"):
        slicer.read_slice(clients(fake), POLICY, work("ami-00000000"))
    assert fake.throttle is not None and fake.throttle.refused == {"DescribeImages": 1}
