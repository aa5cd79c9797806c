"""Applies a plan in enforce mode: the candidate clock, the retirement stages, rescues.

Every step writes its record before its change and tolerates finding its work already done, so a rerun
after a crash at any point (planned again from a fresh inventory) converges to the same end state. An AWS
error fails one image's step, never the run.
"""

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, computed_field

from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.errors import AWS_ERRORS, error_code, error_text, is_passing, sent_again
from ami_janitor.aws.inventory import describe_image, describe_own_image, read_launch_permissions
from ami_janitor.aws.ledger import Ledger, Prior
from ami_janitor.core import trust
from ami_janitor.core.model import (
    STAGES,
    Decision,
    Image,
    LaunchPermission,
    LedgerItem,
    Plan,
    RegionInventory,
    Stage,
    Status,
    iso,
)
from ami_janitor.core.policy import (
    CANDIDATE_TAG,
    PRIOR_DEPRECATION_TAG,
    PRIOR_PERMISSIONS_TAG,
    RETIRED_FROM_TAG,
)
from ami_janitor.core.sharing import PUBLIC, public_apart
from ami_janitor.core.slices import due_stages
from ami_janitor.core.tags import is_part_key, joined_values, split_values

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import LaunchPermissionTypeDef


# What the stages call (a slice calls only these) ...
STAGE_PERMISSIONS: list[str] = sorted(
    [
        "ec2:CreateTags",
        "ec2:DeleteSnapshot",
        "ec2:DeleteTags",
        "ec2:DeregisterImage",
        "ec2:DescribeImageAttribute",  # launch permissions, read before a disable records them
        "ec2:DescribeImages",  # a change refused on a retry: is the AMI in the state asked for?
        "ec2:DisableImage",
        "ec2:EnableImageDeprecation",
    ]
)
# ... and what a rescue calls besides: undo a deprecation, enable, grant launch permissions again.
PERMISSIONS: list[str] = sorted(
    set(STAGE_PERMISSIONS) | {"ec2:DisableImageDeprecation", "ec2:EnableImage", "ec2:ModifyImageAttribute"}
)

# A record the janitor cannot read back (a hand-edited tag, a new kind of launch permission) fails the
# image's step instead of the run: ValueError covers pydantic's validation errors.
STEP_ERRORS = (*AWS_ERRORS, ValueError)
CLOCK_ACTIONS = frozenset({"wait", "deprecate", "disable", "deregister"})
STAGE_ACTIONS = frozenset({"deprecate", "disable", "deregister"})
CREATE_TAGS_MAX_RESOURCES = 1000  # CreateTags: up to 1000 resource ids per call
GONE_CODES = frozenset({"InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"})
SNAPSHOT_TOLERATED = {"InvalidSnapshot.NotFound": "already deleted"}
# A snapshot no AMI the run knows uses, which EC2 still says is in use: for a while after DeregisterImage
# EC2 names the AMI just deregistered (eventual consistency), or an AMI made since the read uses it.
# Not final: the deregistration stays unconfirmed, and the next run tries again (a snapshot an AMI
# of its read uses is then kept, and the deregistration confirmed).
SNAPSHOT_IN_USE = "InvalidSnapshot.InUse"

# (region, AMIs whose rescue failed) -> AMIs that must not retire in this run.
AfterRescues = Callable[[str, set[str]], set[str]]
# The AMI with its launch permissions read now -> why its shares keep it (rule 5), or None.
SharesKeep = Callable[[Image], str | None]
# An AMI -> what a rescue may grant it again (sharing.rescue_grants under the run's policy).
RescueGrants = Callable[[Image], Collection[str]]
# How a stage result says its AMI was held back for what was read before it acted.
HELD_BACK = "held back: "
ResultAction = Literal[
    "adopt", "mark-candidate", "deprecate", "disable", "deregister", "rescue", "finish-deregistration"
]


class ActionResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    region: str
    image_id: str
    action: ResultAction
    status: Status
    error: str | None = None
    snapshots_deleted: list[str] = []
    detail: str | None = None


class ApplyResult(BaseModel):
    results: list[ActionResult] = []

    @computed_field  # type: ignore[prop-decorator]
    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if r.status == "failed")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def snapshots_deleted(self) -> list[str]:
        return [s for r in self.results for s in r.snapshots_deleted]


# ---- time and tag encodings -----------------------------------------------------------------------


def deprecate_at(now: datetime) -> datetime:
    """The DeprecateAt of the deprecate stage: a minute ahead, rounded up to the whole minute.

    The wall clock counts too: an apply can start minutes after `now` (a prompt), and EC2 refuses
    a time in the past.
    """
    ahead = max(now, datetime.now(UTC)) + timedelta(minutes=1)
    whole = ahead.replace(second=0, microsecond=0)
    return whole if whole == ahead else whole + timedelta(minutes=1)


def _is_permission_key(key: str) -> bool:
    return is_part_key(PRIOR_PERMISSIONS_TAG, key)


def permission_tags(permissions: Iterable[LaunchPermission]) -> dict[str, str]:
    """Launch permissions as "kind:value" keys joined by commas, packed whole into 256-character tag
    values (PRIOR_PERMISSIONS_TAG, then ":2", ":3", ...). No permission is recorded as an empty value."""
    return split_values(PRIOR_PERMISSIONS_TAG, (p.key for p in permissions))


def recorded_permissions(tags: Mapping[str, str]) -> list[LaunchPermission]:
    return [LaunchPermission.from_key(key) for key in joined_values(PRIOR_PERMISSIONS_TAG, tags)]


def janitor_state_tags(tags: Mapping[str, str]) -> list[str]:
    """The tags a rescue removes: the candidate clock and what the stages recorded."""
    return sorted(k for k in tags if k in (CANDIDATE_TAG, PRIOR_DEPRECATION_TAG) or _is_permission_key(k))


def _tag(ec2: "EC2Client", resources: Sequence[str], tags: Mapping[str, str]) -> None:
    for start in range(0, len(resources), CREATE_TAGS_MAX_RESOURCES):
        ec2.create_tags(
            Resources=list(resources[start : start + CREATE_TAGS_MAX_RESOURCES]),
            Tags=[{"Key": key, "Value": value} for key, value in tags.items()],
        )


# ---- changes a retry may meet ---------------------------------------------------------------------


def _shows_now(ec2: "EC2Client", image_id: str, shows: Callable[[Image | None], bool]) -> bool:
    """Whether EC2 now shows the AMI (None: no longer listed) as `shows` asks (a failed read: no)."""
    try:
        image = describe_image(RegionClients(ec2.meta.region_name, ec2=ec2), image_id)
    except AWS_ERRORS:
        return False
    return shows(image)


def _done_already(ec2: "EC2Client", image_id: str, shows: Callable[[Image], bool]) -> bool:
    """Whether EC2 now shows the AMI as a refused change would have left it (a failed read: no)."""
    return _shows_now(ec2, image_id, lambda image: image is not None and shows(image))


def _gone_now(ec2: "EC2Client", image_id: str) -> bool:
    """Whether EC2 no longer lists the AMI (a failed read: no)."""
    return _shows_now(ec2, image_id, lambda image: image is None or image.state == "deregistered")


def _change(
    ec2: "EC2Client", image_id: str, call: Callable[[], object], shows: Callable[[Image], bool]
) -> None:
    """Make a state change of the AMI. The SDK sends a change again when its answer was lost, and the
    retry meets the state its first attempt set; EC2 documents no error code for "already in that state",
    so any refusal is read back: the AMI in the state this run asked for is done, else the error stands."""
    try:
        call()
    except AWS_ERRORS as error:
        if error_code(error) in GONE_CODES or not _done_already(ec2, image_id, shows):
            raise


def _disable_image(ec2: "EC2Client", image_id: str) -> None:
    _change(ec2, image_id, lambda: ec2.disable_image(ImageId=image_id), lambda i: i.state == "disabled")


def _enable_image(ec2: "EC2Client", image_id: str) -> None:
    _change(ec2, image_id, lambda: ec2.enable_image(ImageId=image_id), lambda i: i.state == "available")


def _deprecate(ec2: "EC2Client", image_id: str, at: datetime | None) -> None:
    """EnableImageDeprecation at `at`, or DisableImageDeprecation where `at` is None."""

    def call() -> object:
        if at is None:
            return ec2.disable_image_deprecation(ImageId=image_id)
        return ec2.enable_image_deprecation(ImageId=image_id, DeprecateAt=at)

    _change(ec2, image_id, call, lambda i: i.deprecation_time == at)


# ---- snapshots ------------------------------------------------------------------------------------


class SnapshotOutcome(NamedTuple):
    """One snapshot of delete_unused_snapshots: deleted, or kept with a note, or failed with an error;
    `waiting`: EC2 said it is in use, by no AMI the run knows (tried again by the next run)."""

    snapshot_id: str
    deleted: bool
    note: str | None = None
    error: str | None = None
    waiting: bool = False


def delete_unused_snapshots(
    ec2: "EC2Client", snapshot_ids: Iterable[str], in_use: Iterable[str]
) -> list[SnapshotOutcome]:
    """Delete each snapshot no remaining AMI uses. Gone is fine; in use by an AMI the caller does not
    know of is waiting (SNAPSHOT_IN_USE); any other error is reported per snapshot so the caller goes
    on."""
    used = set(in_use)
    outcomes: list[SnapshotOutcome] = []
    for snapshot_id in snapshot_ids:
        if snapshot_id in used:
            outcomes.append(SnapshotOutcome(snapshot_id, False, note="kept: another AMI uses it"))
            continue
        try:
            ec2.delete_snapshot(SnapshotId=snapshot_id)
        except AWS_ERRORS as error:
            if error_code(error) == SNAPSHOT_IN_USE:
                note = f"still in use, EC2 says ({error_text(error)}): the next run tries again"
                outcomes.append(SnapshotOutcome(snapshot_id, False, note=note, waiting=True))
                continue
            tolerated = SNAPSHOT_TOLERATED.get(error_code(error))
            if tolerated and sent_again(error):
                # The SDK sent the call again (an answer lost, a 5xx): the first attempt deleted it.
                note = "deleted (the SDK's retry found it gone: the first answer was lost)"
                outcomes.append(SnapshotOutcome(snapshot_id, True, note=note))
                continue
            failure = None if tolerated else error_text(error)
            outcomes.append(SnapshotOutcome(snapshot_id, False, note=tolerated, error=failure))
        else:
            outcomes.append(SnapshotOutcome(snapshot_id, True))
    return outcomes


def _notes(outcomes: Iterable[SnapshotOutcome]) -> list[str]:
    return [f"{o.snapshot_id} {o.note}" for o in outcomes if o.note]


def _errors(outcomes: Iterable[SnapshotOutcome]) -> list[str]:
    return [f"{o.snapshot_id} not deleted: {o.error}" for o in outcomes if o.error]


# ---- rescue ---------------------------------------------------------------------------------------


def _restore_deprecation(ec2: "EC2Client", image: Image, now: datetime) -> str | None:
    """Put back the deprecation time the ledger recorded before its own deprecate stage."""
    entry = trust.undoable_stage(image, "deprecate")
    if entry is None:
        return None
    prior = entry.prior_deprecation
    if prior is None:
        if image.deprecation_time is None:
            return None
        _deprecate(ec2, image.image_id, None)
        return "deprecation cancelled"
    if prior <= now:
        # The owner's own deprecation time has passed: the image stays deprecated as it would have been.
        return f"left deprecated (recorded deprecation time {iso(prior)} has passed)"
    at = max(prior, deprecate_at(now))
    if image.deprecation_time == at:
        return None
    _deprecate(ec2, image.image_id, at)
    return f"deprecation restored to {iso(at)}"


def _restore_permissions(
    ec2: "EC2Client", image: Image, shared: Collection[str], refused: list[str], restored: list[str]
) -> list[str]:
    """Grant back what the ledger recorded before the disable stage; the public group and the janitor's
    own grants only where the family (`shared`: what it shares now) still lists them. The public group
    goes in a call of its own, as the sharer grants it: where EC2 refuses it (image block public access)
    the refusal is added to `refused` and stops nothing else (the rescue finishes and closes the clock,
    and reports it; the scheduled run's share plans the public group again, as for any member). What it
    grants back is added to `restored`."""
    restore, left = trust.restorable_permissions(image, shared)
    notes = [
        f"recorded launch permissions not restored ({why}): " + ",".join(keys)
        for why, keys in (
            ("public: true not set", [k for k in left if k == PUBLIC]),
            ("no longer in share_with", [k for k in left if k != PUBLIC]),
        )
        if keys
    ]
    shown = {p.key for p in image.launch_permissions or ()}
    restored.extend(k for k in restore if k in shown)
    wanted = set(restore) - shown
    granted: list[str] = []
    for keys in public_apart(sorted(wanted)):  # the public group alone: block public access refuses it
        grants = [LaunchPermission.from_key(key).to_api() for key in keys]
        try:
            ec2.modify_image_attribute(
                ImageId=image.image_id,
                LaunchPermission={"Add": cast("list[LaunchPermissionTypeDef]", grants)},
            )
        except AWS_ERRORS as error:
            if keys != [PUBLIC] or is_passing(error):
                raise
            refused.append(f"public launch permission not restored: {error_text(error)}")
            continue
        granted += keys
    restored.extend(granted)
    if granted:
        notes.insert(0, "launch permissions restored: " + ",".join(granted))
    return notes


# A rescue whose close finds a stage recorded since its read reads the AMI again and undoes that too, at
# most this often (a slice records one stage per AMI per run).
RESCUE_READS = 3


def _rescue_steps(
    ec2: "EC2Client",
    ledger: Ledger,
    image: Image,
    now: datetime,
    shared: Collection[str],
    done: list[str],
    refused: list[str],
) -> None:
    """Undo what the ledger says the stages did, noting each change in `done`; then close the clock, on
    the condition that no stage was recorded since `image` was read (a slice that read the AMI before
    it came back into use may be applying one): where one was, the AMI and its item are read again and
    that stage is undone too. The ledger is closed after EC2 is back: a crash leaves the clock open for
    a rerun to finish."""
    for _ in range(RESCUE_READS):
        lapsed: set[str] = set()
        item = _undo_stages(ec2, image, now, shared, done, refused, lapsed)
        if item is None:
            return
        redone = {stage: entry.redone for stage, entry in item.stages.items()}
        if ledger.close(image.image_id, now, item.compared_stage, redone) == "recorded":
            done.append("candidate clock closed in the ledger")
            if lapsed:
                # After the close: until then a rerun must still know them as the janitor's (a rescue
                # restores the janitor's grants only while share_with lists them).
                ledger.forget_grants(image.image_id, sorted(lapsed))
                done.append("recorded grants not restored forgotten: " + ",".join(sorted(lapsed)))
            return
        # Closed by another rescue meanwhile, or a stage recorded since the read: which, the ledger says.
        fresh = describe_own_image(ec2, image.region, image.image_id)
        if fresh is None:  # deregistered since: nothing left to rescue
            return
        image = fresh.model_copy(update={"ledger": ledger.read_items([image.image_id]).get(image.image_id)})
    raise RescueRaced(
        f"a stage was recorded again each of the {RESCUE_READS} times it was undone: the next run rescues it"
    )


class RescueRaced(RuntimeError):
    """Stages kept being recorded on the AMI while it was rescued."""


def _undo_stages(
    ec2: "EC2Client",
    image: Image,
    now: datetime,
    shared: Collection[str],
    done: list[str],
    refused: list[str],
    lapsed: set[str],
) -> LedgerItem | None:
    """What the rescue undoes, as `image` and its ledger item show it; the open item, to close after.
    Where it enables the AMI, the janitor's recorded grants it does not grant back (share_with dropped
    them, or EC2 refused them) are added to `lapsed`: DisableImage removed them, so they are no longer
    in place, and once forgotten the family's shares grant them again if it lists them (again)."""
    disable = trust.undoable_stage(image, "disable")
    # A disable the janitor did again (EC2 no longer showed it: the owner had enabled the AMI) was its
    # own DisableImage, whatever the first record says (already disabled by the owner, or adopted).
    redone = trust.recorded_stage(image, "disable")
    ours = (disable is not None and not disable.already_disabled) or (
        redone is not None and redone.redone is not None
    )
    enabled = image.state == "disabled" and ours
    if enabled:
        _enable_image(ec2, image.image_id)
        done.append("enabled")
    deprecation = _restore_deprecation(ec2, image, now)
    done += [deprecation] if deprecation else []
    restored: list[str] = []
    done += _restore_permissions(ec2, image, shared, refused, restored)
    if (enabled or trust.grants_removed(image)) and image.ledger is not None:
        # DisableImage removed them (whoever enabled the AMI since): what is not granted back now is no
        # longer the janitor's, nor in place; a share of the same account shown now is someone else's.
        lapsed.update(set(image.ledger.grants) - set(restored))
    done += trust.left_as_adopted(image)
    marked = [s.snapshot_id for s in (image.ledger.snapshots if image.ledger else ())]
    if marked:
        ec2.delete_tags(Resources=marked, Tags=[{"Key": RETIRED_FROM_TAG}])
        done.append("snapshots unmarked")
    stale = janitor_state_tags(image.tags)
    if stale:
        ec2.delete_tags(Resources=[image.image_id], Tags=[{"Key": key} for key in stale])
        done.append("janitor tags removed")
    # Closed last (by the caller): until then a rerun rescues it again and finishes what a crash left.
    return trust.open_item(image)


def rescue_image(
    clients: RegionClients, ledger: Ledger, image: Image, now: datetime, *, shared: Collection[str] = ()
) -> list[ActionResult]:
    """Undo the retirement of one AMI as the ledger recorded it: enable it, restore its deprecation
    time and the launch permissions it had (public and the janitor's own grants only where `shared`, what
    its family shares now, lists them), close its clock."""
    if image.ledger is None:
        try:
            found = ledger.read_items([image.image_id])
        except STEP_ERRORS as error:
            failed = ActionResult(
                region=clients.region, image_id=image.image_id, action="rescue", status="failed"
            )
            return [failed.model_copy(update={"error": f"ledger: {error_text(error)}"})]
        image = image.model_copy(update={"ledger": found.get(image.image_id)})
    return [_rescue(clients.region, clients.ec2, ledger, image, now, shared)]


def _rescue(
    region: str, ec2: "EC2Client", ledger: Ledger, image: Image, now: datetime, shared: Collection[str]
) -> ActionResult:
    done: list[str] = []
    refused: list[str] = []  # grants EC2 refused for good: reported, the rescue finished all the same
    result = ActionResult(region=region, image_id=image.image_id, action="rescue", status="skipped")
    try:
        _rescue_steps(ec2, ledger, image, now, shared, done, refused)
    except (*STEP_ERRORS, RescueRaced) as error:
        return result.model_copy(
            update={"status": "failed", "error": error_text(error), "detail": _join(done)}
        )
    if refused:
        reported = _join(dict.fromkeys(refused))
        return result.model_copy(update={"status": "failed", "error": reported, "detail": _join(done)})
    if not done:
        return result.model_copy(update={"detail": "nothing to undo (the ledger records no stage)"})
    return result.model_copy(update={"status": "ok", "detail": _join(done)})


def _join(notes: Iterable[str]) -> str | None:
    text = "; ".join(notes)
    return text or None


# ---- one region -----------------------------------------------------------------------------------


class _RegionRun:
    """Applies the decisions of one region, each change recorded in the ledger first and confirmed
    after; remembers what it deregistered so that snapshot deletion never trusts a stale view."""

    def __init__(
        self,
        region: str,
        ec2: "EC2Client",
        ledger: Ledger,
        inventory: RegionInventory,
        now: datetime,
        shares_keep: SharesKeep | None = None,
    ) -> None:
        self.region = region
        self.ec2 = ec2
        self.ledger = ledger
        self.inventory = inventory
        self.now = now
        # Where the AMIs were read after their plan (a slice): the launch permissions a stage reads
        # are judged again, and a share the plan did not see holds the AMI back.
        self.shares_keep = shares_keep
        self.images = {image.image_id: image for image in inventory.images}
        self.gone: set[str] = set()
        self.results: list[ActionResult] = []
        # The last stage the ledger records per AMI (the condition of the next stage's write).
        self.last: dict[str, Stage | None] = {}
        # AMIs this run takes through deregistration: their stages' mirror tags would go with them, so
        # they wait here, written only where the AMI stays (its deregistration failed or was held).
        self.deregistering: set[str] = set()
        # AMIs whose deregistration this run (a slice) is to attempt, known before any starts: a
        # snapshot only they use besides an AMI is recorded as that AMI's too (see deregister).
        self.retiring: frozenset[str] = frozenset()
        self.unmirrored: dict[str, dict[str, str]] = {}
        # AMIs this run disabled: EC2 removed their launch permissions.
        self.disabled: set[str] = set()

    def mirror_tags(self, image_id: str, tags: Mapping[str, str]) -> None:
        """A stage's mirror tags (the ledger holds the record), unless the AMI is deregistered in this
        same run: two CreateTags calls saved per AMI a run retires at once (written after its stages
        where it stays: mirror_unretired)."""
        if not tags:
            return
        if image_id in self.deregistering:
            self.unmirrored.setdefault(image_id, {}).update(tags)
        else:
            _tag(self.ec2, [image_id], tags)

    def mirror_unretired(self, image_id: str) -> None:
        """The mirror tags held back for a deregistration that did not happen: the AMI stays, deprecated
        or disabled, and people read its record there. The ledger holds it whatever this write does."""
        tags = self.unmirrored.pop(image_id, None)
        if tags and image_id not in self.gone:
            try:
                _tag(self.ec2, [image_id], tags)
            except AWS_ERRORS:
                return

    def result(self, image_id: str, action: ResultAction, status: Status, **fields: object) -> ActionResult:
        return ActionResult(region=self.region, image_id=image_id, action=action, status=status, **fields)

    def snapshots_in_use(self, besides: str | None = None, going: Collection[str] = ()) -> set[str]:
        """Snapshots of the remaining AMIs (other than `besides` and those `going`). Any state counts: a
        disabled AMI still needs its snapshots. Only this run's deregistrations free a snapshot."""
        remaining = (
            i
            for i in self.images.values()
            if i.image_id not in self.gone and i.image_id != besides and i.image_id not in going
        )
        return {s for i in remaining for s in i.snapshot_ids}

    # the stages (their clocks are started by mark_candidates) ------------------------------------------
    def run_stages(self, image_id: str, stages: Sequence[Stage], blocked: str | None) -> list[ActionResult]:
        """One AMI's due stages, in order; their results (the caller keeps them). Safe to run for several
        AMIs at once: what it shares (`gone`, `deregistering`, `last`) only grows, one key at a time, and
        a snapshot counts as used until its AMI is gone."""
        results: list[ActionResult] = []
        image = self.images.get(image_id)
        if image is None and blocked is None:
            blocked = "not in the region's inventory"
        if "deregister" in stages:
            self.deregistering.add(image_id)
        for index, stage in enumerate(stages):
            if blocked is not None or image is None:
                results.append(self.result(image_id, stage, "skipped", detail=blocked))
                continue
            result = self.stage(stage, image)
            results.append(result)
            if result.status != "ok" or (result.detail or "").startswith("recorded by another run"):
                blocked = f"{stages[index]} {'failed' if result.status == 'failed' else 'not applied'}"
        if "deregister" in stages:
            self.mirror_unretired(image_id)
        return results

    def _previous(self, image: Image) -> Stage | None:
        if image.image_id in self.last:
            return self.last[image.image_id]
        item = trust.open_item(image)
        return item.compared_stage if item is not None else None

    def _record(self, stage: Stage, image: Image, prior: Prior, snapshots: Sequence[str] = ()) -> bool:
        """Record the stage in the ledger before its change; False where another run recorded it."""
        entry = trust.recorded_stage(image, stage)
        if entry is not None:
            # Recorded by an earlier run, and EC2 does not show it (that run stopped before EC2 took it,
            # or the owner undid it since): done again, `prior` recorded in place of the first record's,
            # unless a rescue closed the item since this run read it, or another run did it again since
            # (the ledger says so, not the item as read): that run's record of what it changed stands.
            written = self.ledger.redo_stage(image.image_id, stage, self.now, prior, entry.redone)
            return written == "recorded"
        previous = self._previous(image)
        written = self.ledger.record_stage(
            image.image_id, stage, self.now, prior, previous=previous, snapshots=snapshots
        )
        if written == "recorded":
            # The latest by order, as the ledger keeps it (Ledger.record_stage).
            self.last[image.image_id] = max(stage, previous or stage, key=STAGES.index)
        return written == "recorded"

    def stage(self, stage: Stage, image: Image) -> ActionResult:
        entry = trust.recorded_stage(image, stage)
        if entry is not None and trust.shows(image, stage, entry):
            # Done by an earlier delivery of its slice that stopped before the slice was counted: done
            # again, the stage would record the janitor's own change as what a rescue gives back.
            done = ["done already: EC2 shows it"]
            if entry.confirmed is None:
                done += self._confirm(image.image_id, stage)
            return self.result(image.image_id, stage, "ok", detail=_join(done))
        apply = {"deprecate": self.deprecate, "disable": self.disable, "deregister": self.deregister}[stage]
        try:
            return apply(image)
        except STEP_ERRORS as error:
            if stage == "deregister" and error_code(error) in GONE_CODES:
                self.gone.add(image.image_id)  # its snapshots no longer count as used by it
            return self.result(image.image_id, stage, "failed", error=error_text(error))

    def _not_recorded(self, image: Image, stage: Stage) -> ActionResult:
        return self.result(image.image_id, stage, "skipped", detail="recorded by another run since this plan")

    def deprecate(self, image: Image) -> ActionResult:
        target = deprecate_at(self.now)
        # What the stage changes is the deprecation time EC2 shows now, done again too: an earlier run's
        # record (that run stopped before EC2 took it, or a rescue stopped half way) saw the same time,
        # and where the owner set one since, a rescue must give back theirs, not the first record's.
        prior = image.deprecation_time
        if not self._record("deprecate", image, Prior(deprecation=prior)):
            return self._not_recorded(image, "deprecate")
        done = ["recorded in the ledger"]
        mirror = iso(prior) or "none"
        if image.tags.get(PRIOR_DEPRECATION_TAG) != mirror:
            self.mirror_tags(image.image_id, {PRIOR_DEPRECATION_TAG: mirror})
        # An earlier deprecation time (the owner's, or ours from a run that crashed) is kept, never postponed.
        if image.deprecation_time is None or image.deprecation_time > target:
            _deprecate(self.ec2, image.image_id, target)
            done.append(f"deprecated at {iso(target)}")
        else:
            done.append(f"kept the earlier deprecation time {iso(image.deprecation_time)}")
        done += self._confirm(image.image_id, "deprecate")
        return self.result(image.image_id, "deprecate", "ok", detail=_join(done))

    def _shared_since(self, image: Image, permissions: tuple[LaunchPermission, ...]) -> str | None:
        """Why the AMI's shares, as just read, keep it (None where nothing was read after the plan)."""
        if self.shares_keep is None:
            return None
        return self.shares_keep(image.model_copy(update={"launch_permissions": permissions}))

    def _permissions(self, image: Image) -> tuple[LaunchPermission, ...]:
        if image.launch_permissions is not None:
            return image.launch_permissions
        return read_launch_permissions(self.ec2, image.image_id)

    def disable(self, image: Image) -> ActionResult:
        permissions = self._permissions(image)
        # DisableImage removes every launch permission: a share the plan did not see (outside
        # share_with and the janitor's own grants) keeps the AMI instead, untouched.
        shared = self._shared_since(image, permissions)
        if shared is not None:
            detail = f"{HELD_BACK}{shared}: not disabled, its launch permissions left as they are"
            return self.result(image.image_id, "disable", "skipped", detail=detail)
        entry = trust.recorded_stage(image, "disable")
        prior = tuple(sorted(p.key for p in permissions))
        if entry is not None and not entry.adopted:
            # Done again (EC2 no longer shows it): what DisableImage removes now joins the first record,
            # which stands (a rescue stopped half way may not have granted it back yet), so that a rescue
            # gives back the shares the owner made since too. A record adopted from tags adds nothing.
            prior = tuple(sorted({*entry.prior_launch_permissions, *prior}))
        already = image.state == "disabled"
        if not self._record("disable", image, Prior(launch_permissions=prior, already_disabled=already)):
            return self._not_recorded(image, "disable")
        record = permission_tags(LaunchPermission.from_key(k) for k in prior)
        self.mirror_tags(image.image_id, record)
        stale = [k for k in image.tags if _is_permission_key(k) and k not in record]
        if stale:
            self.ec2.delete_tags(Resources=[image.image_id], Tags=[{"Key": key} for key in stale])
        if image.state != "disabled":
            _disable_image(self.ec2, image.image_id)
        self.disabled.add(image.image_id)
        late = self._confirm(image.image_id, "disable")
        removed = ",".join(prior) or "none"
        return self.result(
            image.image_id,
            "disable",
            "ok",
            detail=_join(
                ["recorded in the ledger", "disabled", f"launch permissions removed: {removed}", *late]
            ),
        )

    def _confirm(self, image_id: str, stage: Stage) -> list[str]:
        """The stage's confirmation in the ledger, once EC2 took it; where that write fails, the stage is
        still done (the report says so, with what it did) and the next run confirms it (confirm_shown,
        finish_deregistrations): a note to add to the result's detail."""
        try:
            if stage == "deregister":
                self.ledger.confirm_deregistered(image_id, self.now)
            elif (
                self.ledger.confirm_stage(image_id, stage, self.now) != "recorded"
                # A rescue closed the clock after the stage was recorded, maybe before EC2 took it (it
                # then undid nothing): open again, the next run rescues it where it is still in use.
                and self.ledger.reopen(image_id, stage) == "recorded"
            ):
                return [
                    "a rescue closed its clock while this stage was applied: opened again, the next "
                    "run rescues it where it is still in use"
                ]
        except STEP_ERRORS as error:
            return [f"the ledger's confirmation not written ({error_text(error)}): the next run writes it"]
        return []

    def deregister(self, image: Image) -> ActionResult:
        # An AMI that was never disabled (a lifecycle without the disable stage) still holds its launch
        # permissions, and nothing read them since the plan: read here, one call for such an AMI only.
        if self.shares_keep is not None and image.state != "disabled" and image.image_id not in self.disabled:
            shared = self._shared_since(image, self._permissions(image))
            if shared is not None:
                detail = f"{HELD_BACK}{shared}: not deregistered"
                return self.result(image.image_id, "deregister", "skipped", detail=detail)
        own = list(image.snapshot_ids)
        # The ledger records the AMI's own snapshots before DeregisterImage: the only ones a later run
        # may delete if this one stops in between. A snapshot another AMI uses is not this image's,
        # unless this run deregisters that AMI too: side by side, each would otherwise see the other
        # still there and record it for neither, and a run stopped after both left it to no run. Each
        # records it; whichever goes last frees it (a deletion always checks what still uses it).
        staying = self.snapshots_in_use(besides=image.image_id, going=self.retiring)
        mine = [s for s in own if s not in staying]
        if not self._record("deregister", image, Prior(), snapshots=mine):
            return self._not_recorded(image, "deregister")
        if mine:
            _tag(self.ec2, mine, {RETIRED_FROM_TAG: image.image_id})  # the mirror, for people
        try:
            answer = _deregister_image(self.ec2, image.image_id)
        except AWS_ERRORS as error:
            # Gone since the plan read it: our own call whose answer was lost (the SDK retried it, or
            # its retries ran out on a call EC2 took), or someone else's. Either way it is deregistered;
            # its recorded snapshots are handled now.
            if error_code(error) not in GONE_CODES and not _gone_now(self.ec2, image.image_id):
                raise
            answer = None
        self.gone.add(image.image_id)
        reported = (answer or {}).get("DeleteSnapshotResults") or []
        # With the answer lost, EC2 may have deleted the recorded snapshots with the AMI: those now
        # gone count as deleted by this stage.
        result, waiting = _snapshots_after(
            self, image, own, reported, deleted_if_gone=mine if answer is None else ()
        )
        if result.status == "ok" and not waiting:
            late = self._confirm(image.image_id, "deregister")
            if late:
                return result.model_copy(update={"detail": _join([*filter(None, [result.detail]), *late])})
        return result

    # rescues ------------------------------------------------------------------------------------------

    def rescue(self, decision: Decision, rescue_grants: RescueGrants | None) -> None:
        image = self.images.get(decision.image_id)
        if image is None:
            self.results.append(
                self.result(decision.image_id, "rescue", "failed", error="not in the region's inventory")
            )
            return
        # Judged on the AMI, not the decision's family: one a tag put in several families gets only
        # what all of them share.
        shared = rescue_grants(image) if rescue_grants is not None else ()
        self.results.append(_rescue(self.region, self.ec2, self.ledger, image, self.now, shared))


def _deregister_image(ec2: "EC2Client", image_id: str) -> Mapping[str, Any]:
    """DeregisterImage, EC2 deleting the AMI's own snapshots. A partition that does not know
    DeleteAssociatedSnapshots refuses it (UnknownParameter): deregistered without it there, and the
    snapshots are deleted one by one, as where EC2 reports no DeleteSnapshotResults."""
    try:
        return ec2.deregister_image(ImageId=image_id, DeleteAssociatedSnapshots=True)
    except ClientError as error:
        if error_code(error) != "UnknownParameter":
            raise
    return ec2.deregister_image(ImageId=image_id)


def _snapshots_after(
    run: _RegionRun,
    image: Image,
    own: list[str],
    reported: Sequence[Any],
    *,
    deleted_if_gone: Collection[str] = (),
) -> tuple[ActionResult, bool]:
    """The deregistration's result, and whether a snapshot waits for the next run (SNAPSHOT_IN_USE).
    `deleted_if_gone`: snapshots a lost DeregisterImage answer may have deleted (found gone: deleted)."""
    notes = ["recorded in the ledger"]
    if image.root_device_type == "instance-store":
        notes.append("instance-store AMI: its S3 bundle is left")
    if reported or not own:
        codes = {r.get("SnapshotId", "?"): r.get("ReturnCode", "?") for r in reported}
        # "skipped": another AMI still uses the snapshot. Other codes need the operator.
        problems = [f"{s} {code}" for s, code in codes.items() if code not in ("success", "skipped")]
        notes += [f"{s} kept: another AMI uses it" for s, code in codes.items() if code == "skipped"]
        result = run.result(
            image.image_id,
            "deregister",
            "failed" if problems else "ok",
            error=_join(["deregistered, but snapshots were not deleted", *problems]) if problems else None,
            snapshots_deleted=[s for s, code in codes.items() if code == "success"],
            detail=_join(notes),
        )
        return result, False
    # No DeleteSnapshotResults (an older partition, the emulator): delete what no remaining AMI uses.
    outcomes = [
        SnapshotOutcome(o.snapshot_id, True, note="deleted with the AMI (its answer lost)")
        if o.snapshot_id in deleted_if_gone and o.note == SNAPSHOT_TOLERATED["InvalidSnapshot.NotFound"]
        else o
        for o in delete_unused_snapshots(run.ec2, own, run.snapshots_in_use())
    ]
    errors = _errors(outcomes)
    result = run.result(
        image.image_id,
        "deregister",
        "failed" if errors else "ok",
        error=_join(["deregistered, but snapshots were not deleted", *errors]) if errors else None,
        snapshots_deleted=[o.snapshot_id for o in outcomes if o.deleted],
        detail=_join(notes + _notes(outcomes)),
    )
    return result, any(o.waiting for o in outcomes)


def adopt(run: _RegionRun, rescued: Collection[str] = ()) -> str | None:
    """The first enforce run with a ledger writes what it adopts from the janitor tags (the plan
    was made on that view), then marks the region adopted. Returns why stages must wait, if any.
    `rescued`: the AMIs this run rescues, whose adopted clocks it closes at once: no clock tag is
    mirrored on them (their rescue removes only the janitor tags the plan read)."""
    ledger = run.inventory.ledger
    if ledger is None or ledger.adopted is not None:
        return None
    try:
        written: set[str] = set()
        for image_id, item in sorted(ledger.adopting.items()):
            if run.ledger.adopt(item) == "recorded":
                written.add(image_id)
                run.results.append(run.result(image_id, "adopt", "ok", detail="janitor tags adopted"))
            else:
                detail = "the ledger has an item since this plan's read (another run): not adopted"
                run.results.append(run.result(image_id, "adopt", "skipped", detail=detail))
        if run.ledger.record_adoption(run.now) != "recorded":
            # Another run adopted the region since this plan read it: the ledger holds its clocks, not
            # this plan's, so no mirror is written from them and nothing is decided on them this run.
            return "another run adopted the janitor tags since this plan was made"
        # The mirror says what the ledger now says: the adopted clocks start at this run.
        clocks = [
            i
            for i, item in sorted(ledger.adopting.items())
            if item.first_candidate is not None and i not in rescued and i in written
        ]
        for start in range(0, len(clocks), CREATE_TAGS_MAX_RESOURCES):
            _tag(
                run.ec2,
                clocks[start : start + CREATE_TAGS_MAX_RESOURCES],
                {CANDIDATE_TAG: iso(run.now) or ""},
            )
    except STEP_ERRORS as error:
        run.results.append(run.result("-", "adopt", "failed", error=f"ledger adoption: {error_text(error)}"))
        return "the ledger could not adopt the janitor tags"
    return None


def confirm_shown(run: _RegionRun) -> None:
    """Confirm the stages EC2 took whose confirmation a stopped run never wrote."""
    for image in run.images.values():
        for stage in trust.unconfirmed_stages(image):
            try:
                run.ledger.confirm_stage(image.image_id, stage, run.now)
            except STEP_ERRORS as error:
                run.results.append(
                    run.result(image.image_id, stage, "failed", error=f"ledger: {error_text(error)}")
                )


def mark_candidates(run: _RegionRun, decisions: Sequence[Decision]) -> set[str]:
    """Start the stage clock of new candidates in the ledger (then the mirror tag); returns the images
    whose clock could not be recorded."""
    new = [
        d.image_id
        for d in decisions
        if d.action in CLOCK_ACTIONS
        and d.image_id in run.images
        and trust.open_item(run.images[d.image_id]) is None
    ]
    value = iso(run.now) or ""
    failed: set[str] = set()
    recorded: list[str] = []
    for image_id in new:
        try:
            written = run.ledger.record_candidate(image_id, run.now)
        except STEP_ERRORS as error:
            failed.add(image_id)
            run.results.append(
                run.result(image_id, "mark-candidate", "failed", error=f"ledger: {error_text(error)}")
            )
            continue
        if written == "already-recorded":
            failed.add(image_id)  # another run started its clock since this plan: it acts, not us
            run.results.append(
                run.result(image_id, "mark-candidate", "skipped", detail="recorded by another run")
            )
            continue
        recorded.append(image_id)
        run.last[image_id] = None
    for start in range(0, len(recorded), CREATE_TAGS_MAX_RESOURCES):
        batch = recorded[start : start + CREATE_TAGS_MAX_RESOURCES]
        try:
            _tag(run.ec2, batch, {CANDIDATE_TAG: value})
            note = f"ledger first_candidate={value}; tag {CANDIDATE_TAG}"
        except AWS_ERRORS as error:
            note = f"ledger first_candidate={value}; mirror tag not written ({error_text(error)})"
        run.results += [run.result(i, "mark-candidate", "ok", detail=note) for i in batch]
    return failed


def mirror_clocks(run: _RegionRun, decisions: Sequence[Decision]) -> None:
    """The candidate-since tag of a candidate's running clock says what the ledger says (a run that
    stopped between the two left it unwritten, or someone changed it): written again, batched per
    value. Kept and rescued AMIs are left alone (a rescue removes the tag)."""
    by_value: dict[str, list[str]] = {}
    candidates = (
        run.images[d.image_id] for d in decisions if d.action in CLOCK_ACTIONS and d.image_id in run.images
    )
    for image in candidates:
        item = trust.open_item(image)
        value = iso(item.first_candidate) if item is not None else None
        if value and image.tags.get(CANDIDATE_TAG) != value:
            by_value.setdefault(value, []).append(image.image_id)
    for value, image_ids in sorted(by_value.items()):
        for start in range(0, len(image_ids), CREATE_TAGS_MAX_RESOURCES):
            try:
                _tag(run.ec2, image_ids[start : start + CREATE_TAGS_MAX_RESOURCES], {CANDIDATE_TAG: value})
            except AWS_ERRORS:
                continue  # only the mirror: the next run writes it again
    # So are the records of its stages, where the AMI carries none of them (a run that stopped between
    # a stage and its mirror, or whose deregistration after them failed); one that differs is reported
    # as tampered, not rewritten.
    for decision in decisions:
        staged = run.images.get(decision.image_id)
        missing = (
            _unmirrored_stages(staged) if staged is not None and decision.action in CLOCK_ACTIONS else {}
        )
        if missing:
            try:
                _tag(run.ec2, [decision.image_id], missing)
            except AWS_ERRORS:
                continue


def _unmirrored_stages(image: Image) -> dict[str, str]:
    """The mirror tags of the stages the ledger records the janitor made (not adopted from tags) that
    the AMI carries no tag of."""
    tags: dict[str, str] = {}
    deprecated = trust.undoable_stage(image, "deprecate")
    if deprecated is not None and PRIOR_DEPRECATION_TAG not in image.tags:
        tags[PRIOR_DEPRECATION_TAG] = iso(deprecated.prior_deprecation) or "none"
    disabled = trust.undoable_stage(image, "disable")
    if disabled is not None and not any(_is_permission_key(key) for key in image.tags):
        tags.update(permission_tags(LaunchPermission.from_key(k) for k in disabled.prior_launch_permissions))
    return tags


def finish_deregistrations(run: _RegionRun, planned: AbstractSet[str]) -> None:
    """Delete the snapshots the ledger recorded for AMIs a crashed run deregistered (and only those), of
    the items the plan finishes within its cap (`planned`: its unfinished_snapshots); the others wait."""
    free = {s.snapshot_id for s in trust.unfinished_snapshots(run.inventory)}
    for item in trust.unfinished_deregistrations(run.inventory):
        image_id = item.image_id
        snapshot_ids = [s.snapshot_id for s in item.snapshots if s.snapshot_id in free]
        if not planned >= set(snapshot_ids):
            continue  # past the plan's max_actions_per_run: a later run finishes it
        outcomes = delete_unused_snapshots(run.ec2, snapshot_ids, run.snapshots_in_use())
        errors = _errors(outcomes)
        if not errors and not any(o.waiting for o in outcomes):
            try:
                run.ledger.confirm_deregistered(image_id, run.now)
            except STEP_ERRORS as error:
                errors.append(f"ledger: {error_text(error)}")
        run.results.append(
            run.result(
                image_id,
                "finish-deregistration",
                "failed" if errors else "ok",
                error=_join(errors),
                snapshots_deleted=[o.snapshot_id for o in outcomes if o.deleted],
                detail=_join(["snapshots the ledger recorded", *_notes(outcomes)]),
            )
        )


LedgerFor = Callable[[str], Ledger]
# How a slice's AMIs run side by side, in order of its entries (a thread pool's map, or a simulation's).
SlicePart = tuple[str, Sequence[Stage], str | None]
SideBySide = Callable[
    [Callable[[SlicePart], list[ActionResult]], Sequence[SlicePart]], Iterable[list[ActionResult]]
]
# (region, decisions whose due stages nothing blocks) -> their results: the run's slices.
RunDue = Callable[[str, list[Decision]], list[ActionResult]]


def apply_plan(
    plan: Plan,
    inventories: Mapping[str, RegionInventory],
    clients_for: Callable[[str], RegionClients],
    now: datetime,
    *,
    ledger_for: LedgerFor,
    rescue_grants: RescueGrants | None = None,
    after_rescues: AfterRescues | None = None,
    run_due: RunDue | None = None,
) -> ApplyResult:
    """Apply an enforce plan region by region: the adoption of older janitor tags (first run with a
    ledger), rescues, then `after_rescues(region, failed rescues)` (the run writes Latest there; it
    returns AMIs that must not retire now), candidate clocks, the snapshots of deregistrations a crash
    interrupted (those the ledger recorded, only), then the due stages: through `run_due` (the run's
    slices, which read their AMIs again), else here on the plan's view. `rescue_grants(image)` says which
    grants a rescue may make again (none where not given). AWS errors become failed results; the run
    goes on."""
    if plan.mode != "enforce":
        raise ValueError(f"apply_plan needs an enforce plan, got mode {plan.mode!r}")
    regions = [r.region for r in plan.regions if r.status == "ok"]
    # A region the plan calls ok must come with the clean inventory it was planned from.
    unusable = [r for r in regions if r not in inventories or inventories[r].error is not None]
    if unusable:
        raise ValueError(f"no usable inventory for region(s) {', '.join(unusable)} that the plan calls ok")
    results: list[ActionResult] = []
    for region in regions:
        decisions = [d for d in plan.decisions if d.region == region]
        run = _RegionRun(region, clients_for(region).ec2, ledger_for(region), inventories[region], now)
        unfinished = frozenset(plan.unfinished_snapshots)
        staged = _apply_region(run, decisions, rescue_grants, after_rescues, unfinished)
        for decision, blocked in staged:
            if blocked is not None or run_due is None:
                run.results += run.run_stages(decision.image_id, due_stages(decision), blocked)
        results += run.results
        if run_due is not None:
            results += run_due(region, [d for d, blocked in staged if blocked is None])
    return ApplyResult(results=results)


def _apply_region(
    run: _RegionRun,
    decisions: Sequence[Decision],
    rescue_grants: RescueGrants | None,
    after_rescues: AfterRescues | None,
    unfinished: AbstractSet[str],
) -> list[tuple[Decision, str | None]]:
    """Everything but the due stages, which it returns in plan order with what blocks each, if any."""
    waiting = adopt(run, {d.image_id for d in decisions if d.action == "rescue"})
    # Rescues first: an AMI back in use must launch again before anything else is changed.
    for decision in decisions:
        if decision.action == "rescue":
            run.rescue(decision, rescue_grants)
    failed = {r.image_id for r in run.results if r.status == "failed"}
    pinned = after_rescues(run.region, failed) if after_rescues is not None else set()
    if waiting is None:
        confirm_shown(run)
        mirror_clocks(run, decisions)
        finish_deregistrations(run, unfinished)
    unclocked = mark_candidates(run, decisions) if waiting is None else set()
    staged: list[tuple[Decision, str | None]] = []
    for decision in decisions:
        if not due_stages(decision):
            continue
        blocked = waiting
        if decision.image_id in unclocked:
            blocked = "the ledger could not start its clock"
        if decision.image_id in pinned:
            blocked = "Latest could not be moved away from it"
        staged.append((decision, blocked))
    return staged


# Why an AMI's stages were skipped where a slice's invocation ran out of time (counted as not run).
OUT_OF_TIME = "the invocation's time ran out before it: the next run plans it again"


def apply_stages(
    region: str,
    ec2: "EC2Client",
    ledger: Ledger,
    inventory: RegionInventory,
    work: Sequence[SlicePart],
    now: datetime,
    *,
    out_of_time: Callable[[], bool] | None = None,
    workers: int = 1,
    side_by_side: SideBySide | None = None,
    shares_keep: SharesKeep | None = None,
) -> list[ActionResult]:
    """One slice: each (AMI, its due stages, why it is held back or None) on `inventory`, the slice's
    AMIs as read when it started and the other AMIs that share their snapshots; `workers` AMIs at a
    time (each AMI's calls go one after another: several in flight keep a paced client at its token
    buckets' rate rather than at one call's latency). Results in the order of `work`. Once
    `out_of_time()` says so, the AMIs left are not started (their stages skipped): an AMI is never left
    half way by a timeout, and the next run plans the rest again. `shares_keep` judges the launch
    permissions the disable stage reads (and the deregister stage of an AMI never disabled): an AMI
    they keep is held back there, its later stages skipped."""
    run = _RegionRun(region, ec2, ledger, inventory, now, shares_keep)
    run.retiring = frozenset(
        image_id for image_id, stages, held in work if held is None and "deregister" in stages
    )

    def one(entry: SlicePart) -> list[ActionResult]:
        image_id, stages, held = entry
        if held is None and out_of_time is not None and out_of_time():
            held = OUT_OF_TIME
        return run.run_stages(image_id, stages, held)

    if side_by_side is not None:
        return [r for results in side_by_side(one, work) for r in results]
    if workers <= 1:
        return [r for entry in work for r in one(entry)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [r for results in pool.map(one, work) for r in results]
