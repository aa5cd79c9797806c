"""The region's own AMIs (DescribeImages): the images the plan decides about."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from ami_janitor.aws.errors import error_code
from ami_janitor.aws.inventory.reading import items, source
from ami_janitor.core.model import Image
from ami_janitor.core.policy import Policy

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

    from ami_janitor.aws.clients import RegionClients

PERMISSIONS: list[str] = ["ec2:DescribeImages"]


def read_images(ec2: EC2Client, region: str) -> tuple[Image, ...]:
    """Every self-owned AMI in any state, by image id: not only the families', since the executor needs
    every AMI's snapshots (a snapshot another AMI uses is never deleted)."""
    with source("ec2:DescribeImages"):
        raws = items(
            ec2,
            "describe_images",
            "Images",
            1000,
            Owners=["self"],
            IncludeDeprecated=True,
            IncludeDisabled=True,
        )
        images = [Image.from_api(region, dict(raw)) for raw in raws]
    return tuple(sorted(images, key=lambda image: image.image_id))


def family_image_ids(policy: Policy, images: Iterable[Image]) -> list[str]:
    """The ids of the AMIs some family of the policy matches, sorted."""
    return sorted(
        image.image_id
        for image in images
        if any(family.match.matches(image.name, image.tags) for family in policy.families)
    )


def describe_image(clients: RegionClients, image_id: str) -> Image | None:
    """One self-owned AMI in any state (disabled included), or None where the region has no such AMI."""
    try:
        answer = clients.ec2.describe_images(
            ImageIds=[image_id], Owners=["self"], IncludeDeprecated=True, IncludeDisabled=True
        )
    except ClientError as error:
        if error_code(error).startswith("InvalidAMIID."):
            return None
        raise
    raws = answer.get("Images") or []
    return Image.from_api(clients.region, dict(raws[0])) if raws else None
