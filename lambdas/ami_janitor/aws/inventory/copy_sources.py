"""The sources of copies the ledger does not record (made by hand, or by another tool): a copy's age
and order are its source's, as EC2 reports the source in its own region, so a late copy of an old AMI
never counts as young, nor as the newest of its group."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from ami_janitor.aws.errors import is_denied
from ami_janitor.aws.inventory.images import FILTER_VALUES_MAX
from ami_janitor.aws.inventory.reading import SourceFailed, chunks, items, source
from ami_janitor.core.model import Image, api_time
from ami_janitor.core.policy import Policy

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

PERMISSIONS: list[str] = ["ec2:DescribeImages"]


def _unrecorded(image: Image, policy: Policy) -> bool:
    if image.copied_from is None:  # most AMIs: not a copy
        return False
    record = image.replica_record
    if record is not None and record.source_created is not None:
        return False
    return any(family.match.matches(image.name, image.tags) for family in policy.families)


def read_copy_sources(
    images: tuple[Image, ...], region: str, policy: Policy, ec2_in: Callable[[str], EC2Client]
) -> tuple[tuple[Image, ...], list[str]]:
    """`images` (their ledger items attached) with the source creation of each family's copy the
    ledger does not record, and a note for each whose source is not visible (deregistered, or another
    account's no longer shared, or its region one the account may not read): it counts from its own
    creation, as before any read. Sources in `region` are its own AMIs; the others are asked for in
    their region (`ec2_in`), 200 ids a call. Any other failure of that read raises SourceFailed: the
    copies' order is not known, and a late copy of an old AMI would take a keep slot or Latest."""
    copies = [image for image in images if _unrecorded(image, policy)]
    if not copies:
        return images, []
    # A source in this region is one of its AMIs (its own order, a copy's own source included).
    created = {image.image_id: image.order_time for image in images}
    wanted: dict[str, set[str]] = defaultdict(set)
    for copy in copies:
        source_id = str(copy.copied_from)
        if source_id not in created:
            wanted[copy.copied_from_region or region].add(source_id)
    unreadable: dict[str, str] = {}
    for source_region, ids in sorted(wanted.items()):
        try:
            with source(f"ec2:DescribeImages (the sources of copies, in {source_region})"):
                created.update(_creation(ec2_in(source_region), sorted(ids)))
        except SourceFailed as failure:
            # A region the account may not read (a region-deny SCP, an opt-in region turned off) must
            # not stop every plan and event here for good; a passing failure stops this one.
            # Any other failure (throttling, a 5xx, a lost or malformed answer) may pass, and a copy
            # whose source it hid would count as newer than it is.
            if not is_denied(failure.__cause__ or failure):
                raise
            unreadable[source_region] = str(failure)
    sources = {copy.image_id: created.get(str(copy.copied_from)) for copy in copies}
    notes: list[str] = []
    for copy in copies:
        if sources[copy.image_id] is None:
            source_region = copy.copied_from_region or region
            why = (
                f"not readable ({unreadable[source_region]})"
                if source_region in unreadable
                else "not visible"
            )
            notes.append(
                f"{copy.image_id} is a copy of {copy.copied_from} ({source_region}), which is {why}: it "
                "counts from its own creation"
            )
    return tuple(
        image.model_copy(update={"copied_from_created": sources[image.image_id]})
        if sources.get(image.image_id) is not None
        else image
        for image in images
    ), notes


def _creation(ec2: EC2Client, image_ids: list[str]) -> dict[str, datetime]:
    """Each visible AMI's CreationDate (its owner any account: a copy may be of a shared AMI)."""
    created: dict[str, datetime] = {}
    for batch in chunks(image_ids, FILTER_VALUES_MAX):
        filters = [{"Name": "image-id", "Values": batch}]
        for raw in items(
            ec2,
            "describe_images",
            "Images",
            1000,
            Filters=filters,
            IncludeDeprecated=True,
            IncludeDisabled=True,
        ):
            # Listed, it has a CreationDate (EC2 always gives one): one missing or no time is a
            # malformed answer, never a source gone (the copy would count from its own creation).
            when = api_time(raw, "CreationDate", f"image {raw.get('ImageId')}")
            if when is None:
                raise ValueError(f"image {raw.get('ImageId')} has no CreationDate")
            created[str(raw["ImageId"])] = when
    return created
