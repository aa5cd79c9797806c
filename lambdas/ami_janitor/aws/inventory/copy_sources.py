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


def _follows(image: Image) -> bool:
    """A copy whose order is its source's, which the ledger does not record."""
    if image.copied_from is None:  # most AMIs: not a copy
        return False
    record = image.replica_record
    return record is None or record.source_created is None


def _unrecorded(image: Image, policy: Policy) -> bool:
    return _follows(image) and any(family.match.matches(image.name, image.tags) for family in policy.families)


def _chain(copy: Image, local: dict[str, Image], region: str) -> tuple[list[Image], str, str]:
    """The copies of this region that `copy` was made from, one from the other (a copy of a copy, say
    encrypted twice by hand; whichever family they are in), and the AMI the chain starts from: its id
    and region. That AMI is this region's own (its order) or another region's (asked for there)."""
    links: list[Image] = []
    at = copy
    while True:
        source_id, source_region = str(at.copied_from), at.copied_from_region or region
        found = local.get(source_id) if source_region == region else None
        if found is None or not _follows(found) or found is copy or any(found is link for link in links):
            return links, source_id, source_region
        links.append(found)
        at = found


def read_copy_sources(
    images: tuple[Image, ...], region: str, policy: Policy, ec2_in: Callable[[str], EC2Client]
) -> tuple[tuple[Image, ...], list[str]]:
    """`images` (their ledger items attached) with the source creation of each family's copy the
    ledger does not record, and a note for each whose source is not visible (deregistered, or another
    account's no longer shared, or its region one the account may not read): it counts from its own
    creation, as before any read. Sources in `region` are its own AMIs; the others are asked for in
    their region (`ec2_in`), 200 ids a call. A copy of such a copy of this region (encrypted twice by
    hand) counts from the AMI the chain starts from, else from the oldest copy along it. Any other failure of that read raises SourceFailed: the
    copies' order is not known, and a late copy of an old AMI would take a keep slot or Latest."""
    copies = [image for image in images if _unrecorded(image, policy)]
    if not copies:
        return images, []
    # A source in this region is one of its AMIs (its own order, a recorded copy's source included).
    local = {image.image_id: image for image in images}
    chains = {copy.image_id: _chain(copy, local, region) for copy in copies}
    created = {
        start: local[start].order_time
        for _links, start, start_region in chains.values()
        if start_region == region and start in local
    }
    wanted: dict[str, set[str]] = defaultdict(set)
    for _links, start, start_region in chains.values():
        if start not in created:
            wanted[start_region].add(start)
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
    # A copy of a copy counts from the oldest it is seen to come from: the AMI the chain starts from,
    # else (that one not visible) the oldest copy along it.
    sources = {
        copy_id: min(
            [*([created[start]] if start in created else []), *(link.created for link in links)], default=None
        )
        for copy_id, (links, start, _start_region) in chains.items()
    }
    notes: list[str] = []
    for copy in copies:
        links, start, start_region = chains[copy.image_id]
        if start in created:
            continue
        why = f"not readable ({unreadable[start_region]})" if start_region in unreadable else "not visible"
        through = f" through {', '.join(link.image_id for link in links)}" if links else ""
        counted = (
            f"the creation of {min(links, key=lambda link: link.created).image_id}"
            if links
            else "its own creation"
        )
        notes.append(
            f"{copy.image_id} is a copy of {start} ({start_region}){through}, which is {why}: it counts from {counted}"
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
