"""The sources of copies the ledger does not record (made by hand, or by another tool): a copy's age
and order are its source's, as EC2 reports the source in its own region, so a late copy of an old AMI
never counts as young, nor as the newest of its group."""

from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

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
    images: tuple[Image, ...], region: str, policy: Policy, ec2_in: Callable[[str], "EC2Client"]
) -> tuple[tuple[Image, ...], list[str]]:
    """`images` (their ledger items attached) with the source creation of each family's copy the
    ledger does not record, and a note for each whose source is not visible (deregistered, or another
    account's no longer shared, or its region one the account may not read): it counts from its own
    creation, as before any read. Sources in `region` are its own AMIs; the others are asked for in
    their region (`ec2_in`), 200 ids a call. A copy of such a copy counts from the AMI the chain starts
    from, else from the oldest AMI seen along it: the copies of this region from its AMIs, then, where
    the AMI asked for in another region is a copy too (made by hand there), its source, asked for in its
    region, up to MAX_HOPS of them (one call a region a step, for all the chains at that step). Any other
    failure of a read raises SourceFailed: the copies' order is not known, and a late copy of an old AMI
    would take a keep slot or Latest."""
    copies = [image for image in images if _unrecorded(image, policy)]
    if not copies:
        return images, []
    # A source in this region is one of its AMIs (its own order, a recorded copy's source included).
    local = {image.image_id: image for image in images}
    chains = {copy.image_id: _chain(copy, local, region) for copy in copies}
    # Where each chain now starts (the AMI asked for next), the other regions' AMIs it went through,
    # and the creation of each AMI seen along it.
    starts = {copy_id: (start, start_region) for copy_id, (_links, start, start_region) in chains.items()}
    remote: dict[str, list[tuple[str, str]]] = {copy_id: [] for copy_id in chains}
    seen: dict[str, list[tuple[datetime, str]]] = {
        copy_id: [(link.created, link.image_id) for link in links]
        for copy_id, (links, _start, _region) in chains.items()
    }
    described: dict[tuple[str, str], _Described | None] = {}
    unreadable: dict[str, str] = {}
    open_chains = set(chains)
    for _hop in range(MAX_HOPS):
        wanted: dict[str, set[str]] = defaultdict(set)
        for copy_id in sorted(open_chains):
            start, start_region = starts[copy_id]
            if start_region == region and start in local:
                described[start, start_region] = _Described(local[start].order_time, None, None)
            elif (start, start_region) not in described and start_region not in unreadable:
                wanted[start_region].add(start)
        for source_region, ids in sorted(wanted.items()):
            try:
                with source(f"ec2:DescribeImages (the sources of copies, in {source_region})"):
                    found = _described(ec2_in(source_region), source_region, sorted(ids))
            except SourceFailed as failure:
                # A region the account may not read (a region-deny SCP, an opt-in region turned off)
                # must not stop every plan and event here for good; a passing failure stops this one.
                # Any other failure (throttling, a 5xx, a lost or malformed answer) may pass, and a
                # copy whose source it hid would count as newer than it is.
                if not is_denied(failure.__cause__ or failure):
                    raise
                unreadable[source_region] = str(failure)
                continue
            described.update({(i, source_region): found.get(i) for i in ids})
        # Each chain takes one step: to the source of the AMI it starts from, where that one is a copy
        # too (made by hand in another region, say) and not one the chain has been through.
        for copy_id in sorted(open_chains):
            at = described.get(starts[copy_id])
            if at is None:
                open_chains.discard(copy_id)
                continue
            seen[copy_id].append((at.created, starts[copy_id][0]))
            if at.copied_from is None or at.copied_from_region is None:
                open_chains.discard(copy_id)
                continue
            following = (at.copied_from, at.copied_from_region)
            if following in remote[copy_id] or following == (copy_id, region):  # a loop
                open_chains.discard(copy_id)
                continue
            remote[copy_id].append(starts[copy_id])
            starts[copy_id] = following
        if not open_chains:
            break
    notes: list[str] = []
    for copy in copies:
        start, start_region = starts[copy.image_id]
        if described.get((start, start_region)) is not None:
            continue
        if copy.image_id in open_chains:
            why = f"more than {MAX_HOPS} AMIs of other regions away (not followed further)"
        elif start_region in unreadable:
            why = f"not readable ({unreadable[start_region]})"
        else:
            why = "not visible"
        links = chains[copy.image_id][0]
        through = [link.image_id for link in links] + [f"{i} ({r})" for i, r in remote[copy.image_id]]
        via = f" through {', '.join(through)}" if through else ""
        oldest = min(seen[copy.image_id], default=None)
        counted = f"the creation of {oldest[1]}" if oldest is not None else "its own creation"
        notes.append(
            f"{copy.image_id} is a copy of {start} ({start_region}){via}, which is {why}: it counts from {counted}"
        )
    # A copy counts from the oldest AMI it is seen to come from: the AMI its chain starts from, else (that
    # one not visible) the oldest copy along it.
    return tuple(
        image.model_copy(update={"copied_from_created": min(seen[image.image_id])[0]})
        if seen.get(image.image_id)
        else image
        for image in images
    ), notes


# How many AMIs in other regions a chain of hand-made copies is followed through.
MAX_HOPS = 8


class _Described(NamedTuple):
    created: datetime
    copied_from: str | None
    copied_from_region: str | None


def _described(ec2: "EC2Client", region: str, image_ids: list[str]) -> "dict[str, _Described]":
    """Each visible AMI's CreationDate (its owner any account: a copy may be of a shared AMI) and, where
    it is a copy too, its source as EC2 says."""
    found: dict[str, _Described] = {}
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
            copied_from = raw.get("SourceImageId") or None
            found[str(raw["ImageId"])] = _Described(
                when,
                str(copied_from) if copied_from else None,
                str(raw.get("SourceImageRegion") or region) if copied_from else None,
            )
    return found
