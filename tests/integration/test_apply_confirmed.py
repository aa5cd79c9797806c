"""`apply` after a yes writes nothing the plan shown did not: a snapshot deletion the fresh plan asks
for (the end of a deregistration another run left unfinished while the question waited) is a write the
person was not asked about."""

from __future__ import annotations

from datetime import timedelta

import boto3
import pytest
import yaml

from ami_janitor import engine
from ami_janitor.aws.clients import ClientFactory, RegionClients
from ami_janitor.aws.ledger import Ledger, Prior
from ami_janitor.core.policy import DEFAULT_LEDGER_TABLE, RETIRED_FROM_TAG, parse_policy
from server import POLICY, ec2, make_ledger, now


@pytest.fixture
def ready(moto_aws: None) -> None:
    make_ledger()


def test_apply_deletes_no_snapshot_the_plan_shown_did_not(ready: None) -> None:
    policy = parse_policy(yaml.safe_load(POLICY.format(mode="enforce")))
    at = now()
    client = ec2()
    base = client.register_image(Name="base", RootDeviceName="/dev/xvda")["ImageId"]
    instance = client.run_instances(ImageId=base, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    other = client.create_image(InstanceId=instance, Name="web-crashed")["ImageId"]
    snapshot = client.describe_images(ImageIds=[other])["Images"][0]["BlockDeviceMappings"][0]["Ebs"][
        "SnapshotId"
    ]

    shown = engine.run(policy, ["us-east-1"], ClientFactory(), at, apply=False).plan
    assert shown.unfinished_snapshots == []

    # While the question waits, another run records the AMI's deregistration, deregisters it and stops
    # before deleting its snapshot.
    book = Ledger(RegionClients("us-east-1"), DEFAULT_LEDGER_TABLE)
    earlier = at - timedelta(days=10)
    assert book.record_candidate(other, earlier) == "recorded"
    book.record_stage(other, "deregister", earlier, Prior(), previous=None, snapshots=[snapshot])
    client.create_tags(Resources=[snapshot], Tags=[{"Key": RETIRED_FROM_TAG, "Value": other}])
    client.deregister_image(ImageId=other)

    fresh, _ = engine.build_plan(policy, ["us-east-1"], ClientFactory(), at)
    assert fresh.unfinished_snapshots == [snapshot]  # the fresh plan deletes it

    with pytest.raises(engine.PlanChanged, match=f"delete snapshot {snapshot}"):
        engine.run(policy, ["us-east-1"], ClientFactory(), at, apply=True, confirmed=shown)
    snapshots = boto3.client("ec2", region_name="us-east-1").describe_snapshots(OwnerIds=["self"])[
        "Snapshots"
    ]
    assert snapshot in {s["SnapshotId"] for s in snapshots}
