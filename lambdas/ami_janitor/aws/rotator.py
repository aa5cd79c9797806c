"""Latest rotation: write the Latest tag and SSM pointer a plan's `latest` entries name, convergently.

Events arrive at least once and out of order, and two rotations of a group may interleave. So
applying a change never trusts the change itself: it re-reads the group, computes the newest
available AMI from what EC2 says now, and writes only what differs, until a read shows no difference.
"""

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict

from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.inventory import IMAGE_PERMISSIONS, describe_image, load_images, read_ledger_items
from ami_janitor.aws.inventory.get_parameters import get_parameters
from ami_janitor.aws.inventory.pointers import ARCHITECTURES, Pointers, read_pointer_values
from ami_janitor.aws.inventory.reading import SourceFailed
from ami_janitor.aws.sharer import ShareResult
from ami_janitor.core.model import (
    AmiState,
    Image,
    LatestChange,
    Outcome,
    RegionInventory,
    Share,
    Stage,
)
from ami_janitor.core.policy import Mode, Policy
from ami_janitor.core.rotation import EVERY_GROUP, Selection, changes_for, rotation_by_group, rotation_for

PERMISSIONS: list[str] = sorted(
    {
        "ec2:CreateTags",
        "ec2:DeleteTags",
        "ssm:PutParameter",
        *IMAGE_PERMISSIONS,
    }
)

MAX_ROUNDS = 3
# An `available` event of an AMI that a family's name glob names but whose tags do not match yet is
# tried again for this long after EC2 sent it: Packer, among others, tags an AMI once it is available.
TAGS_WAIT = timedelta(minutes=5)


class NotYet(RuntimeError):
    """The event's AMI is not yet as EC2 will soon show it (listed, tagged into its family): the event is
    tried again in a minute or two, not counted as a failure."""


class RotationResult(BaseModel):
    region: str
    family: str
    architecture: str
    to: str | None
    written: list[str]
    # ok; failed; superseded: a scheduled change the region, read again, no longer asks for (not written)
    status: str = "ok"
    error: str | None = None
    # failed for good: the parameter is refused until a person changes it (PointerRefused), so an event
    # does not try again; the scheduled run reports it each time (ActionsFailed)
    refused: bool = False

    @classmethod
    def unreadable(cls, region: str, error: str) -> "RotationResult":
        """The region's AMIs could not be read: nothing rotated there."""
        return cls(
            region=region, family="*", architecture="*", to=None, written=[], status="failed", error=error
        )


class AmiEventOutcome(Outcome):
    """What one EC2 AMI State Change event did: the rotation (handle_state_change), then what sharing and
    copying a new source did (engine.handle_ami_event). Only the keys that apply are in its JSON."""

    # Off the scheduled run's path: its validator is built when first used, not at each cold start.
    model_config = ConfigDict(defer_build=True)

    image_id: str
    state: AmiState
    region: str
    mode: Mode
    outcome: Literal["paused", "failed-counted", "ignored", "dry-run", "rotated"]
    # ignored: why; dry-run or rotated: why every group was reconciled, where the event named no group
    why: str | None = None
    # dry-run or rotated: why a group the event names is left as it is (a policy error)
    not_rotated: list[str] = []
    # dry-run: the Latest changes a rotation would write
    would: list[LatestChange] = []
    # rotated: what was written
    rotations: list[RotationResult] = []
    # a failed AMI: what becomes of its copy
    copy_retry: str | None = None
    # a new source outside enforce: its share (None: none) and how many copies it would queue
    would_share: Share | None = None
    would_copy: int | None = None
    # a new source in enforce: what sharing it did and how many copies were queued
    shared: list[ShareResult] = []
    copies_queued: int | None = None
    # a new source in enforce: the copies SQS did not take (the invocation fails, so it is tried again)
    copies_not_queued: int | None = None
    # a new source: the copy targets skipped (an alias that cannot be resolved or now names another key)
    copies_skipped: list[str] = []


def _write(
    clients: RegionClients,
    policy: Policy,
    change: LatestChange,
    inventory: RegionInventory,
    targets: Mapping[str, Image],
    written: list[str],
) -> None:
    """Write one change, adding each write to `written` as it is made (a failure part-way leaves there
    what was written before it), against the region as last read: a parameter that already names the
    target is not written (each PutParameter makes a new version and a change event), nor a tag the
    target already carries (a change of the parameter alone writes the parameter alone); `targets`: the
    changes' targets as read (_targets)."""
    latest = policy.family(change.family).latest
    if latest is None:
        return
    target = targets.get(change.to) if change.to else None
    if latest.tag and change.to and (target is None or target.tags.get(latest.tag) != "true"):
        # Tag the new Latest before untagging the old: a reader never sees no Latest at all.
        clients.ec2.create_tags(Resources=[change.to], Tags=[{"Key": latest.tag, "Value": "true"}])
        written.append(f"tag {latest.tag}=true on {change.to}")
    if latest.tag and change.untag:
        clients.ec2.delete_tags(Resources=list(change.untag), Tags=[{"Key": latest.tag}])
        written.append(f"untag {latest.tag} from {', '.join(change.untag)}")
    if change.ssm_parameter and change.to and inventory.parameters.get(change.ssm_parameter) != change.to:
        data_type = _writable(clients, change.ssm_parameter)
        try:
            clients.ssm.put_parameter(
                Name=change.ssm_parameter,
                Value=change.to,
                Type="String",
                DataType=data_type,
                Overwrite=True,
            )
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in REFUSED_FOR_GOOD:
                raise PointerRefused(f"SSM refuses to write {change.ssm_parameter}: {error}") from error
            raise
        written.append(f"{change.ssm_parameter} = {change.to}")


class PointerRefused(RuntimeError):
    """A Latest parameter that the rotation cannot write until a person changes it or the policy: tried
    again, it fails the same way."""


class PointerOfAnotherType(PointerRefused):
    """A parameter named as a Latest pointer that is no String: the rotation does not overwrite it."""


# PutParameter's refusals of what was asked, not of the moment (throttling, a lost answer, an internal
# error are tried again): the parameter's name, its data type or hierarchy, its versions, the account's
# limit of parameters.
REFUSED_FOR_GOOD = frozenset(
    {
        "ValidationException",
        "ParameterPatternMismatchException",
        "HierarchyTypeMismatchException",
        "HierarchyLevelLimitExceededException",
        "UnsupportedParameterType",
        "ParameterMaxVersionLimitExceeded",
        "ParameterLimitExceeded",
    }
)
# The data type a pointer the rotation creates gets: SSM checks the AMI id it is given.
POINTER_DATA_TYPE = "aws:ec2:image"


def _writable(clients: RegionClients, name: str) -> str:
    """The data type to write the pointer with, asked before each write (a write is rare, when Latest
    moves): its own where it exists, SSM refusing to change a parameter to or from `aws:ec2:image` (one
    made `text`, by hand or by another tool, stays `text`), `aws:ec2:image` for a new one. Refuses to
    overwrite a parameter of another type than String (the read leaves out a SecureString, never
    decrypted, and gives a StringList as its text, one of a single AMI id as that id), or of a data type
    that holds no AMI id."""
    found = get_parameters(clients.ssm, [name]).get(name)
    if found is None:
        return POINTER_DATA_TYPE
    kind = str(found.get("Type") or "String")
    if kind != "String":
        raise PointerOfAnotherType(
            f"{name} is a {kind} parameter: the rotation writes a String holding the AMI id and does not "
            "overwrite it (delete it, or name another latest.ssm_parameter)"
        )
    data_type = str(found.get("DataType") or "text")
    if data_type not in ("text", POINTER_DATA_TYPE):
        raise PointerOfAnotherType(
            f"{name} is a String of data type {data_type}: the rotation writes an AMI id and does not "
            "overwrite it (delete it, or name another latest.ssm_parameter)"
        )
    return data_type


def _targets(inventory: RegionInventory, changes: Iterable[LatestChange]) -> dict[str, Image]:
    """The images the changes move Latest to, found in one pass over the region's."""
    wanted = {change.to for change in changes if change.to}
    return {image.image_id: image for image in inventory.images if image.image_id in wanted}


def write_changes(
    clients: RegionClients,
    policy: Policy,
    changes: Iterable[LatestChange],
    now: datetime,
    *,
    skip: Iterable[str] = (),
    load: Callable[[RegionClients, Policy], RegionInventory] | None = None,
    follow: bool = False,
) -> list[RotationResult]:
    """Write a plan's Latest changes once each (the scheduled run), each only where the region, read
    again now, still asks for a move. The plan was made from a read that may be minutes old, and the
    event function rotates the same groups meanwhile: a newer AMI it made Latest, or a planned target
    disabled since, is not undone. A group that needs no change now is left as it is ("superseded").
    One that needs a move to another AMI than planned (a newer AMI whose event was lost, say) is
    written as the region reads now where `follow` (the scheduled run: its caller keeps that AMI this
    run); without it (an operator's confirmed apply, which writes only what it showed) it is left
    "superseded" for the next run. The groups written are then read again and converged, as an event
    converges its own: what changed between that read and these writes is settled too. A change to an
    AMI in `skip` (its rescue failed: it is not launchable) is left for the next run, as is a move to it
    that the region's read asks for instead."""
    unusable = set(skip)
    changes = list(changes)
    results = [
        RotationResult(
            region=clients.region, family=c.family, architecture=c.architecture, to=c.to, written=[]
        )
        for c in changes
    ]
    pending = []
    for change, result in zip(changes, results, strict=True):
        if change.to in unusable:
            result.status, result.error = "failed", f"{change.to} could not be rescued: Latest not moved"
        else:
            pending.append((change, result))
    if not pending:
        return results
    region = (load or load_images)(clients, policy)
    if region.error:
        for _change, result in pending:
            result.status, result.error = (
                "failed",
                f"cannot read the AMIs of {clients.region} again: {region.error}",
            )
        return results
    groups = frozenset((change.family, change.architecture) for change, _result in pending)
    needed = {
        (c.family, c.architecture): c for c in changes_for(region, policy, now, Selection(groups=groups))
    }
    targets = _targets(region, needed.values())
    for change, result in pending:
        current = needed.get((change.family, change.architecture))
        if current is None or (current.to != change.to and (not follow or current.to in unusable)):
            now_to = f"Latest now goes to {current.to}" if current is not None else "it needs no change now"
            result.status = "superseded"
            result.error = f"the group changed since the plan was read ({now_to}): not written"
            continue
        result.to = current.to
        try:
            # The change as the region reads now: the holders to untag are those of this read.
            _write(clients, policy, current, region, targets, result.written)
        except (ClientError, BotoCoreError, PointerRefused) as error:
            _failed(result, error)
    # An event may have rotated a group, or its target been disabled, between that read and these
    # writes: the written groups are read again and converged, so that the older or disabled AMI
    # written last is not left Latest (the event's own rotation ended before these writes).
    written = frozenset((c.family, c.architecture) for c, r in pending if r.status == "ok" and r.written)
    if written:
        after = converge(clients, policy, now, Selection(groups=written), load=load)
        by_group = {(r.family, r.architecture): r for r in after}
        for change, result in pending:
            again = by_group.get((change.family, change.architecture))
            if again is not None:
                result.to, result.status, result.error = again.to, again.status, again.error
                result.refused = again.refused
                result.written.extend(again.written)
        # (Where the region cannot be read again, the writes stand as made: the next event or run
        # settles what changed meanwhile.)
    return results


def converge(
    clients: RegionClients,
    policy: Policy,
    now: datetime,
    only: Selection = EVERY_GROUP,
    *,
    load: Callable[[RegionClients, Policy], RegionInventory] | None = None,
    first: RegionInventory | None = None,
    first_changes: list[LatestChange] | None = None,
) -> list[RotationResult]:
    """Rotate the region's groups (those `only` selects) until EC2 and SSM agree with the plan; `first`:
    the region as its caller has just read it (the first round's, not read again), and `first_changes`
    what its caller found it needs (not grouped again)."""
    read = load or load_images
    results: dict[tuple[str, str], RotationResult] = {}
    for round_ in range(MAX_ROUNDS):
        inventory = first if round_ == 0 and first is not None else read(clients, policy)
        if inventory.error:
            results[("*", "*")] = RotationResult.unreadable(clients.region, inventory.error)
            break
        blocked: dict[tuple[str, str], str] = {}
        if round_ == 0 and first is not None and first_changes is not None:
            changes = first_changes
        else:
            changes, blocked = rotation_by_group(inventory, policy, now, only)
        needing = {(change.family, change.architecture) for change in changes}
        for key, result in results.items():
            if result.status != "failed" or key in needing:
                continue
            if key in blocked:
                # Left as it is now by a policy error (a newer AMI in two families since): not settled.
                then = f"; then left unrotated: {blocked[key]}"
                if not (result.error or "").endswith(then):
                    result.error = f"{result.error}{then}"
            else:
                # Agreeing now, its failed write had landed (its answer lost) or another writer's did.
                result.status, result.error, result.refused = "ok", None, False
        if not changes:
            break
        targets = _targets(inventory, changes)
        for change in changes:
            key = (change.family, change.architecture)
            result = results.setdefault(
                key,
                RotationResult(
                    region=clients.region,
                    family=change.family,
                    architecture=change.architecture,
                    to=change.to,
                    written=[],
                ),
            )
            result.to = change.to
            try:
                _write(clients, policy, change, inventory, targets, result.written)
                result.status, result.error, result.refused = "ok", None, False
            except (ClientError, BotoCoreError, PointerRefused) as error:
                _failed(result, error)
    else:
        # Every round wrote: a last read says whether the groups agree now, or another writer kept
        # changing them (then not "ok": the next event or run settles them).
        last = read(clients, policy)
        unsettled = [] if last.error else changes_for(last, policy, now, only)
        for change in unsettled:
            written = results.get((change.family, change.architecture))
            if written is not None and written.status == "ok":  # a failed write keeps its own error
                written.status = "failed"
                written.error = (
                    f"still changing after {MAX_ROUNDS} rounds of writes: Latest now goes to {change.to}"
                )
    return [results[key] for key in sorted(results)]


def _failed(result: RotationResult, error: Exception) -> None:
    result.status, result.error = "failed", f"{type(error).__name__}: {error}"
    result.refused = isinstance(error, PointerRefused)


# EC2 sends the event of a stage within moments of the janitor's call; one sent later than this after
# the stage's record is of someone else's change.
JANITORS_EVENT_WITHIN = timedelta(minutes=30)
# The stage of the janitor's that makes EC2 send an event of this state.
_JANITORS_STAGE: dict[str, Stage] = {"disabled": "disable", "deregistered": "deregister"}


def _ledger_records(
    clients: RegionClients, policy: Policy, image_id: str, stage: Stage, sent: datetime | None
) -> bool:
    """The AMI's open ledger item records the janitor's own `stage` (not one adopted from tags, nor one
    a rescue closed: the owner may disable a rescued AMI; a region without a table records none), made
    about when the event was `sent`: an event sent long after it is of a later change (the owner enabled
    the AMI again, then disabled it)."""
    view = read_ledger_items(clients, policy.ledger.table, [image_id])
    item = view.items.get(image_id) if view is not None else None
    if item is None or not item.is_open:
        return False
    entry = item.stages.get(stage)
    if entry is None or entry.adopted:
        return False
    made = max(t for t in (entry.at, entry.redone, entry.confirmed) if t is not None)
    return sent is None or sent - made <= JANITORS_EVENT_WITHIN


def _holds_latest(clients: RegionClients, policy: Policy, image_id: str) -> bool:
    """The AMI carries a family's Latest tag key, or a family's parameter names it (True, too, where that
    cannot be read). The janitor moves Latest away before its stages, but an event may move it back
    meanwhile: the owner disables the newer build while a slice runs, and its event makes Latest of an
    AMI the slice then disables. One DescribeImages by id and the policy's parameters of the AMI's
    architecture (of every architecture once the AMI is gone), not the region's AMIs."""
    try:
        image = describe_image(clients, image_id)  # disabled included; none once deregistered
        tags = {f.latest.tag for f in policy.families if f.latest is not None and f.latest.tag}
        if image is not None and not tags.isdisjoint(image.tags):
            return True
        architectures = (image.architecture,) if image is not None else ARCHITECTURES
        names = frozenset(
            name
            for family in policy.families
            if family.latest is not None
            for name in map(family.latest.parameter_for, architectures)
            if name is not None
        )
        values = read_pointer_values(clients.ssm, Pointers(names, names), scanned={})
    except (ClientError, BotoCoreError, SourceFailed):
        return True  # unknown: the event reads the region and converges, as any other
    return image_id in values.values()


def handle_state_change(
    image_id: str,
    state: AmiState,
    clients: RegionClients,
    policy: Policy,
    now: datetime,
    *,
    load: Callable[[RegionClients, Policy], RegionInventory] | None = None,
    sent: datetime | None = None,
) -> AmiEventOutcome:
    """One EC2 AMI State Change event (`sent`: its time). Converges on EC2's current state, never on the
    event's order."""
    read = load or load_images

    def outcome(**fields: Any) -> AmiEventOutcome:
        return AmiEventOutcome(
            image_id=image_id, state=state, region=clients.region, mode=policy.mode, **fields
        )

    if policy.mode == "paused":
        return outcome(outcome="paused")
    if state == "failed":
        return outcome(outcome="failed-counted")
    stage = _JANITORS_STAGE.get(state)
    if (
        stage is not None
        and _ledger_records(clients, policy, image_id, stage, sent)
        and not _holds_latest(clients, policy, image_id)
    ):
        # The janitor moves Latest away from an AMI before any stage: its own disable or deregister of
        # an AMI that holds no Latest now leaves Latest where it was (one BatchGetItem, one
        # DescribeImages and GetParameters, not the region's AMIs read; the scheduled run reconciles
        # anything else).
        return outcome(outcome="ignored", why=f"the janitor's own {stage} stage, which the ledger records")
    inventory = read(clients, policy)
    if inventory.error:
        # Raise so the event is delivered again and then lands in the dead-letter queue.
        raise RuntimeError(f"cannot read the AMIs of {clients.region}: {inventory.error}")
    only = EVERY_GROUP
    image = next((i for i in inventory.images if i.image_id == image_id), None)
    if state in ("disabled", "deregistered") and image is not None and image.state == "available":
        described = describe_image(clients, image_id)
        if described is None or described.state != "available":
            # The listing lags the AMI the other way: rotated from it, Latest would stay on an AMI that
            # no longer launches, and the event be answered and lost. Tried again, as above.
            now_is = "gone" if described is None else described.state
            raise NotYet(
                f"{image_id} is {now_is} by its id, but DescribeImages lists it as available in "
                f"{clients.region} yet: the event is tried again"
            )
    if state == "available" and (image is None or image.state != "available"):
        described = describe_image(clients, image_id)
        if described is not None and described.state in ("available", "pending"):
            # The listing (or EC2's answer by id, still pending) lags the AMI: rotated without it, the
            # event would be answered and lost. Raise so the event is delivered again (then, past its
            # tries, lands in the dead-letter queue). An AMI disabled or gone since is no Latest: rotate.
            listed = "does not list it" if image is None else f"lists it as {image.state}"
            raise NotYet(
                f"{image_id} is {described.state} by its id, but DescribeImages {listed} in "
                f"{clients.region} yet: the event is tried again"
            )
    if state == "available" and image is not None:
        matching = [f.name for f in policy.families if f.match.matches(image.name, image.tags)]
        if not matching:
            named = [
                f.name
                for f in policy.families
                if f.match.tags and not f.match.by_tags_alone and f.match.names(image.name)
            ]
            if named and sent is not None and now - sent < TAGS_WAIT:
                raise NotYet(
                    f"{image_id} is named as family {', '.join(named)} names its AMIs, without its tags yet "
                    f"(a builder may tag it once it is available): the event is tried again until "
                    f"{TAGS_WAIT.seconds // 60} minutes after it was sent"
                )
            return outcome(outcome="ignored", why="the AMI belongs to no family")
        only = Selection(frozenset(matching), frozenset((name, image.architecture) for name in matching))
    # deregistered / disabled (or an AMI no longer listed): it may have been the Latest of any group.
    changes, blocked = rotation_for(inventory, policy, now, only)
    why_not: dict[str, Any] = {"not_rotated": blocked} if blocked else {}
    if only is EVERY_GROUP:
        why_not["why"] = (
            f"every group reconciled: DescribeImages does not list {image_id} (not yet, or no longer)"
            if image is None
            else f"every group reconciled: a {state} AMI may have been the Latest of any of them"
        )
    if policy.mode != "enforce":
        return outcome(outcome="dry-run", would=changes, **why_not)
    results = converge(clients, policy, now, only, load=read, first=inventory, first_changes=changes)
    failed = [r for r in results if r.status == "failed" and not r.refused]
    if failed:
        # The error is what the event's log and the dead-letter queue keep: it names what was
        # written before the failure (a tag moved while the parameter still names the old AMI).
        raise RuntimeError("rotation failed: " + "; ".join(map(_failure, failed)))
    # A parameter refused for good is in the answer (and its warning): tried again, the event would fail
    # the same way, holding the region's later events back and then sharing and copying its AMI.
    return outcome(outcome="rotated", rotations=results, **why_not)


def _failure(result: RotationResult) -> str:
    written = ", ".join(dict.fromkeys(result.written)) or "nothing"
    return (
        f"{result.family} ({result.architecture}) in {result.region} to {result.to}: {result.error} "
        f"(written before it: {written})"
    )
