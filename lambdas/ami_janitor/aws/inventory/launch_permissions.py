"""Launch permissions (DescribeImageAttribute, one call per AMI): read only for the AMIs a decision
needs, after the plan has chosen them, several at once; of the AMIs that lost an account's grant the
ledger records as made (DescribeImages by the accounts that may launch them: one call per account); and
of the AMIs the janitor granted an organization or OU, in turns (load_lost_grants)."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from ami_janitor.aws.errors import error_code
from ami_janitor.aws.inventory.reading import SourceFailed, items, source
from ami_janitor.core import sharing
from ami_janitor.core.model import LaunchPermission, RegionInventory

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

    from ami_janitor.aws.clients import RegionClients
    from ami_janitor.core.policy import Policy

# DescribeImages by the accounts that may launch: the inventory's read of the AMIs already needs it.
PERMISSIONS: list[str] = ["ec2:DescribeImageAttribute", "ec2:DescribeImages"]


def load_launch_permissions(
    clients: RegionClients, inventory: RegionInventory, image_ids: Iterable[str]
) -> RegionInventory:
    """The inventory with `launch_permissions` loaded for those of `image_ids` it holds."""
    if inventory.error is not None:
        return inventory
    wanted = set(image_ids)
    unread = list(dict.fromkeys(i.image_id for i in inventory.images if i.image_id in wanted))
    ec2 = clients.ec2  # made before the threads share it
    try:
        with (
            source("ec2:DescribeImageAttribute"),
            ThreadPoolExecutor(max_workers=max(1, min(clients.read_workers, len(unread)))) as pool,
        ):
            answers = list(pool.map(lambda image_id: read_launch_permissions(ec2, image_id), unread))
    except SourceFailed as failure:
        return RegionInventory(region=inventory.region, notes=inventory.notes, error=str(failure))
    permissions = dict(zip(unread, answers, strict=True))
    images = tuple(
        image.model_copy(update={"launch_permissions": permissions[image.image_id]})
        if image.image_id in permissions
        else image
        for image in inventory.images
    )
    return inventory._replace(images=images)


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


def load_lost_grants(
    clients: RegionClients, inventory: RegionInventory, policy: Policy, day: int = 0
) -> RegionInventory:
    """The inventory with the launch permissions of the AMIs that may have lost a grant the janitor made
    (or one its family lists that it found in place), so that their share grants it again: DisableImage
    removes every launch permission and EnableImage restores none (and an owner may revoke one by hand),
    while the ledger still records the grants as made (or found). Which AMIs each account may launch
    is one paginated DescribeImages per account recorded, several at once, and only the AMIs that lost
    one are read. EC2 cannot be asked the same of an
    organization or OU: the AMIs granted one are read, at most sharing.ORGANIZATION_CHECKS_PER_RUN a
    run, in turns by `day` (sharing.organization_checks). Nothing recorded: no call."""
    if inventory.error is not None:
        return inventory
    # Only where a lost grant would be granted again: not in a family matched by tags alone.
    expected = sharing.grants_checked(policy, inventory.images)
    granted = {image_id: sharing.accounts_in(grants) for image_id, grants in expected.items()}
    accounts = sorted(set().union(*granted.values()))
    checked = sharing.organization_checks(expected, day)
    lost: list[str] = []
    if accounts:
        ec2 = clients.ec2  # made before the threads share it

        def launchable_by(account: str) -> set[str]:
            pages = items(ec2, "describe_images", "Images", 1000, Owners=["self"], ExecutableUsers=[account])
            return {str(raw.get("ImageId")) for raw in pages}

        try:
            with (
                source("ec2:DescribeImages"),
                ThreadPoolExecutor(max_workers=max(1, min(clients.read_workers, len(accounts)))) as pool,
            ):
                launchable = dict(zip(accounts, pool.map(launchable_by, accounts), strict=True))
        except SourceFailed as failure:
            return RegionInventory(region=inventory.region, notes=inventory.notes, error=str(failure))
        lost = [
            image_id
            for image_id, recorded in granted.items()
            if any(image_id not in launchable[account] for account in recorded)
        ]
    wanted = list(dict.fromkeys([*lost, *checked]))
    return load_launch_permissions(clients, inventory, wanted) if wanted else inventory
