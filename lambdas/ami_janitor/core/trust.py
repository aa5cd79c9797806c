"""What the janitor believes about its own past work: the ledger, never its tags.

Tags are a mirror for people, written after the ledger. This module reads the ledger for the stage
clock, says which tags disagree with it (`tampered`), which deregistrations a crash left unfinished,
and how the first enforce run adopts the tags an older janitor wrote (the safe direction only).
"""

import sys
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from ami_janitor.core.model import (
    STAGES,
    Image,
    LedgerItem,
    LedgerSnapshot,
    LedgerStage,
    LedgerView,
    RegionInventory,
    Stage,
    Tampered,
    iso,
    parse_time,
    with_ledger,
)
from ami_janitor.core.policy import (
    CANDIDATE_TAG,
    PRIOR_DEPRECATION_TAG,
    PRIOR_PERMISSIONS_TAG,
    SHARED_BY_JANITOR_TAG,
    Policy,
)
from ami_janitor.core.tags import is_part_key, joined_values

GONE_STATES = frozenset({"deregistered"})


def open_item(image: Image) -> LedgerItem | None:
    """The AMI's running candidate record (None: the janitor has no clock on it)."""
    item = image.ledger
    return item if item is not None and item.is_open else None


# A deprecation time this long after the deprecate stage's record is the owner's, not the janitor's.
DEPRECATION_SLACK = timedelta(days=1)


def shows(image: Image, stage: Stage, entry: LedgerStage | None = None) -> bool:
    """EC2 shows the effect of `stage` on the AMI (a deregistered AMI is not in the inventory). With
    the stage's record: a deprecation time far after it is an owner's, not the stage's."""
    if stage == "deprecate":
        if image.deprecation_time is None:
            return False
        # A stage done again (after a crash or a half-way rescue) deprecates at that later time, which
        # its confirmation records, or only `redone` where the run stopped before confirming it.
        latest = (
            max(entry.at, entry.redone or entry.at, entry.confirmed or entry.at)
            if entry is not None
            else None
        )
        return latest is None or image.deprecation_time <= latest + DEPRECATION_SLACK
    if stage == "disable":
        return image.state == "disabled"
    return False


class StagePlan(NamedTuple):
    since: datetime  # the candidate clock's start (now for a new candidate)
    due: list[Stage]  # the stages this run applies, in order
    next_stage: Stage | None
    next_at: datetime | None
    finishing: Stage | None = None  # a recorded stage EC2 does not show yet: done again


def stage_plan(image: Image, configured: Sequence[tuple[Stage, int]], now: datetime) -> StagePlan:
    """Which stages are due, from the ledger only.

    Stage S is due at max(first_candidate + S_days, applied(previous) + S_days - previous_days), where
    a recorded stage was applied when it was last done (`redone`, else its record); a stage this run
    applies counts as applied now, so all-zero stages still deregister in one run. A
    recorded stage whose change EC2 does not show (a crash between the ledger write and the EC2 call,
    a rescue that stopped half way, or the owner's undoing it) is done again (recording what it changes
    then: aws.executor), before any later stage,
    unless EC2 shows a later stage (a disabled AMI has settled its deprecation), once the clock makes it
    due (as it did when it was first recorded, unless the policy's days were raised since)."""
    item = open_item(image)
    since = item.first_candidate if item is not None and item.first_candidate else now
    recorded = item.stages if item is not None else {}
    shown = max((STAGES.index(s) for s, e in recorded.items() if shows(image, s, e)), default=-1)
    latest = max(map(STAGES.index, recorded), default=-1)
    due: list[Stage] = []
    finishing: Stage | None = None
    previous_at, previous_days = since, 0
    for stage, days in configured:
        entry = recorded.get(stage)
        if entry is None and STAGES.index(stage) < latest:
            # A stage the policy turned on after a later one was recorded (its days were null then):
            # the AMI is past it, as a disabled AMI has settled its deprecation. Stages are recorded in
            # order, so that the table's last stage, which every later write and a rescue's close
            # test, stays the latest.
            continue
        if entry is not None and (STAGES.index(stage) <= shown or shows(image, stage, entry)):
            # A stage done again (EC2 never took the first try) counts from then: the next waits its full
            # delay after it. A late confirmation moves nothing: EC2 took the stage when it was recorded.
            previous_at, previous_days = max(entry.at, entry.redone or entry.at), days
            continue
        at = max(since + timedelta(days=days), previous_at + timedelta(days=days - previous_days))
        if at > now:
            # A recorded stage EC2 does not show waits too where the policy's clock now says later
            # (its days raised since): doing it again never comes sooner than doing it first would.
            return StagePlan(since, due, stage, at, finishing)
        due.append(stage)
        if entry is not None:
            finishing = finishing or stage
        previous_at, previous_days = now, days
    return StagePlan(since, due, None, None, finishing)


# ---- tags that disagree with the ledger ----------------------------------------------------------


def _prior_deprecation(entry: LedgerStage | None) -> str | None:
    if entry is None:
        return None
    return iso(entry.prior_deprecation) or "none"


def _ledger_values(image: Image) -> dict[str, str | None]:
    """What each janitor tag of the AMI should say, by the ledger (None: the ledger records nothing)."""
    item = open_item(image)
    stages = item.stages if item is not None else {}
    disable = stages.get("disable")
    grants = image.ledger.grants if image.ledger is not None else ()
    return {
        CANDIDATE_TAG: iso(item.first_candidate) if item is not None else None,
        PRIOR_DEPRECATION_TAG: _prior_deprecation(stages.get("deprecate")),
        PRIOR_PERMISSIONS_TAG: ",".join(sorted(disable.prior_launch_permissions)) if disable else None,
        SHARED_BY_JANITOR_TAG: ",".join(sorted(grants)) if grants else None,
    }


def tampered(inventory: RegionInventory) -> list[Tampered]:
    """Janitor tags whose value the ledger does not back (once the region's tags were adopted)."""
    ledger = inventory.ledger
    if ledger is None or ledger.adopted is None:
        return []
    found: list[Tampered] = []
    for image in inventory.images:
        if not any(key.startswith("ami-janitor:") for key in image.tags):
            continue
        expected = _ledger_values(image)
        for base, wanted in expected.items():
            keys = sorted(k for k in image.tags if is_part_key(base, k))
            if not keys:
                continue
            if base in (PRIOR_PERMISSIONS_TAG, SHARED_BY_JANITOR_TAG):
                value = ",".join(joined_values(base, image.tags))  # a record across numbered tags
            else:
                value = image.tags.get(base, "")
            if value != (wanted or ""):
                found.append(
                    Tampered(
                        region=inventory.region, image_id=image.image_id, tag=base, value=value, ledger=wanted
                    )
                )
    recorded = {s.snapshot_id for item in ledger.items.values() for s in item.snapshots}
    for snapshot in inventory.retired_snapshots:
        if snapshot.snapshot_id not in recorded:
            found.append(
                Tampered(
                    region=inventory.region,
                    image_id=snapshot.snapshot_id,
                    tag="ami-janitor:retired-from",
                    value=snapshot.image_id,
                    ledger=None,
                )
            )
    return found


# ---- unfinished deregistrations ------------------------------------------------------------------


def unfinished_deregistrations(inventory: RegionInventory) -> list[LedgerItem]:
    """Items of AMIs the ledger recorded as being deregistered, now gone, never confirmed: a run stopped
    between DeregisterImage and the deletion of the snapshots it recorded."""
    ledger = inventory.ledger
    if ledger is None:
        return []
    started = [
        item
        for item in ledger.items.values()
        if "deregister" in item.stages and item.deregistered is None and item.closed is None
    ]
    if not started:  # the AMIs are gathered only when some deregistration was left open
        return []
    present = {i.image_id for i in inventory.images if i.state not in GONE_STATES}
    return sorted((item for item in started if item.image_id not in present), key=lambda item: item.image_id)


def unfinished_snapshots(inventory: RegionInventory) -> list[LedgerSnapshot]:
    """The snapshots of unfinished deregistrations that no remaining AMI uses: the only snapshots ever
    deleted without their AMI."""
    return unfinished_within(inventory, sys.maxsize).snapshots


class Finishing(NamedTuple):
    """The unfinished deregistrations a run finishes within its budget, and those it leaves."""

    snapshots: list[LedgerSnapshot]  # to delete this run (whole items: an item's all, or none)
    left: list[str]  # the AMIs whose items wait for a later run


def unfinished_within(inventory: RegionInventory, budget: int) -> Finishing:
    """unfinished_snapshots, item by item in order while their snapshots fit in `budget` (each deletion
    is an action of max_actions_per_run): an item is finished whole, so that its confirmation follows
    the deletion of every snapshot it recorded, and a later run deletes none twice."""
    unfinished = unfinished_deregistrations(inventory)
    if not unfinished:  # every plan asks; the snapshots of every AMI are gathered only when needed
        return Finishing([], [])
    used = {s for i in inventory.images if i.state not in GONE_STATES for s in i.snapshot_ids}
    taken: list[LedgerSnapshot] = []
    left: list[str] = []
    for item in unfinished:
        free = [snapshot for snapshot in item.snapshots if snapshot.snapshot_id not in used]
        if free and (left or len(taken) + len(free) > budget):
            left.append(item.image_id)  # in order: the next run takes up where this one stops
        else:
            taken.extend(free)
    return Finishing(taken, left)


def unconfirmed_stages(image: Image) -> list[Stage]:
    """Stages the ledger recorded on an open clock and EC2 shows, never confirmed (a run stopped
    between the EC2 call and the confirmation): the next run confirms them."""
    item = open_item(image)
    if item is None:
        return []
    return [s for s, e in item.stages.items() if e.confirmed is None and shows(image, s, e)]


# ---- adopting the tags of an older janitor -------------------------------------------------------


class Adoption(NamedTuple):
    """What the first enforce run with a ledger records from the janitor tags it finds."""

    items: dict[str, LedgerItem]
    notes: list[str]


def _allowed_grants(policy: Policy, image: Image) -> set[str]:
    families = [f for f in policy.families if f.match.matches(image.name, image.tags)]
    if len(families) != 1:
        return set()
    family = families[0]
    return set(family.share_with.grants()) | ({"group:all"} if family.public else set())


def _adopted_item(image: Image, allowed: set[str], now: datetime, refused: list[str]) -> LedgerItem | None:
    tags = image.tags
    retiring = (
        CANDIDATE_TAG in tags
        or PRIOR_DEPRECATION_TAG in tags
        or any(is_part_key(PRIOR_PERMISSIONS_TAG, k) for k in tags)
    )
    # No grant is adopted: the ledger's grants are the janitor's to revoke (when share_with drops them),
    # and a tag never revokes. Those launch permissions stay as they are, like anyone's.
    grants = set(joined_values(SHARED_BY_JANITOR_TAG, tags))
    refused += [
        f"{image.image_id} grant {g} "
        + ("(in share_with: a tag's record, never revoked)" if g in allowed else "(outside share_with)")
        for g in sorted(grants)
    ]
    if not retiring:
        return None
    # Stages EC2 shows are recorded as adopted: the tags do not prove the janitor made those changes
    # (the owner may have), so a rescue never undoes them. What the tags say came before is kept in
    # the record for a person (and the tampered check), never restored.
    stages: dict[Stage, LedgerStage] = {}
    disabled = image.state == "disabled" and retiring
    if retiring and (shows(image, "deprecate") or disabled):
        recorded = tags.get(PRIOR_DEPRECATION_TAG)
        prior = None if recorded in (None, "none") else parse_time(recorded)
        stages["deprecate"] = LedgerStage(at=now, prior_deprecation=prior, confirmed=now, adopted=True)
    if disabled:
        permissions = set(joined_values(PRIOR_PERMISSIONS_TAG, tags))
        refused += [
            f"{image.image_id} prior launch permission {p} (outside share_with)"
            for p in sorted(permissions - allowed)
        ]
        stages["disable"] = LedgerStage(
            at=now,
            prior_launch_permissions=tuple(sorted(permissions & allowed)),
            already_disabled=True,
            confirmed=now,
            adopted=True,
        )
    return LedgerItem(
        image_id=image.image_id,
        first_candidate=now if retiring else None,
        stages=stages,
    )


def adoption(inventory: RegionInventory, policy: Policy, now: datetime) -> Adoption:
    """The safe direction only: candidate clocks restart now; stages EC2 already shows are recorded
    now, as adopted (a rescue leaves them: the AMI stays disabled and deprecated); prior launch
    permissions are kept only inside share_with; recorded grants and retired-from marks are reported
    for a person, never adopted. Nothing is adopted once the region was adopted."""
    ledger = inventory.ledger
    if ledger is not None and ledger.adopted is not None:
        return Adoption({}, [])
    items: dict[str, LedgerItem] = {}
    refused: list[str] = []
    for image in inventory.images:
        if image.ledger is not None or image.state in GONE_STATES:
            continue
        if not any(key.startswith("ami-janitor:") for key in image.tags):
            continue
        if not any(family.match.matches(image.name, image.tags) for family in policy.families):
            # No family selects it: a clock adopted now would run unseen, and count (with the stages
            # EC2 shows, dated now) the day a family selects it, retiring it sooner than any other.
            continue
        item = _adopted_item(image, _allowed_grants(policy, image), now, refused)
        if item is not None:
            items[image.image_id] = item
    notes: list[str] = []
    if items:
        clocks = sum(1 for item in items.values() if item.first_candidate is not None)
        notes.append(
            f"adopting the janitor tags of {len(items)} AMI(s): {clocks} candidate clock(s) restart at "
            "this run, stages EC2 shows are recorded now"
        )
    if refused:
        notes.append("not adopted (left for a person): " + "; ".join(refused))
    if inventory.retired_snapshots:
        notes.append(
            f"snapshots marked ami-janitor:retired-from: {len(inventory.retired_snapshots)}, for a person "
            "to check: never adopted, never deleted by the janitor"
        )
    return Adoption(items, notes)


def adopted_view(inventory: RegionInventory, policy: Policy, now: datetime) -> RegionInventory:
    """The inventory as the first enforce run with a ledger sees it once it adopted the tags (what a plan
    before that run shows). The items to write are kept in `ledger.adopting`."""
    if inventory.error is not None:
        return inventory
    found = adoption(inventory, policy, now)
    if not found.items and not found.notes:
        return inventory
    ledger = inventory.ledger or LedgerView(table="")
    merged = {**ledger.items, **found.items}
    view = inventory._replace(
        ledger=ledger._replace(items=merged, adopting=found.items) if inventory.ledger is not None else None,
        notes=(*inventory.notes, *found.notes),
    )
    if inventory.ledger is None:
        # No table yet: the plan shows the adopted clocks, nothing is kept to write.
        images = tuple(
            i.model_copy(update={"ledger": found.items[i.image_id]}) if i.image_id in found.items else i
            for i in inventory.images
        )
        return view._replace(images=images)
    return with_ledger(view)


def recorded_stage(image: Image, stage: Stage) -> LedgerStage | None:
    item = open_item(image)
    return item.stages.get(stage) if item is not None else None


def grants_removed(image: Image) -> bool:
    """Whether a disable EC2 took (its record confirmed) has removed every launch permission since the
    ledger recorded the janitor's grants on the AMI: DisableImage removes them all and EnableImage
    restores none, so none of those grants is in place any more unless a rescue granted it back (only
    while share_with lists it). A launch permission an AMI its owner enabled shows then is the owner's."""
    entry = recorded_stage(image, "disable")
    return entry is not None and entry.confirmed is not None


def undoable_stage(image: Image, stage: Stage) -> LedgerStage | None:
    """The stage's record where a rescue undoes it: one the janitor wrote before its own change, never
    one adopted from tags (they do not show that the janitor made the change, nor what came before)."""
    entry = recorded_stage(image, stage)
    return entry if entry is not None and not entry.adopted else None


def left_as_adopted(image: Image) -> list[str]:
    """What a rescue leaves of the stages adopted from tags, said for a person to undo by hand."""
    notes: list[str] = []
    deprecate = recorded_stage(image, "deprecate")
    if deprecate is not None and deprecate.adopted and image.deprecation_time is not None:
        notes.append(
            "left deprecated (adopted from tags: the ledger does not show the janitor deprecated it)"
        )
    disable = recorded_stage(image, "disable")
    if disable is not None and disable.adopted:
        if image.state == "disabled":
            notes.append(
                "left disabled (adopted from tags: the ledger does not show the janitor disabled it)"
            )
        if disable.prior_launch_permissions:
            notes.append(
                "launch permissions named by tags not restored: " + ",".join(disable.prior_launch_permissions)
            )
    return notes


def restorable_permissions(image: Image, shared: Collection[str]) -> tuple[list[str], list[str]]:
    """(what a rescue restores, what it leaves out): the launch permissions the ledger recorded before
    its own disable stage, given `shared`, what the AMI's family shares now (its share_with, and the
    public group where it says public: true). The public group and the grants the janitor made itself
    (its ledger's `grants`) come back only where `shared` still lists them: a rescue never restores a
    grant the policy has withdrawn since the disable stage. Other grants are their owners' and come back."""
    entry = undoable_stage(image, "disable")
    recorded: Iterable[str] = entry.prior_launch_permissions if entry is not None else ()
    own = set(image.ledger.grants) if image.ledger is not None else set()
    own.add("group:all")
    keep = sorted(p for p in recorded if p not in own or p in shared)
    left = sorted(p for p in recorded if p in own and p not in shared)
    return keep, left
