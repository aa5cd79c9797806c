"""Applying share_with: launch permission changes and the record of what the janitor granted."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from ami_janitor.aws.errors import AWS_ERRORS, error_text
from ami_janitor.core.model import Image, LaunchPermission, RegionInventory, Share
from ami_janitor.core.policy import SHARED_BY_JANITOR_TAG
from ami_janitor.core.sharing import recorded_grants
from ami_janitor.core.tags import part_keys, split_values

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import LaunchPermissionTypeDef

    from ami_janitor.aws.clients import RegionClients


PERMISSIONS: list[str] = sorted(["ec2:CreateTags", "ec2:DeleteTags", "ec2:ModifyImageAttribute"])

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
                    error=error_text(error),
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
