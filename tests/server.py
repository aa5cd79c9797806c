"""A moto server on loopback for end-to-end tests (CLI, handlers, demo), and a small fleet on it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
import requests

os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")

from ami_janitor.demo import emulator

POLICY = """\
mode: {mode}
regions: [us-east-1]
defaults:
  keep_latest: 2
  min_age_days: 7
  lifecycle: {{deprecate_after_days: 0, disable_after_days: 0, deregister_after_days: 0}}
  limits: {{max_actions_per_run: 100, max_fraction_per_family: 1.0}}
families:
  - name: web
    match: {{tags: {{Project: Web}}, name: "web-*"}}
    latest: {{tag: Latest, ssm_parameter: "/ami/web/latest"}}
"""


@dataclass
class Fleet:
    """Six `web` AMIs a week apart (oldest first); the third oldest is used by a stopped instance."""

    images: list[str] = field(default_factory=list)
    snapshots: dict[str, str] = field(default_factory=dict)
    referenced: str = ""
    instance: str = ""


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    server, endpoint = emulator.start_server()
    yield endpoint
    server.stop()


@pytest.fixture
def endpoint(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A clean emulator, reached by every boto3 client through AWS_ENDPOINT_URL."""
    requests.post(f"{moto_server}/moto-api/reset", timeout=10)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AMI_JANITOR_MAX_ATTEMPTS", "1")
    yield moto_server


def ec2() -> Any:
    return boto3.client("ec2", region_name="us-east-1")


def seed_fleet(now: datetime, count: int = 6) -> Fleet:
    client = ec2()
    base = client.register_image(Name="base", RootDeviceName="/dev/xvda")["ImageId"]
    builder = client.run_instances(ImageId=base, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    fleet = Fleet()
    for n in range(count):
        image_id = client.create_image(
            InstanceId=builder,
            Name=f"web-{n:02d}",
            TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": "Project", "Value": "Web"}]}],
        )["ImageId"]
        emulator.set_image_fields(
            "us-east-1", image_id, creation_date=now - timedelta(days=7 * (count - n) + 1)
        )
        fleet.images.append(image_id)
    for image in client.describe_images(ImageIds=fleet.images)["Images"]:
        fleet.snapshots[image["ImageId"]] = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    fleet.referenced = fleet.images[2]
    used = client.run_instances(ImageId=fleet.referenced, MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    client.stop_instances(InstanceIds=[used])
    fleet.instance = used
    return fleet


def image_ids() -> set[str]:
    return {i["ImageId"] for i in ec2().describe_images(Owners=["self"])["Images"]}


def snapshot_ids() -> set[str]:
    return {s["SnapshotId"] for s in ec2().describe_snapshots(OwnerIds=["self"])["Snapshots"]}


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def make_ledger(regions: tuple[str, ...] = ("us-east-1",)) -> None:
    """The ledger table an enforce apply needs (what `ami-janitor ledger create` makes)."""
    from ami_janitor.aws import ledger
    from ami_janitor.aws.clients import RegionClients
    from ami_janitor.core.policy import DEFAULT_LEDGER_TABLE

    for region in regions:
        ledger.create_table(
            RegionClients(region), DEFAULT_LEDGER_TABLE, ["arn:aws:iam::123456789012:user/moto"]
        )
