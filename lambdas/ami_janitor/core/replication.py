"""Replication: which copies each target region needs (pure), and starting one copy (idempotent).

A target gets the copies its own group would keep: planned against the target group as it will be once
the copies in flight and the copies planned now are available (core.planner.kept_by_rank), so a fresh
copy is never a candidate there, and a copy the janitor retired is made again only when its source is
once more among those its group keeps.

A copy is found by provenance, never by name or tag: EC2 says what an AMI was copied from
(SourceImageId/SourceImageRegion) and the ledger of its region records that the janitor made it (its
`replica`), so a duplicate event, a redriven message or a second planner never makes a second copy, and
no tag makes an AMI a copy (or an original superseded by one). A copy that fails (or is gone without the
janitor retiring it: deregistered by hand) is started again with the next generation, until
MAX_COPY_GENERATIONS generations failed; a copy the janitor retired is no failure. The generation is part
of the ClientToken, because EC2 remembers a token and would answer a new request with the old (failed or
deregistered) copy, so a retired copy made again takes the next generation too. Each generation is
recorded in the source's ledger item (its `copies`) before CopyImage is called, so a generation is never
used twice, and in the copy's own item after, so the retry of a failed copy can be planned from the copy
alone (its event arrives in the destination region). A generation recorded on the source but on no copy
was interrupted between the two writes: it is started again with the same token (EC2 answers with the
copy it made, if any). Once the copy's item records it, the source's record gets the copy's id too: a
retired copy's item expires (`retention_days`), and its generation, made and no longer listed by EC2,
then takes the next one; a copy EC2 still lists whose item was lost (the table restored or made again)
is taken back by the worker, its item written again without CopyImage.
"""

import hashlib
import heapq
import itertools
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ami_janitor.core.keys import KeyResolutions, LastKeys, ResolvedKey, last_keys, target_key
from ami_janitor.core.keys import inventory_records as _records
from ami_janitor.core.model import Copy, Image, LedgerCopy, RegionInventory, Status, iso
from ami_janitor.core.planner import Group, Grouped, build_groups, kept_by_rank, order_key, superseded_ids
from ami_janitor.core.policy import (
    COPY_GENERATION_TAG_PREFIX,
    JANITOR_TAG_PREFIX,
    SOURCE_CREATED_TAG,
    SOURCE_IMAGE_TAG,
    SOURCE_REGION_TAG,
    Family,
    Policy,
    ReplicateTarget,
    alias_name,
)
from ami_janitor.core.validation import describe_validation_error

# Generations of a copy that may fail (or go without the janitor retiring them) before it is given up
# and reported.
MAX_COPY_GENERATIONS = 3

# EC2 allows this many AMI copies in flight (pending) per destination region; CopyImage past it is
# refused (ResourceLimitExceeded). Copies past it wait for a later run.
MAX_CONCURRENT_COPIES = 300

# States of a copy that failed (EC2 says so): it needs a new generation.
FAILED_STATES = frozenset({"failed", "error", "invalid"})

# States in which a copy will never become usable (failed, or on its way out of the listing).
UNUSABLE_STATES = FAILED_STATES | {"deregistered"}

NAME_MAX = 128  # AMI names: 3-128 characters
# Where a suffix may go inside a name (AMI names allow letters, digits and ( ) [ ] space . / - ' @ _).
NAME_SEPARATORS = "-_./ "


DESCRIPTION_MAX = 255

TAGS_PER_RESOURCE_MAX = 50


ENCRYPTED_SUFFIX = "-encrypted"


class CopyResult(BaseModel):
    """What start_copy did: started or found a copy (ok), left it to a newer request (skipped), or failed."""

    model_config = ConfigDict(frozen=True)

    family: str
    source_image_id: str
    source_region: str
    region: str
    generation: int
    image_id: str | None = None
    status: Status
    # True only when this call made CopyImage start a new copy.
    started: bool = False
    error: str | None = None
    detail: str | None = None

    @classmethod
    def of(
        cls, copy: Copy, status: Status, *, error: str | None = None, detail: str | None = None
    ) -> "CopyResult":
        return cls(
            family=copy.family,
            source_image_id=copy.source_image_id,
            source_region=copy.source_region,
            region=copy.region,
            generation=copy.generation,
            status=status,
            error=error,
            detail=detail,
        )


class Retry(NamedTuple):
    """The answer to a failed replica: the copy to start again (None: none), and why."""

    copy: Copy | None
    reason: str


class BadCopyMessage(ValueError):
    """A copy request the worker cannot use; the message names the field. Redriving it cannot help,
    so it ends in the queue's dead-letter queue."""


class RefusedCopy(BadCopyMessage):
    """A well-formed copy request the policy would not make (anyone who may send to the queue could
    have written it, or an earlier policy made it): refused, it ends in the dead-letter queue too."""

    def __init__(self, reason: str, request: Copy) -> None:
        super().__init__(f"copy request refused: {reason}")
        self.reason = reason
        self.request = request


def copy_to(
    family: str,
    source_image_id: str,
    source_region: str,
    target: ReplicateTarget,
    generation: int,
    kms_key_arn: str | None = None,
) -> Copy:
    """A copy request to `target`, with the key the policy configures there (never another); an alias
    with the key ARN it was resolved to (`kms_key_arn`; None: not resolved, or kms_key_id is the ARN)."""
    return Copy(
        family=family,
        source_image_id=source_image_id,
        source_region=source_region,
        region=target.region,
        kms_key_id=target.kms_key_id,
        generation=generation,
        kms_key_arn=kms_key_arn if target.kms_alias is not None else None,
    )


def generation_tag(region: str) -> str:
    """The tag that mirrors, on a copy, the generation of the copy in `region` (for people: the ledger
    holds the record)."""
    return f"{COPY_GENERATION_TAG_PREFIX}{region}"


def recorded_generation(source: Image, region: str) -> int:
    """The highest generation of a copy to `region` the source's ledger item records; 0 where none."""
    if source.ledger is None:
        return 0
    return max((c.generation for c in source.ledger.copies if c.region == region), default=0)


def source_record(source: Image, region: str, generation: int) -> LedgerCopy | None:
    """The source's record of its copy to `region` of that generation; None where its item has none."""
    if source.ledger is None:
        return None
    return next((c for c in source.ledger.copies if (c.region, c.generation) == (region, generation)), None)


def made_copy(source: Image, region: str, generation: int) -> str | None:
    """The copy of that generation the source's item records as made (its id, written once the copy's
    own item recorded it: Ledger.confirm_copy); None where it records none."""
    record = source_record(source, region, generation)
    return record.image_id if record is not None else None


def ledger_copy(copy: Copy, source: Image, started: datetime | None = None) -> LedgerCopy:
    """The ledger's record of a copy: on the source before CopyImage, on the copy after (with its id).
    Its `source_created` is the source's CreationDate as EC2 reports it (sources are never replicas);
    its key ARN is the one CopyImage is given (a later alias is checked against it)."""
    return LedgerCopy(
        source_image_id=copy.source_image_id,
        source_region=copy.source_region,
        region=copy.region,
        generation=copy.generation,
        token=client_token(copy),
        source_created=source.created,
        family=copy.family,
        kms_key_id=copy.kms_key_id,
        kms_key_arn=_copy_key(copy),
        started=started,
    )


def is_usable(image: Image) -> bool:
    """A copy that exists or will: pending, available, disabled (retired copies count as existing)."""
    return image.state not in UNUSABLE_STATES


def _copies_by_source(inventory: RegionInventory) -> dict[str, list[Image]]:
    index: dict[str, list[Image]] = defaultdict(list)
    for image in inventory.images:
        if image.source_image_id:
            index[image.source_image_id].append(image)
    return index


class RecordedCopies(NamedTuple):
    """What a target region's ledger records of the copies of one source: the generations whose CopyImage
    returned (any state, gone ones too), and those of them the janitor retired (no failure)."""

    generations: set[int]
    retired: set[int]

    @property
    def failed(self) -> set[int]:
        """Generations that failed or are gone without the janitor retiring them."""
        return self.generations - self.retired


def _replicas_recorded(inventory: RegionInventory) -> dict[tuple[str, str], RecordedCopies]:
    """(source, source region) -> the copies the region's ledger records. A copy the janitor retired is
    one whose item records its deregistration."""
    index: dict[tuple[str, str], RecordedCopies] = defaultdict(lambda: RecordedCopies(set(), set()))
    for item in inventory.ledger.items.values() if inventory.ledger is not None else ():
        if item.replica is not None:
            copies = index[(item.replica.source_image_id, item.replica.source_region)]
            copies.generations.add(item.replica.generation)
            if "deregister" in item.stages:
                copies.retired.add(item.replica.generation)
    return index


def _tried(source: Image, region: str, copies: Iterable[Image]) -> int:
    """The highest generation started so far, as the ledger records it on the source or on a copy."""
    made = [c.replica_record.generation for c in copies if c.replica_record is not None]
    return max([recorded_generation(source, region), *made])


def _failed_generations(copies: Iterable[Image]) -> set[int]:
    """The generations of these copies (as EC2 lists them, with their items) that failed or went without
    the janitor retiring them."""
    return {
        c.replica_record.generation
        for c in copies
        if c.replica_record is not None
        and not is_usable(c)
        and not (c.ledger is not None and "deregister" in c.ledger.stages)
    }


def _in_flight_as_available(image: Image) -> Image:
    """A copy being made counts as the available AMI it becomes (it will rank in its group)."""
    if image.state == "pending" and image.is_replica:
        return image.model_copy(update={"state": "available"})
    return image


def wanted_sources(target: Group, offered: Sequence[Image], now: datetime) -> set[str]:
    """Of the `offered` sources (available, none with a usable copy in the target group's region), those
    whose copy the target group would keep (planner.kept_by_rank): among its `keep_latest` newest members
    (by source creation) or its Latest, once the copies in flight and the offered copies are available. A
    copy carries no deprecation time, and a copy in its source's region stands in for the source."""
    # Every offered copy ranks and may be the Latest: only the keep_latest newest of them can be kept.
    newest = heapq.nlargest(target.rules.keep_latest, offered, key=order_key)
    ids = {source.image_id for source in newest}
    members = [_in_flight_as_available(m) for m in target.members if m.image_id not in ids]
    # The copy of a source, as the group sees it: the source's order, available, not deprecated.
    members += [s.model_copy(update={"region": target.region, "deprecation_time": None}) for s in newest]
    members.sort(key=order_key, reverse=True)
    prospect = target.with_members(members, superseded=set())
    prospect.superseded = superseded_ids(prospect)
    return ids & kept_by_rank(prospect, now)


def _targets(family: Family, region: str) -> tuple[list[ReplicateTarget], list[str]]:
    """The family's targets for sources in `region`, and the policy problems of that list."""
    usable: list[ReplicateTarget] = []
    problems: list[str] = []
    for target in sorted(family.replicate, key=lambda t: t.region):
        if target.region == region and target.kms_key_id is None:
            problems.append(
                f"family {family.name}: replicate target {region} is the source region and has no "
                "kms_key_id (a same-region copy only encrypts in place): ignored"
            )
            continue
        usable.append(target)
    return usable, problems


def _keyed_targets(
    family: Family, region: str, keys: KeyResolutions | None, last: LastKeys
) -> tuple[list[tuple[ReplicateTarget, str | None]], list[str]]:
    """The family's targets for sources in `region` with the key ARN of each (an alias resolved and
    checked against the ledger: see core.keys), and the problems of the others."""
    targets, problems = _targets(family, region)
    keyed: list[tuple[ReplicateTarget, str | None]] = []
    for target in targets:
        arn, problem = target_key(family.name, target, keys, last)
        if problem is not None:
            problems.append(problem)
        else:
            keyed.append((target, arn))
    return keyed, problems


def copies_of_new_source(
    source: Image, family: Family, keys: KeyResolutions | None = None, last: LastKeys | None = None
) -> list[Copy]:
    """The copies of new_source_copies, without the targets it skips."""
    return new_source_copies(source, family, keys, last)[0]


def new_source_copies(
    source: Image, family: Family, keys: KeyResolutions | None = None, last: LastKeys | None = None
) -> tuple[list[Copy], list[str]]:
    """The copies a source just made available needs (its `available` event), generation 1 each, and
    the targets skipped (an alias that cannot be resolved or that resolves to another key than the last
    copy's; a copy its ledger item records already, pass the source with it). A target with a recorded
    copy is the scheduled run's: only it reads whether that copy is still usable, and an old token
    would be answered with a copy failed, gone or retired since (an older source enabled again)."""
    if source.is_replica or source.root_device_type == "instance-store":
        return [], []
    targets, problems = _keyed_targets(family, source.region, keys, last or {})
    copies: list[Copy] = []
    for target, arn in targets:
        if target.region == source.region and source.encrypted:  # encrypt in place: unencrypted only
            continue
        recorded = recorded_generation(source, target.region)
        if recorded:
            problems.append(
                f"family {family.name}: copy of {source.image_id} to {target.region} recorded already "
                f"(generation {recorded}): the scheduled run checks it"
            )
            continue
        copies.append(copy_to(family.name, source.image_id, source.region, target, 1, arn))
    return copies, problems


def not_kept_by_its_group(image: Image, region: RegionInventory, policy: Policy, now: datetime) -> str | None:
    """Why an `available` event leaves a source's copies to the scheduled run: its own group keeps it
    neither among its `keep_latest` newest nor as its Latest (planner.kept_by_rank), as an older AMI
    enabled again while newer ones launch, so a target group would not keep its copy either (the run
    copies only those: wanted_sources). None for a new build, and for an AMI the read does not list."""
    groups, _conflicts = build_groups(region, policy)
    for group in groups:
        if any(m.image_id == image.image_id for m in group.members) and image.image_id not in kept_by_rank(
            group, now
        ):
            return (
                f"{image.image_id} is not among the {group.rules.keep_latest} newest of its group in "
                f"{region.region}: the scheduled run decides its copies"
            )
    return None


def _plan_one(
    family: Family, source: Image, target: ReplicateTarget, copies: RecordedCopies, listed: Collection[str]
) -> Copy | str:
    """The copy `source` needs in `target`, where it has no usable copy (a str: a problem that stops it).
    `copies`: what the target's ledger records of its copies; `listed`: the AMIs EC2 lists there."""
    recorded = recorded_generation(source, target.region)
    made = made_copy(source, target.region, recorded) if recorded else None
    if recorded and recorded not in copies.generations and (made is None or made in listed):
        # Recorded before CopyImage, never recorded as made: the same token again finishes it. Made and
        # still there, its item gone (the table restored or made again): the worker takes that copy back
        # (its item written again, no CopyImage). Made and gone, its item too (expired after the janitor
        # retired it): the next generation below, as the old token would be answered with the
        # deregistered copy.
        return copy_to(family.name, source.image_id, source.region, target, recorded)
    failed = len(copies.failed)
    if failed >= MAX_COPY_GENERATIONS:
        return (
            f"family {family.name}: copy of {source.image_id} ({source.region}) to {target.region} not "
            f"started again: {failed} generations failed or are gone (not retired by the janitor) and "
            f"none is usable; it is not started again (the failed copies may be deregistered: they "
            f"still count), the family's later AMIs are copied as usual once the cause is fixed; the "
            f"ledger item of {source.image_id} records each generation started"
        )
    # A new token: EC2 would answer an old one with its failed or deregistered copy.
    generation = max([recorded, *copies.generations]) + 1
    return copy_to(family.name, source.image_id, source.region, target, generation)


def _is_source(image: Image, conflicts: Mapping[str, Sequence[str]], own: Collection[str]) -> bool:
    """An available AMI of one family that is no copy of one of the account's own AMIs (`own`, those
    read this run): a copy the ledger records, or one made by hand or by a run that stopped before
    recording it, would make copies of copies. An AMI copied in from another account (a golden image
    shared with it) is a source like any build."""
    return (
        image.state == "available"
        and not image.is_replica
        and (image.copied_from is None or image.copied_from not in own)
        and image.image_id not in conflicts
    )


def _needs_copy(source: Image, target: ReplicateTarget, copies: Sequence[Image]) -> bool:
    """A source that may have a copy in `target` and has none that is usable."""
    if source.root_device_type == "instance-store":
        return False
    if target.region == source.region and source.encrypted:
        return False  # encrypt in place applies only to unencrypted sources
    return not any(is_usable(c) for c in copies)


def plan_replication(
    inventories: Sequence[RegionInventory],
    policy: Policy,
    now: datetime,
    grouped: Grouped | None = None,
    keys: KeyResolutions | None = None,
) -> tuple[list[Copy], list[str]]:
    """The copies to start and the problems to report. Sources are read in the policy's `regions`, copies
    in the targets; a region without a usable inventory (absent, or with an error) is left alone: no copy
    from it, none to it. A source is copied to a target where the target's group would keep its copy
    (wanted_sources). `keys`: what each alias target resolves to now (without it, alias targets are
    skipped); every ledger read holds records of the key ARNs copies were made with.
    Order: source region, family, architecture, source newest first, target region."""
    usable = {inv.region: inv for inv in inventories if inv.error is None}
    own = {image.image_id for inv in usable.values() for image in inv.images}
    last = last_keys(_records(usable.values()))
    indexes = {region: _copies_by_source(inv) for region, inv in usable.items()}
    replicated = {region: _replicas_recorded(inv) for region, inv in usable.items()}
    listed = {region: {image.image_id for image in inv.images} for region, inv in usable.items()}
    built: Grouped = dict(grouped or {})

    def groups_of(region: str) -> tuple[list[Group], dict[str, list[str]]]:
        # A copy target read for this run only (not planned here) has no groups yet.
        if region not in built:
            built[region] = build_groups(usable[region], policy)
        return built[region]

    problems: list[str] = []
    # Each source group with its targets and sources, and what each target group is offered.
    sources_of: list[tuple[Group, list[tuple[ReplicateTarget, str | None]], list[Image]]] = []
    offered: dict[tuple[str, str, str], list[Image]] = defaultdict(list)
    for region in sorted(set(policy.regions) & set(usable)):
        groups, conflicts = groups_of(region)
        for group in groups:
            if not group.family.replicate:
                continue
            targets, target_problems = _keyed_targets(group.family, region, keys, last)
            # One line per family, not one per architecture group.
            problems.extend(p for p in target_problems if p not in problems)
            targets = [(t, arn) for t, arn in targets if t.region in usable]
            sources = [m for m in group.members if _is_source(m, conflicts, own)]
            sources_of.append((group, targets, sources))
            for target, _arn in targets:
                key = (target.region, group.family.name, group.architecture)
                index = indexes[target.region]
                offered[key] += [s for s in sources if _needs_copy(s, target, index.get(s.image_id, []))]
    problems.extend(_other_key_notes(sources_of, usable))
    wanted = {
        key: wanted_sources(_target_group(groups_of(key[0])[0], key, policy), sources, now)
        for key, sources in offered.items()
    }
    copies: list[Copy] = []
    for group, targets, sources in sources_of:
        kept = kept_by_rank(group, now)
        for source in sources:
            if source.root_device_type == "instance-store" and source.image_id in kept:
                problems.append(
                    f"{source.image_id} ({group.region}) is instance-store backed: not replicated"
                )
            for target, arn in targets:
                key = (target.region, group.family.name, group.architecture)
                if source.image_id not in wanted.get(key, ()):
                    continue
                recorded = replicated[target.region].get(
                    (source.image_id, group.region), RecordedCopies(set(), set())
                )
                planned = _plan_one(group.family, source, target, recorded, listed[target.region])
                if isinstance(planned, str):
                    problems.append(planned)
                    continue
                resolved = arn if target.kms_alias is not None else None
                copies.append(planned.model_copy(update={"kms_key_arn": resolved}))
    return copies, problems


def within_copy_limit(
    copies: Sequence[Copy], inventories: Sequence[RegionInventory]
) -> tuple[list[Copy], list[str]]:
    """The copies (in plan order) each destination can take now: MAX_CONCURRENT_COPIES less the copies
    EC2 lists there in flight (pending, with a source); a note per destination for those left for a
    later run, which plans them again. Applied to the copies a run will actually queue."""
    pending = {
        inv.region: sum(1 for i in inv.images if i.state == "pending" and i.copied_from is not None)
        for inv in inventories
        if inv.error is None
    }
    room: dict[str, int] = {}
    taken: list[Copy] = []
    held: dict[str, int] = defaultdict(int)
    for copy in copies:
        left = room.setdefault(copy.region, MAX_CONCURRENT_COPIES - pending.get(copy.region, 0))
        if left <= 0:
            held[copy.region] += 1
            continue
        room[copy.region] = left - 1
        taken.append(copy)
    notes = [
        f"{count} {'copy' if count == 1 else 'copies'} to {region} left for a later run: EC2 takes {MAX_CONCURRENT_COPIES} copies in flight "
        f"per region ({pending.get(region, 0)} in flight there, "
        f"{sum(1 for c in taken if c.region == region)} planned now)"
        for region, count in sorted(held.items())
    ]
    return taken, notes


def _other_key_notes(
    sources_of: Sequence[tuple[Group, Sequence[tuple[ReplicateTarget, str | None]], Sequence[Image]]],
    usable: Mapping[str, RegionInventory],
) -> list[str]:
    """One line per family, source region and target whose usable copies the ledger records as made with
    another key than the target's now (its kms_key_id edited, or no key named any more). Such a copy
    counts as its source's copy: no copy is made again with the new key, and it retires by its region's
    rules. Copies recorded without a key (made before keys were recorded) are not judged."""
    # Each target region's usable copies with a recorded key, by (family, source region): read once.
    keyed: dict[str, dict[tuple[str, str], list[tuple[str, str]]]] = {}
    notes: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for group, targets, _sources in sources_of:
        for target, arn in targets:
            where = (group.family.name, group.region, target.region)
            if where in seen:
                continue
            seen.add(where)
            if target.region not in keyed:
                keyed[target.region] = _keyed_copies(usable[target.region])
            other: dict[str, list[str]] = defaultdict(list)
            for image_id, key in keyed[target.region].get((group.family.name, group.region), ()):
                if key != arn:
                    other[key].append(image_id)
            now_named = f"the target names {arn} now" if arn else "the target names no key now"
            for key, ids in sorted(other.items()):
                shown = ", ".join(sorted(ids)[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
                notes.append(
                    f"family {group.family.name}: {len(ids)} copies of sources in {group.region} to "
                    f"{target.region} were made with {key} and {now_named} ({shown}): they stand for their "
                    "sources there and retire by that region's rules; only a source without a usable copy "
                    "there is copied with the target's key"
                )
    return notes


def _keyed_copies(inventory: RegionInventory) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(family, source region) -> (copy, the key ARN its ledger record names) of the region's usable
    copies whose record names both."""
    found: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for copy in inventory.images:
        record = copy.replica_record
        if record is not None and record.family and record.kms_key_arn is not None and is_usable(copy):
            found[(record.family, record.source_region)].append((copy.image_id, record.kms_key_arn))
    return found


def _target_group(groups: Sequence[Group], key: tuple[str, str, str], policy: Policy) -> Group:
    """The group of `key` (region, family, architecture) in a target region: empty where it has none."""
    region, family, architecture = key
    found = next((g for g in groups if (g.family.name, g.architecture) == (family, architecture)), None)
    if found is not None:
        return found
    chosen = policy.family(family)
    return Group(region, chosen, architecture, policy.rules_for(chosen))


def plan_copies(inventories: Sequence[RegionInventory], policy: Policy, now: datetime) -> list[Copy]:
    """The copies every target region needs now (see plan_replication)."""
    return plan_replication(inventories, policy, now)[0]


def copy_problems(inventories: Sequence[RegionInventory], policy: Policy, now: datetime) -> list[str]:
    """Plan notes: copies given up after MAX_COPY_GENERATIONS failed, policy targets that cannot work."""
    return plan_replication(inventories, policy, now)[1]


def handle_failed_replica(image: Image, policy: Policy) -> Retry:
    """A replica found failed (its event in the destination region): the copy to start again with the
    next generation, or why not. Pass the image as EC2 describes it now, not as the event said."""
    record = image.replica_record
    if record is None:
        return Retry(None, f"{image.image_id} is not a copy made by the janitor")
    if image.state not in FAILED_STATES:
        return Retry(None, f"{image.image_id} is {image.state} now: nothing to retry")
    families = [f for f in policy.families if f.match.matches(image.name, image.tags)]
    if len(families) != 1:
        return Retry(None, f"{image.image_id} matches {len(families)} families: not retried")
    family = families[0]
    target = next((t for t in family.replicate if t.region == image.region), None)
    if target is None:
        return Retry(None, f"{image.region} is no longer a replicate target of family {family.name}")
    if target.region == record.source_region and target.kms_key_id is None:
        return Retry(None, f"{image.region} is the source region and has no kms_key_id: not retried")
    generation = record.generation + 1
    if record.generation >= MAX_COPY_GENERATIONS:
        # Its earlier generations may have failed too: only the target's ledger tells (the scheduled run).
        return Retry(
            None,
            f"copy of {record.source_image_id} to {image.region} failed in generation "
            f"{record.generation}: the next scheduled run starts it again only if fewer than "
            f"{MAX_COPY_GENERATIONS} of its generations failed",
        )
    copy = copy_to(family.name, record.source_image_id, record.source_region, target, generation)
    return Retry(copy, f"{image.image_id} failed: generation {generation} planned")


def client_token(copy: Copy) -> str:
    """Idempotency of CopyImage (at most 64 ASCII characters): the same request returns the same copy;
    a new generation makes a new one."""
    text = f"ami-janitor|{copy.source_image_id}|{copy.region}|{copy.generation}"
    return hashlib.sha256(text.encode()).hexdigest()


def replica_name(source: Image, copy: Copy, family: Family, *, sources_apart: bool = False) -> str:
    """The copy's name. Names are unique per region: a same-region copy and a new generation (its failed
    predecessor may still hold the name) get a suffix, and so does a copy from another region where the
    family has sources in several (`sources_apart`): a night's bakes share a name in every region, so
    copies of two regions' builds into a third, or into one that bakes too, would take one name. The
    suffix is placed so that the family's name glob still matches where it can (else the copy would
    belong to no family): at the end, else at the front, else inside, before one of the name's
    separators where it can (a glob `app-*-amd64` names `app-1-encrypted-amd64`)."""
    suffix = ENCRYPTED_SUFFIX if copy.region == copy.source_region else ""
    if sources_apart and copy.region != copy.source_region:
        suffix += f"-{copy.source_region}"
    if copy.generation > 1:
        suffix += f"-copy{copy.generation}"
    if not suffix:
        return source.name
    appended = source.name[: NAME_MAX - len(suffix)] + suffix
    if family.match.name is None:
        return appended
    # Before a separator first, the last first; then anywhere (a glob `app-2026*amd64`).
    places = sorted(range(1, len(source.name)), key=lambda i: (source.name[i] not in NAME_SEPARATORS, -i))
    inserted = (_inserted(source.name, index, suffix) for index in places)
    prefixed = (suffix.lstrip("-") + "-" + source.name)[:NAME_MAX]
    for name in itertools.chain((appended, prefixed), inserted):
        if name is not None and family.match.matches(name, source.tags):
            return name
    return appended


def _inserted(name: str, index: int, suffix: str) -> str | None:
    """`name` with `suffix` before its character `index`, its start shortened to fit NAME_MAX (None
    where the rest leaves no room)."""
    room = NAME_MAX - len(suffix) - (len(name) - index)
    return name[: min(index, room)] + suffix + name[index:] if room > 0 else None


def replica_tags(source: Image, copy: Copy, policy: Policy) -> dict[str, str]:
    """The copy's tags: the source's own tags and provenance. Left out: janitor-owned tags (the stage
    clock and records describe the source, not the copy), `aws:` system tags (EC2 refuses them), the
    family's Latest tag (the target group's rotation decides its own Latest) and the opt-out tag (an
    owner's decision about that one AMI; copied, it would pin every replica forever)."""
    family = policy.family(copy.family)
    dropped = {policy.rules_for(family).opt_out_tag}
    if family.latest is not None and family.latest.tag:
        dropped.add(family.latest.tag)
    own = {
        key: value
        for key, value in source.tags.items()
        if not key.startswith((JANITOR_TAG_PREFIX, "aws:")) and key not in dropped
    }
    provenance = {
        SOURCE_IMAGE_TAG: source.image_id,
        SOURCE_REGION_TAG: source.region,
        SOURCE_CREATED_TAG: iso(source.created) or "",
        generation_tag(copy.region): str(copy.generation),
    }
    # 50 tags per resource: the family's match tags go first, so the copy still joins its family.
    room = TAGS_PER_RESOURCE_MAX - len(provenance)
    ranked = sorted(own, key=lambda key: (key not in family.match.tags, key))[:room]
    return {**{key: own[key] for key in sorted(ranked)}, **provenance}


def copy_request(copy: Copy, source: Image, policy: Policy) -> dict[str, Any]:
    """The exact CopyImage arguments, for the client of the destination region."""
    if (source.image_id, source.region) != (copy.source_image_id, copy.source_region):
        raise ValueError(f"source {source.image_id} ({source.region}) is not the copy's source")
    if copy.region == copy.source_region and copy.kms_key_id is None:
        raise ValueError("a copy in its source region needs a kms_key_id (it only encrypts in place)")
    family = policy.family(copy.family)
    tags = [{"Key": key, "Value": value} for key, value in replica_tags(source, copy, policy).items()]
    specifications = [{"ResourceType": "image", "Tags": tags}]
    if source.root_device_type != "instance-store":  # it has no snapshots to tag
        specifications.append({"ResourceType": "snapshot", "Tags": tags})
    request: dict[str, Any] = {
        "SourceRegion": copy.source_region,
        "SourceImageId": copy.source_image_id,
        # Sources in every region of `regions`: with more than one, two builds may share a name.
        "Name": replica_name(source, copy, family, sources_apart=len(set(policy.regions)) > 1),
        "Description": f"[Copied {source.image_id} from {source.region}] {source.name}"[:DESCRIPTION_MAX],
        "ClientToken": client_token(copy),
        # Never copy the source's tags wholesale: that would bring Latest and the stage clock along.
        "CopyImageTags": False,
        "TagSpecifications": specifications,
    }
    key = _copy_key(copy)
    if key is not None:
        request["Encrypted"] = True
        request["KmsKeyId"] = key
    return request


def _copy_key(copy: Copy) -> str | None:
    """The key ARN CopyImage gets: never an alias (resolved and checked when planned), never none where
    the policy names a key."""
    if copy.kms_key_id is None:
        if copy.kms_key_arn is not None:
            raise ValueError(f"key {copy.kms_key_arn} given where the target names no kms_key_id")
        return None
    if alias_name(copy.kms_key_id) is None:
        if copy.kms_key_arn not in (None, copy.kms_key_id):
            raise ValueError(f"key {copy.kms_key_arn} is not the target's kms_key_id {copy.kms_key_id}")
        return copy.kms_key_id
    if copy.kms_key_arn is None:
        raise ValueError(f"{copy.kms_key_id} was not resolved to a key ARN: not copied")
    return copy.kms_key_arn


def _policy_change(copy: Copy, policy: Policy) -> str | None:
    """Why a request made under an earlier policy no longer applies (None: it does)."""
    family = next((f for f in policy.families if f.name == copy.family), None)
    if family is None:
        return f"family {copy.family} is no longer in the policy"
    target = next((t for t in family.replicate if t.region == copy.region), None)
    if target is None:
        return f"{copy.region} is no longer a replicate target of family {copy.family}"
    if copy.region == copy.source_region and copy.kms_key_id is None:
        return f"{copy.region} is the source region and the request has no kms_key_id (encrypt in place only)"
    return None


def allowed_target(request: Copy, policy: Policy) -> ReplicateTarget:
    """The policy's target for a queued request, checked on the request alone (before any AWS call, so a
    forged region is never called): its source region is one of the policy's `regions`, its family
    replicates there, its key is exactly the target's, its generation from 1. RefusedCopy else."""
    if request.source_region not in policy.regions:
        raise RefusedCopy(
            f"source region {request.source_region} is not one of the policy's regions "
            f"({', '.join(policy.regions)})",
            request,
        )
    family = next((f for f in policy.families if f.name == request.family), None)
    if family is None:
        raise RefusedCopy(f"family {request.family} is not in the policy", request)
    targets, _ = _targets(family, request.source_region)
    target = next((t for t in targets if t.region == request.region), None)
    if target is None:
        raise RefusedCopy(
            f"target region {request.region} is not a replicate target of family {family.name} "
            f"for sources in {request.source_region}",
            request,
        )
    if request.kms_key_id != target.kms_key_id:
        raise RefusedCopy(_key_mismatch(request.kms_key_id, target), request)
    if request.generation < 1:
        raise RefusedCopy(f"generation {request.generation} is below 1", request)
    return target


def _key_mismatch(requested: str | None, target: ReplicateTarget) -> str:
    if requested is None:
        return f"kms_key_id missing: target {target.region} encrypts copies with {target.kms_key_id}"
    if target.kms_key_id is None:
        return f"kms_key_id {requested} given: target {target.region} configures no key"
    return f"kms_key_id {requested} is not the key target {target.region} configures ({target.kms_key_id})"


def _membership_problem(request: Copy, source: Image, policy: Policy) -> str | None:
    """Why `source` is not a source of the request's family (None: it is)."""
    if source.is_replica:
        return f"source {source.image_id} is itself a copy (of {source.source_image_id}): never a source"
    if source.root_device_type == "instance-store":
        return f"source {source.image_id} is instance-store backed: never replicated"
    families = sorted(f.name for f in policy.families if f.match.matches(source.name, source.tags))
    if not families:
        return f"source {source.image_id} ({source.name}) is in no family of the policy"
    if len(families) > 1:
        return f"source {source.image_id} matches several families ({', '.join(families)}): never a source"
    if families[0] != request.family:
        return f"source {source.image_id} is a member of family {families[0]}, not {request.family}"
    return None


def rebuild_copy(
    request: Copy, source: Image, policy: Policy, copies: Iterable[Image] = (), key: ResolvedKey | None = None
) -> Copy:
    """The copy the policy itself makes of a queued request, or RefusedCopy with the reason.

    `source` is the request's source as EC2 describes it now in the request's source region, `copies`
    its copies in the target region. Besides allowed_target's checks: the source is a member of exactly
    the request's family and no copy itself, and the generation is no higher than the janitor could
    have planned (the highest the ledger records started, on the source or a copy, plus one; no new one
    once MAX_COPY_GENERATIONS of the copies EC2 lists there failed). Only the generation
    is the request's own: the source is EC2's, the family, regions and key are the policy's. `key`: what the
    target's alias resolves to now; it must be the key ARN the request was planned with.
    """
    target = allowed_target(request, policy)
    if (source.image_id, source.region) != (request.source_image_id, request.source_region):
        raise RefusedCopy(f"source {source.image_id} ({source.region}) is not the request's source", request)
    problem = _membership_problem(request, source, policy)
    if problem is not None:
        raise RefusedCopy(problem, request)
    tried = _tried(source, target.region, copies)
    highest = tried + 1
    if request.generation > highest:
        raise RefusedCopy(
            f"generation {request.generation} is above {highest}, the highest the janitor could plan "
            f"for {source.image_id} in {target.region}",
            request,
        )
    failed = _failed_generations(copies)
    if request.generation > tried and len(failed) >= MAX_COPY_GENERATIONS:
        # The planner gives the copy up here and reports it: a new generation is none of its requests (one
        # already started goes on to start_copy, which finds it failed or superseded).
        raise RefusedCopy(
            f"{len(failed)} generations of its copy to {target.region} failed "
            f"({', '.join(map(str, sorted(failed)))}): not started again past {MAX_COPY_GENERATIONS}",
            request,
        )
    arn = _requested_key(request, target, key)
    return copy_to(request.family, source.image_id, source.region, target, request.generation, arn)


def _requested_key(request: Copy, target: ReplicateTarget, key: ResolvedKey | None) -> str | None:
    """The key ARN the worker copies with: the policy's key ARN, or the alias resolved now (RefusedCopy
    where it cannot be, or resolves elsewhere than when the copy was planned)."""
    if target.kms_key_id is None or target.kms_alias is None:
        return target.kms_key_id
    # The key of the family's last copy to the region was checked where the copy was planned, against
    # every copy record of the ledgers read; here, that the alias has not moved since. (The records of
    # this source and its copies alone are not the family's: an older attempt of this source, made
    # with a key the policy moved from by ARN before naming the alias again, would refuse every
    # request the planner rightly plans.)
    keys = {(target.region, target.kms_key_id): key} if key is not None else None
    arn, problem = target_key(request.family, target, keys, {})
    if problem is not None:
        raise RefusedCopy(problem, request)
    if request.kms_key_arn != arn:
        raise RefusedCopy(
            f"{target.kms_key_id} in {target.region} resolves to {arn} now, not to {request.kms_key_arn} "
            "(the key the copy was planned with)",
            request,
        )
    return arn


class CopyRequest(Copy):
    """A copy request as the replication queue carries it (the message body is its JSON): a copy of an
    AMI, in a generation from 1. Everything else about it is checked against the policy and EC2."""

    # Off the scheduled run's path: its validator is built when first used, not at each cold start.
    model_config = ConfigDict(defer_build=True)

    @field_validator("source_image_id")
    @classmethod
    def _an_ami(cls, value: str) -> str:
        if not value.startswith("ami-"):
            raise ValueError(f"{value!r} is not an AMI id")
        return value

    @field_validator("generation")
    @classmethod
    def _counted_from_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value


def copy_from_message(body: str) -> Copy:
    """A queued copy request, validated; a bad one raises BadCopyMessage naming the field."""
    try:
        request = CopyRequest.model_validate_json(body)
    except ValidationError as error:
        raise BadCopyMessage(f"bad copy request: {describe_validation_error(error)}") from None
    return Copy.model_validate(request.model_dump())
