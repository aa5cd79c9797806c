"""The region's own AMIs (DescribeImages): the images the plan decides about."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError
from botocore.parsers import ResponseParserError

from ami_janitor.aws.errors import error_code
from ami_janitor.aws.inventory.reading import chunks, items, source
from ami_janitor.core.model import Image
from ami_janitor.core.policy import Policy

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

    from ami_janitor.aws.clients import RegionClients

PERMISSIONS: list[str] = ["ec2:DescribeImages"]


FILTER_VALUES_MAX = 200  # values per DescribeImages filter


def _own_images(ec2: EC2Client, region: str, **filters: object) -> list[Image]:
    """Self-owned AMIs in any state (deprecated and disabled included), 1,000 a page."""
    raws = items(
        ec2,
        "describe_images",
        "Images",
        1000,
        Owners=["self"],
        IncludeDeprecated=True,
        IncludeDisabled=True,
        **filters,
    )
    return [Image.from_api(region, dict(raw)) for raw in raws]


def read_images(ec2: EC2Client, region: str) -> tuple[Image, ...]:
    """Every self-owned AMI in any state, by image id: not only the families', since the executor needs
    every AMI's snapshots (a snapshot another AMI uses is never deleted)."""
    with source("ec2:DescribeImages"):
        images = _own_images(ec2, region)
        _each_once(images)
    return tuple(sorted(images, key=lambda image: image.image_id))


def _each_once(images: Sequence[Image]) -> None:
    """Raises ValueError where the listing names an AMI twice (its pages shifted while read): counted
    twice, an AMI would take two of keep_latest's places, and a shifted listing may have skipped one."""
    seen: set[str] = set()
    for image in images:
        if image.image_id in seen:
            raise ValueError(f"AMI {image.image_id} listed twice")
        seen.add(image.image_id)


def images_where(ec2: EC2Client, region: str, name: str, values: Sequence[str]) -> list[Image]:
    """The self-owned AMIs whose filter `name` (image-id, block-device-mapping.snapshot-id) takes one
    of `values`, 200 values a call. Raises what the SDK raises (the caller names the source)."""
    found: list[Image] = []
    for batch in chunks(sorted(set(values)), FILTER_VALUES_MAX):
        found += _own_images(ec2, region, Filters=[{"Name": name, "Values": list(batch)}])
    return found


def family_image_ids(policy: Policy, images: Iterable[Image]) -> list[str]:
    """The ids of the AMIs some family of the policy matches, sorted."""
    return sorted(
        image.image_id
        for image in images
        if any(family.match.matches(image.name, image.tags) for family in policy.families)
    )


def describe_image(clients: RegionClients, image_id: str) -> Image | None:
    """One self-owned AMI in any state (disabled included), or None where the region has no such AMI."""
    return describe_own_image(clients.ec2, clients.region, image_id)


def describe_own_image(ec2: EC2Client, region: str, image_id: str) -> Image | None:
    """describe_image, for a caller holding the region's EC2 client alone."""
    try:
        answer = ec2.describe_images(
            ImageIds=[image_id], Owners=["self"], IncludeDeprecated=True, IncludeDisabled=True
        )
    except ClientError as error:
        if error_code(error).startswith("InvalidAMIID."):
            return None
        raise
    raws = answer.get("Images") or []
    try:
        return Image.from_api(region, dict(raws[0])) if raws else None
    except (KeyError, TypeError, ValueError) as error:  # as `source` names a listing's: an AWS error
        raise ResponseParserError(f"DescribeImages answered about {image_id} in {region}: {error}") from error
