"""Snapshots marked retired-from an AMI (DescribeSnapshots): a deregistration a crash interrupted
leaves them behind, and the next run finishes the job."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ami_janitor.aws.inventory.reading import items, source, tag
from ami_janitor.core.model import RetiredSnapshot
from ami_janitor.core.policy import RETIRED_FROM_TAG

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

PERMISSIONS: list[str] = ["ec2:DescribeSnapshots"]


def read_retired_snapshots(ec2: EC2Client) -> tuple[RetiredSnapshot, ...]:
    """The self-owned snapshots carrying the retired-from tag, by snapshot id."""
    tag_filter = [{"Name": "tag-key", "Values": [RETIRED_FROM_TAG]}]
    with source("ec2:DescribeSnapshots"):
        raws = items(ec2, "describe_snapshots", "Snapshots", 1000, OwnerIds=["self"], Filters=tag_filter)
        retired = [
            RetiredSnapshot(snapshot_id=str(raw["SnapshotId"]), image_id=tag(raw, RETIRED_FROM_TAG) or "")
            for raw in raws
        ]
    return tuple(sorted(retired, key=lambda s: s.snapshot_id))
