"""Launch permissions from `share_with`: grant what the family lists, revoke only what the janitor granted.

What the janitor granted is recorded on the AMI (`ami-janitor:shared`, then `:2`, `:3`, ... when the
list outgrows one tag value). Planning compares that record with the policy, so the steady state costs
no call per AMI (DescribeImageAttribute is one call per AMI); `Public` comes with DescribeImages, so a
public AMI whose family does not say `public: true` is always seen. Grants somebody else made are left
alone (the planner reports them, and they keep the AMI unless `allow_shared`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Literal, cast

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field

from ami_janitor.model import Image, LaunchPermission, RegionInventory, Share
from ami_janitor.planner import build_groups
from ami_janitor.policy import CANDIDATE_TAG, SHARED_BY_JANITOR_TAG, Family, Policy
from ami_janitor.tags import joined_values, part_keys, split_values

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import LaunchPermissionTypeDef

    from ami_janitor.clients import RegionClients

PERMISSIONS: list[str] = sorted(["ec2:CreateTags", "ec2:DeleteTags", "ec2:ModifyImageAttribute"])

PUBLIC = "group:all"
AWS_ERRORS = (ClientError, BotoCoreError)

ShareStatus = Literal["ok", "failed"]


class ShareResult(BaseModel):
    """What apply_shares did to one AMI."""

    model_config = ConfigDict(frozen=True)

    region: str
    image_id: str
    status: ShareStatus
    added: list[str] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)
    error: str | None = None
    detail: str | None = None


# ---- planning (pure) ------------------------------------------------------------------------------


def _is_grant(key: str) -> bool:
    kind, _, value = key.partition(":")
    return key == PUBLIC or (kind in ("user", "org", "ou") and value != "")


def recorded_grants(image: Image) -> set[str]:
    """The grants the janitor recorded on the AMI ("kind:value" keys); unreadable entries are ignored."""
    return {key for key in joined_values(SHARED_BY_JANITOR_TAG, image.tags) if _is_grant(key)}


def desired_grants(family: Family) -> set[str]:
    """What the family shares: its share_with, plus the public group where it says public: true."""
    grants = set(family.share_with.grants())
    if family.public:
        grants.add(PUBLIC)
    return grants


def share_for(image: Image, family: Family) -> Share | None:
    """The change one member of `family` needs, or None.

    Only available AMIs that are not candidates: a disabled AMI has no launch permissions, and a
    candidate's permissions belong to the retirement stages (the disable stage records and removes them,
    a rescue restores them)."""
    if image.state != "available" or CANDIDATE_TAG in image.tags:
        return None
    desired = desired_grants(family)
    recorded = recorded_grants(image)
    add = desired - recorded
    if image.launch_permissions is not None:
        # Loaded for this AMI anyway: a grant removed by hand is granted again.
        add |= desired - {p.key for p in image.launch_permissions}
    if PUBLIC in desired and not image.public:
        add.add(PUBLIC)
    remove = recorded - desired
    if image.public and PUBLIC not in desired:
        remove.add(PUBLIC)  # whoever made it public: only `public: true` allows it
    if not add and not remove:
        return None
    return Share(image_id=image.image_id, region=image.region, add=sorted(add), remove=sorted(remove))


def plan_shares(inventories: Sequence[RegionInventory], policy: Policy, now: datetime) -> list[Share]:
    """The launch permission changes of every managed AMI (sources and replicas) in every region with a
    usable inventory. Order: region, family, architecture, newest first. AMIs of several families are
    left alone (a policy error the planner reports). `now` is unused: shares do not depend on age."""
    del now
    shares: list[Share] = []
    for inventory in sorted(inventories, key=lambda inv: inv.region):
        if inventory.error is not None:
            continue
        groups, conflicts = build_groups(inventory, policy)
        for group in groups:
            for image in group.members:
                share = None if image.image_id in conflicts else share_for(image, group.family)
                if share is not None:
                    shares.append(share)
    return shares


# ---- applying ---------------------------------------------------------------------------------------


def _error_text(error: Exception) -> str:
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        return f"{info.get('Code', 'Unknown')}: {info.get('Message', '')}".rstrip(": ")
    return str(error) or type(error).__name__


def _permissions(keys: Iterable[str]) -> list[LaunchPermissionTypeDef]:
    return cast("list[LaunchPermissionTypeDef]", [LaunchPermission.from_key(k).to_api() for k in keys])


def _write_record(ec2: EC2Client, image: Image, grants: set[str]) -> bool:
    """Rewrite the record to `grants`; returns whether a tag changed. New parts are written before stale
    ones are deleted: each part holds whole grants, so a crash in between leaves extra grants recorded
    (removed by the next run), never a grant the janitor made and forgot."""
    record = split_values(SHARED_BY_JANITOR_TAG, grants) if grants else {}
    changed = {key: value for key, value in record.items() if image.tags.get(key) != value}
    stale = [key for key in part_keys(SHARED_BY_JANITOR_TAG, image.tags) if key not in record]
    if changed:
        ec2.create_tags(
            Resources=[image.image_id], Tags=[{"Key": key, "Value": value} for key, value in changed.items()]
        )
    if stale:
        ec2.delete_tags(Resources=[image.image_id], Tags=[{"Key": key} for key in stale])
    return bool(changed or stale)


def _apply(ec2: EC2Client, share: Share, image: Image, done: list[str]) -> None:
    # The change first, then the record: a crash in between repeats the change (idempotent) instead of
    # recording a grant that was never made or forgetting one that was.
    if share.add:
        ec2.modify_image_attribute(ImageId=image.image_id, LaunchPermission={"Add": _permissions(share.add)})
        done.append("granted " + ",".join(share.add))
    if share.remove:
        ec2.modify_image_attribute(
            ImageId=image.image_id, LaunchPermission={"Remove": _permissions(share.remove)}
        )
        done.append("revoked " + ",".join(share.remove))
    grants = (recorded_grants(image) | set(share.add)) - set(share.remove)
    if _write_record(ec2, image, grants):
        done.append("record updated")


def apply_shares(
    clients_for: Callable[[str], RegionClients],
    shares: Sequence[Share],
    inventories: Sequence[RegionInventory],
) -> list[ShareResult]:
    """Apply the planned changes (the inventories hold each AMI's current tags). Idempotent; an AWS error
    fails that AMI's result, never the run."""
    images = {(inv.region, image.image_id): image for inv in inventories for image in inv.images}
    results: list[ShareResult] = []
    for share in shares:
        image = images.get((share.region, share.image_id))
        if image is None:
            results.append(
                ShareResult(
                    region=share.region,
                    image_id=share.image_id,
                    status="failed",
                    error="not in the region's inventory",
                )
            )
            continue
        done: list[str] = []
        try:
            _apply(clients_for(share.region).ec2, share, image, done)
        except (*AWS_ERRORS, ValueError) as error:
            results.append(
                ShareResult(
                    region=share.region,
                    image_id=share.image_id,
                    status="failed",
                    error=_error_text(error),
                    detail="; ".join(done) or None,
                )
            )
            continue
        results.append(
            ShareResult(
                region=share.region,
                image_id=share.image_id,
                status="ok",
                added=list(share.add),
                removed=list(share.remove),
                detail="; ".join(done) or None,
            )
        )
    return results
