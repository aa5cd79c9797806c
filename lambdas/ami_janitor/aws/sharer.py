"""Applying share_with: launch permission changes and the record of what the janitor granted.

The ledger records a grant before ModifyImageAttribute makes it, marked as not yet made until the call
answers, and forgets a grant after it is revoked: a crash in between leaves a grant recorded and marked
(the next run grants it again while the family lists it, and revokes it when it does not), never one
made that the janitor could not revoke. Where the grant fails (throttled past the SDK's
retries, image block public access, an answer lost after it took effect), the launch permissions are
read back and the grants EC2 does not show are taken back from the record, so the next run grants them
again. Before it grants, the janitor reads the AMI's launch permissions (where the inventory does not
hold them already): a grant EC2 already shows was made by somebody else (shared by hand before the family
listed it), so it is neither made nor recorded as the janitor's, but recorded apart (`grants_found`), never to
be revoked by the janitor. The public group is granted in a call of its own, so that a refusal of it takes no
account's grant with it. The tag `ami-janitor:shared` is written last, as a mirror for people. No share
where the region has no ledger.
"""

from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Literal, cast

from pydantic import BaseModel, ConfigDict

from ami_janitor.aws.errors import AWS_ERRORS, error_text, is_passing
from ami_janitor.aws.inventory import read_launch_permissions
from ami_janitor.aws.ledger import Ledger, LedgerFor
from ami_janitor.core.model import Image, LaunchPermission, RegionInventory, Share
from ami_janitor.core.policy import SHARED_BY_JANITOR_TAG
from ami_janitor.core.sharing import public_apart, recorded_grants
from ami_janitor.core.tags import part_keys, split_values

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import LaunchPermissionTypeDef

    from ami_janitor.aws.clients import RegionClients


# The change and its mirror tag; the read before a grant (the AMI event's too, engine.handle_ami_event)
# and the read-back of a grant that failed; the ledger's item write (record_grants, confirm_grants,
# forget_grants, record_found).
PERMISSIONS: list[str] = sorted(
    [
        "dynamodb:UpdateItem",
        "ec2:CreateTags",
        "ec2:DeleteTags",
        "ec2:DescribeImageAttribute",
        "ec2:ModifyImageAttribute",
    ]
)

ShareStatus = Literal["ok", "failed"]


class ShareResult(BaseModel):
    """What apply_shares did to one AMI."""

    model_config = ConfigDict(frozen=True)

    region: str
    image_id: str
    status: ShareStatus
    added: list[str] = []
    removed: list[str] = []
    error: str | None = None
    detail: str | None = None
    # A failure that may pass (throttling, a 5xx, a lost answer): the AMI event is tried again for it.
    passing: bool = False


def _permissions(keys: Iterable[str]) -> "list[LaunchPermissionTypeDef]":
    return cast("list[LaunchPermissionTypeDef]", [LaunchPermission.from_key(k).to_api() for k in keys])


def _write_record(ec2: "EC2Client", image: Image, grants: set[str]) -> bool:
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


def _grant(ec2: "EC2Client", ledger: Ledger, image_id: str, grants: list[str]) -> None:
    # Recorded first: no grant exists that the ledger does not know the janitor made.
    ledger.record_grants(image_id, grants)
    try:
        ec2.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": _permissions(grants)})
        ledger.confirm_grants(image_id, grants)  # where this write fails, the next run grants them again
    except AWS_ERRORS:
        # A refusal granted nothing, but an error may also be an answer lost after the grant took
        # effect (a timeout, a closed connection): what EC2 shows is read back and only the grants it does not show are taken back, so
        # the next run makes them again (where the read or the write fails, the record stays, as after
        # a crash).
        with suppress(*AWS_ERRORS):
            shown = {p.key for p in read_launch_permissions(ec2, image_id)}
            ledger.forget_grants(image_id, [g for g in grants if g not in shown])
            ledger.confirm_grants(image_id, [g for g in grants if g in shown])
        raise


def _missing(ec2: "EC2Client", ledger: Ledger, image: Image, grants: list[str], done: list[str]) -> list[str]:
    """The planned grants EC2 does not show on the AMI yet, which the janitor makes. One it shows is not
    made again: the janitor's own (recorded, its answer lost) is confirmed; any other was made by
    somebody else and is recorded apart (`grants_found`), never as the janitor's, which would revoke it once the
    family stops listing it."""
    permissions = image.launch_permissions
    if permissions is None:
        permissions = read_launch_permissions(ec2, image.image_id)
    shown = {p.key for p in permissions}
    own = recorded_grants(image)
    ledger.confirm_grants(image.image_id, [g for g in grants if g in shown and g in own])
    found = [g for g in grants if g in shown and g not in own]
    if found:
        ledger.record_found(image.image_id, found)
        done.append("already shared, not by the janitor: " + ",".join(found))
    return [g for g in grants if g not in shown]


def _apply(ec2: "EC2Client", ledger: Ledger, share: Share, image: Image, done: list[str]) -> list[str]:
    """Grants, then revocations, then the mirror; returns what was granted. A grant EC2 refuses (the
    public group under image block public access, every run it stays on) fails the result but stops
    neither the other grant call nor the revocations: a grant the family no longer lists is revoked all
    the same."""
    granted: list[str] = []
    refused: Exception | None = None
    wanted = _missing(ec2, ledger, image, list(share.add), done) if share.add else []
    for call in public_apart(wanted):
        try:
            _grant(ec2, ledger, image.image_id, call)
        except AWS_ERRORS as error:
            refused = refused or error
            continue
        granted.extend(call)
        done.append("granted " + ",".join(call))
    if share.remove:
        ec2.modify_image_attribute(
            ImageId=image.image_id, LaunchPermission={"Remove": _permissions(share.remove)}
        )
        done.append("revoked " + ",".join(share.remove))
        # Forgotten after: a crash in between revokes it again (idempotent).
        ledger.forget_grants(image.image_id, share.remove)
    # The mirror, last.
    grants = (recorded_grants(image) | set(granted)) - set(share.remove)
    if _write_record(ec2, image, grants):
        done.append("record updated")
    if refused is not None:
        raise refused
    return granted


def apply_shares(
    clients_for: "Callable[[str], RegionClients]",
    shares: Sequence[Share],
    inventories: Sequence[RegionInventory],
    ledger_for: LedgerFor,
) -> list[ShareResult]:
    """Apply the planned changes (the inventories hold each AMI's current tags and ledger item, and say
    whether the region has a ledger table). Idempotent; an AWS error fails that AMI's result, never the
    run; a region without a ledger table fails its shares before any call."""
    images = {(inv.region, image.image_id): image for inv in inventories for image in inv.images}
    recorded = {inv.region for inv in inventories if inv.ledger is not None}
    results: list[ShareResult] = []
    for share in shares:
        image = images.get((share.region, share.image_id))
        refusal = "not in the region's inventory" if image is None else None
        if share.region not in recorded:
            refusal = f"no ledger table in {share.region}: not shared (every grant is recorded first)"
        if image is None or refusal is not None:
            results.append(
                ShareResult(region=share.region, image_id=share.image_id, status="failed", error=refusal)
            )
            continue
        done: list[str] = []
        try:
            granted = _apply(clients_for(share.region).ec2, ledger_for(share.region), share, image, done)
        except (*AWS_ERRORS, ValueError) as error:
            results.append(
                ShareResult(
                    region=share.region,
                    image_id=share.image_id,
                    status="failed",
                    error=error_text(error),
                    detail="; ".join(done) or None,
                    passing=is_passing(error),
                )
            )
            continue
        results.append(
            ShareResult(
                region=share.region,
                image_id=share.image_id,
                status="ok",
                added=[g for g in share.add if g in granted],
                removed=list(share.remove),
                detail="; ".join(done) or None,
            )
        )
    return results
