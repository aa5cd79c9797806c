"""Launch permissions (DescribeImageAttribute, one call per AMI): read only for the AMIs a decision
needs, after the plan has chosen them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from ami_janitor.aws.errors import error_code
from ami_janitor.aws.inventory.reading import SourceFailed, source
from ami_janitor.core.model import LaunchPermission, RegionInventory

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

    from ami_janitor.aws.clients import RegionClients

PERMISSIONS: list[str] = ["ec2:DescribeImageAttribute"]


def load_launch_permissions(
    clients: RegionClients, inventory: RegionInventory, image_ids: Iterable[str]
) -> RegionInventory:
    """The inventory with `launch_permissions` loaded for those of `image_ids` it holds."""
    if inventory.error is not None:
        return inventory
    wanted = set(image_ids)
    permissions: dict[str, tuple[LaunchPermission, ...]] = {}
    try:
        with source("ec2:DescribeImageAttribute"):
            for image in inventory.images:
                if image.image_id in wanted and image.image_id not in permissions:
                    permissions[image.image_id] = read_launch_permissions(clients.ec2, image.image_id)
    except SourceFailed as failure:
        return RegionInventory(region=inventory.region, notes=inventory.notes, error=str(failure))
    images = tuple(
        image.model_copy(update={"launch_permissions": permissions[image.image_id]})
        if image.image_id in permissions
        else image
        for image in inventory.images
    )
    return inventory.model_copy(update={"images": images})


def read_launch_permissions(ec2: EC2Client, image_id: str) -> tuple[LaunchPermission, ...]:
    """One AMI's launch permissions (DescribeImageAttribute: one call per AMI); () once it is gone."""
    try:
        answer = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    except ClientError as error:
        if error_code(error).startswith("InvalidAMIID."):
            return ()  # deregistered since the inventory: nothing is shared any more
        raise
    return tuple(
        LaunchPermission.from_api({k: str(v) for k, v in p.items()})
        for p in answer.get("LaunchPermissions") or []
    )
