"""Applies a plan in enforce mode: the candidate clock, the retirement stages, rescues.

Every step writes its record before its change and tolerates finding its work already done, so a rerun
after a crash at any point (planned again from a fresh inventory) converges to the same end state. An AWS
error fails one image's step, never the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, computed_field

from ami_janitor.aws.errors import AWS_ERRORS, error_code, error_text
from ami_janitor.aws.inventory import read_launch_permissions
from ami_janitor.core.model import (
    Decision,
    Image,
    LaunchPermission,
    Plan,
    RegionInventory,
    Stage,
    Status,
    iso,
    parse_time,
)
from ami_janitor.core.policy import (
    CANDIDATE_TAG,
    PRIOR_DEPRECATION_TAG,
    PRIOR_PERMISSIONS_TAG,
    RETIRED_FROM_TAG,
)
from ami_janitor.core.tags import is_part_key, joined_values, split_values

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import LaunchPermissionTypeDef

    from ami_janitor.aws.clients import RegionClients

PERMISSIONS: list[str] = sorted(
    [
        "ec2:CreateTags",
        "ec2:DeleteSnapshot",
        "ec2:DeleteTags",
        "ec2:DeregisterImage",
        "ec2:DescribeImageAttribute",
        "ec2:DescribeSnapshots",
        "ec2:DisableImage",
        "ec2:DisableImageDeprecation",
        "ec2:EnableImage",
        "ec2:EnableImageDeprecation",
        "ec2:ModifyImageAttribute",
    ]
)

# A record the janitor cannot read back (a hand-edited tag, a new kind of launch permission) fails the
# image's step instead of the run: ValueError covers pydantic's validation errors.
STEP_ERRORS = (*AWS_ERRORS, ValueError)
CLOCK_ACTIONS = frozenset({"wait", "deprecate", "disable", "deregister"})
STAGE_ACTIONS = frozenset({"deprecate", "disable", "deregister"})
CREATE_TAGS_MAX_RESOURCES = 1000  # CreateTags: up to 1000 resource ids per call
GONE_CODES = frozenset({"InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"})
SNAPSHOT_TOLERATED = {"InvalidSnapshot.NotFound": "already deleted", "InvalidSnapshot.InUse": "still in use"}

# (region, AMIs whose rescue failed) -> AMIs that must not retire in this run.
AfterRescues = Callable[[str, set[str]], set[str]]
ResultAction = Literal["mark-candidate", "deprecate", "disable", "deregister", "rescue"]


class ActionResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    region: str
    image_id: str
    action: ResultAction
    status: Status
    error: str | None = None
    snapshots_deleted: list[str] = Field(default_factory=list)
    detail: str | None = None


class ApplyResult(BaseModel):
    results: list[ActionResult] = Field(default_factory=list)

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


def _tag(ec2: EC2Client, resources: Sequence[str], tags: Mapping[str, str]) -> None:
    for start in range(0, len(resources), CREATE_TAGS_MAX_RESOURCES):
        ec2.create_tags(
            Resources=list(resources[start : start + CREATE_TAGS_MAX_RESOURCES]),
            Tags=[{"Key": key, "Value": value} for key, value in tags.items()],
        )


# ---- snapshots ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotOutcome:
    """One snapshot of delete_unused_snapshots: deleted, or kept with a note, or failed with an error."""

    snapshot_id: str
    deleted: bool
    note: str | None = None
    error: str | None = None


def delete_unused_snapshots(
    ec2: EC2Client, snapshot_ids: Iterable[str], in_use: Iterable[str]
) -> list[SnapshotOutcome]:
    """Delete each snapshot no remaining AMI uses. Gone or in use (another AMI we did not know of) is
    fine; any other error is reported per snapshot so the caller goes on."""
    used = set(in_use)
    outcomes: list[SnapshotOutcome] = []
    for snapshot_id in snapshot_ids:
        if snapshot_id in used:
            outcomes.append(SnapshotOutcome(snapshot_id, False, note="kept: another AMI uses it"))
            continue
        try:
            ec2.delete_snapshot(SnapshotId=snapshot_id)
        except AWS_ERRORS as error:
            tolerated = SNAPSHOT_TOLERATED.get(error_code(error))
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


def _restore_deprecation(ec2: EC2Client, image: Image, now: datetime) -> str | None:
    recorded = image.tags.get(PRIOR_DEPRECATION_TAG)
    if recorded is None:
        return None
    if recorded == "none":
        if image.deprecation_time is None:
            return None
        ec2.disable_image_deprecation(ImageId=image.image_id)
        return "deprecation cancelled"
    prior = parse_time(recorded)
    if prior is None or prior <= now:
        # The owner's own deprecation time has passed: the image stays deprecated as it would have been.
        return f"left deprecated (recorded deprecation time {recorded} has passed)"
    at = max(prior, deprecate_at(now))
    if image.deprecation_time == at:
        return None
    ec2.enable_image_deprecation(ImageId=image.image_id, DeprecateAt=at)
    return f"deprecation restored to {iso(at)}"


def _restore_permissions(ec2: EC2Client, image: Image, allowed_grants: Iterable[str]) -> list[str]:
    """Grant what the family's policy shares, nothing more. A recorded permission outside it is
    reported, never granted: the record is a tag, and anyone who may tag could write it."""
    allowed = set(allowed_grants)
    notes: list[str] = []
    refused = sorted({p.key for p in recorded_permissions(image.tags)} - allowed)
    if refused:
        notes.append("recorded launch permissions not restored (outside share_with): " + ",".join(refused))
    wanted = allowed - {p.key for p in image.launch_permissions or ()}
    if wanted:
        grants = [LaunchPermission.from_key(key) for key in sorted(wanted)]
        ec2.modify_image_attribute(
            ImageId=image.image_id,
            LaunchPermission={"Add": cast("list[LaunchPermissionTypeDef]", [g.to_api() for g in grants])},
        )
        notes.insert(0, "launch permissions restored: " + ",".join(sorted(wanted)))
    return notes


def _rescue_steps(
    ec2: EC2Client,
    image: Image,
    now: datetime,
    allowed_grants: Iterable[str],
    done: list[str],
    marked: Sequence[str] = (),
) -> None:
    """Undo every stage, noting each change in `done`. Tags go last: a crash leaves the record for a rerun."""
    if image.state == "disabled":
        ec2.enable_image(ImageId=image.image_id)
        done.append("enabled")
    deprecation = _restore_deprecation(ec2, image, now)
    done += [deprecation] if deprecation else []
    done += _restore_permissions(ec2, image, allowed_grants)
    if marked:
        # A deregistration that failed after marking the snapshots: unmark them, or a later
        # deregistration by hand would let the janitor delete them as an unfinished job.
        ec2.delete_tags(Resources=list(marked), Tags=[{"Key": RETIRED_FROM_TAG}])
        done.append("snapshots unmarked")
    stale = janitor_state_tags(image.tags)
    if stale:
        ec2.delete_tags(Resources=[image.image_id], Tags=[{"Key": key} for key in stale])
        done.append("janitor tags removed")


def rescue_image(
    clients: RegionClients, image: Image, now: datetime, allowed_grants: Iterable[str] = ()
) -> list[ActionResult]:
    """Undo the retirement of one AMI: enable it, restore its deprecation time, grant the launch
    permissions its family shares (`allowed_grants`, "kind:value" keys: share_with, plus the public group
    only where the family says `public: true`), drop the janitor tags."""
    try:
        marked = _marked_snapshots(clients.ec2, image.image_id)
    except STEP_ERRORS as error:
        failed = ActionResult(
            region=clients.region, image_id=image.image_id, action="rescue", status="failed"
        )
        return [failed.model_copy(update={"error": error_text(error)})]
    return [_rescue(clients.region, clients.ec2, image, now, allowed_grants, marked)]


def _marked_snapshots(ec2: EC2Client, image_id: str) -> list[str]:
    """Snapshots a half-done deregistration of this AMI marked (one call; by hand only)."""
    found: list[str] = []
    request: dict[str, Any] = {
        "OwnerIds": ["self"],
        "Filters": [{"Name": f"tag:{RETIRED_FROM_TAG}", "Values": [image_id]}],
        "MaxResults": 1000,
    }
    while True:
        page = ec2.describe_snapshots(**request)
        found += [snapshot["SnapshotId"] for snapshot in page["Snapshots"]]
        if not page.get("NextToken"):
            return sorted(found)
        request["NextToken"] = page["NextToken"]


def _rescue(
    region: str,
    ec2: EC2Client,
    image: Image,
    now: datetime,
    allowed_grants: Iterable[str],
    marked: Sequence[str] = (),
) -> ActionResult:
    done: list[str] = []
    result = ActionResult(region=region, image_id=image.image_id, action="rescue", status="skipped")
    try:
        _rescue_steps(ec2, image, now, list(allowed_grants), done, marked)
    except STEP_ERRORS as error:
        return result.model_copy(
            update={"status": "failed", "error": error_text(error), "detail": _join(done)}
        )
    if not done:
        return result.model_copy(update={"detail": "nothing to undo"})
    return result.model_copy(update={"status": "ok", "detail": _join(done)})


def _join(notes: Iterable[str]) -> str | None:
    text = "; ".join(notes)
    return text or None


# ---- one region -----------------------------------------------------------------------------------


class _RegionRun:
    """Applies the decisions of one region; remembers what it deregistered so that snapshot deletion
    never trusts a stale view of which AMIs remain."""

    def __init__(self, region: str, ec2: EC2Client, inventory: RegionInventory, now: datetime) -> None:
        self.region = region
        self.ec2 = ec2
        self.inventory = inventory
        self.now = now
        self.images = {image.image_id: image for image in inventory.images}
        self.gone: set[str] = set()
        self.results: list[ActionResult] = []

    def result(self, image_id: str, action: ResultAction, status: Status, **fields: object) -> ActionResult:
        return ActionResult(region=self.region, image_id=image_id, action=action, status=status, **fields)

    def snapshots_in_use(self, besides: str | None = None) -> set[str]:
        """Snapshots of the remaining AMIs (other than `besides`). Any state counts: a disabled AMI still
        needs its snapshots. Only this run's deregistrations free a snapshot."""
        remaining = (i for i in self.images.values() if i.image_id not in self.gone and i.image_id != besides)
        return {s for i in remaining for s in i.snapshot_ids}

    # step 1 -----------------------------------------------------------------------------------------
    def mark_candidates(self, decisions: Sequence[Decision]) -> set[str]:
        """Start the stage clock on new candidates; returns the images whose clock could not be written."""
        new = [
            d.image_id
            for d in decisions
            if d.action in CLOCK_ACTIONS
            and d.image_id in self.images
            and CANDIDATE_TAG not in self.images[d.image_id].tags
        ]
        value = iso(self.now) or ""
        failed: set[str] = set()
        for start in range(0, len(new), CREATE_TAGS_MAX_RESOURCES):
            batch = new[start : start + CREATE_TAGS_MAX_RESOURCES]
            try:
                _tag(self.ec2, batch, {CANDIDATE_TAG: value})
            except AWS_ERRORS as error:
                failed.update(batch)
                self.results += [
                    self.result(i, "mark-candidate", "failed", error=error_text(error)) for i in batch
                ]
            else:
                self.results += [
                    self.result(i, "mark-candidate", "ok", detail=f"{CANDIDATE_TAG}={value}") for i in batch
                ]
        return failed

    # step 2 -----------------------------------------------------------------------------------------
    def run_stages(self, decision: Decision, blocked: str | None) -> None:
        stages: list[Stage] = list(decision.stages)
        if not stages and decision.action in STAGE_ACTIONS:
            stages = [decision.action]  # type: ignore[list-item]
        image = self.images.get(decision.image_id)
        if image is None:
            blocked = "not in the region's inventory"
        for index, stage in enumerate(stages):
            if blocked is not None or image is None:
                self.results.append(self.result(decision.image_id, stage, "skipped", detail=blocked))
                continue
            result = self.stage(stage, image)
            self.results.append(result)
            if result.status == "failed":
                blocked = f"{stages[index]} failed"

    def stage(self, stage: Stage, image: Image) -> ActionResult:
        apply = {"deprecate": self.deprecate, "disable": self.disable, "deregister": self.deregister}[stage]
        try:
            return apply(image)
        except STEP_ERRORS as error:
            if stage == "deregister" and error_code(error) in GONE_CODES:
                self.gone.add(image.image_id)  # its snapshots no longer count as used by it
            return self.result(image.image_id, stage, "failed", error=error_text(error))

    def deprecate(self, image: Image) -> ActionResult:
        target = deprecate_at(self.now)
        done: list[str] = []
        if PRIOR_DEPRECATION_TAG not in image.tags:
            _tag(self.ec2, [image.image_id], {PRIOR_DEPRECATION_TAG: iso(image.deprecation_time) or "none"})
            done.append("prior deprecation recorded")
        # An earlier deprecation time (the owner's, or ours from a run that crashed) is kept, never postponed.
        if image.deprecation_time is None or image.deprecation_time > target:
            self.ec2.enable_image_deprecation(ImageId=image.image_id, DeprecateAt=target)
            done.append(f"deprecated at {iso(target)}")
        elif done:
            done.append(f"kept the earlier deprecation time {iso(image.deprecation_time)}")
        status: Status = "ok" if done else "skipped"
        return self.result(image.image_id, "deprecate", status, detail=_join(done) or "already deprecated")

    def disable(self, image: Image) -> ActionResult:
        if image.state == "disabled":
            return self.result(image.image_id, "disable", "skipped", detail="already disabled")
        permissions = image.launch_permissions
        if permissions is None:
            permissions = read_launch_permissions(self.ec2, image.image_id)
        # An earlier record is kept: after a rescue that stopped half way (enabled, shares not restored
        # yet) or a hand-run EnableImage, the image holds fewer launch permissions than the record.
        record = permission_tags([*recorded_permissions(image.tags), *permissions])
        _tag(self.ec2, [image.image_id], record)
        # Parts the new record does not use go last (each part reads on its own, and the new record
        # holds every value of the old one).
        stale = [k for k in image.tags if _is_permission_key(k) and k not in record]
        if stale:
            self.ec2.delete_tags(Resources=[image.image_id], Tags=[{"Key": key} for key in stale])
        self.ec2.disable_image(ImageId=image.image_id)
        removed = ",".join(sorted(p.key for p in permissions)) or "none"
        return self.result(
            image.image_id, "disable", "ok", detail=f"disabled; launch permissions removed: {removed}"
        )

    def deregister(self, image: Image) -> ActionResult:
        own = list(image.snapshot_ids)
        # The mark lets a rerun finish the deletion if this run stops after DeregisterImage. A snapshot
        # another AMI uses is not this image's to delete: unmarked, it is not reported unfinished forever.
        mine = [s for s in own if s not in self.snapshots_in_use(besides=image.image_id)]
        if mine:
            _tag(self.ec2, mine, {RETIRED_FROM_TAG: image.image_id})
        answer = self.ec2.deregister_image(ImageId=image.image_id, DeleteAssociatedSnapshots=True)
        self.gone.add(image.image_id)
        notes = (
            ["instance-store AMI: its S3 bundle is left"]
            if image.root_device_type == "instance-store"
            else []
        )
        reported = answer.get("DeleteSnapshotResults") or []
        if reported or not own:
            codes = {r.get("SnapshotId", "?"): r.get("ReturnCode", "?") for r in reported}
            # "skipped": another AMI still uses the snapshot. Other codes need the operator.
            problems = [f"{s} {code}" for s, code in codes.items() if code not in ("success", "skipped")]
            notes += [f"{s} kept: another AMI uses it" for s, code in codes.items() if code == "skipped"]
            return self.result(
                image.image_id,
                "deregister",
                "failed" if problems else "ok",
                error=_join(["deregistered, but snapshots were not deleted", *problems])
                if problems
                else None,
                snapshots_deleted=[s for s, code in codes.items() if code == "success"],
                detail=_join(notes),
            )
        # No DeleteSnapshotResults (an older partition, the emulator): delete what no remaining AMI uses.
        outcomes = delete_unused_snapshots(self.ec2, own, self.snapshots_in_use())
        errors = _errors(outcomes)
        return self.result(
            image.image_id,
            "deregister",
            "failed" if errors else "ok",
            error=_join(["deregistered, but snapshots were not deleted", *errors]) if errors else None,
            snapshots_deleted=[o.snapshot_id for o in outcomes if o.deleted],
            detail=_join(notes + _notes(outcomes)),
        )

    # step 3 -----------------------------------------------------------------------------------------
    def rescue(self, decision: Decision, allowed_grants: Iterable[str]) -> None:
        image = self.images.get(decision.image_id)
        if image is None:
            self.results.append(
                self.result(decision.image_id, "rescue", "failed", error="not in the region's inventory")
            )
            return
        marked = [s.snapshot_id for s in self.inventory.retired_snapshots if s.image_id == image.image_id]
        self.results.append(_rescue(self.region, self.ec2, image, self.now, allowed_grants, marked))


def apply_plan(
    plan: Plan,
    inventories: Mapping[str, RegionInventory],
    clients_for: Callable[[str], RegionClients],
    now: datetime,
    family_grants: Mapping[str, Iterable[str]] | None = None,
    after_rescues: AfterRescues | None = None,
) -> ApplyResult:
    """Apply an enforce plan region by region: rescues, then `after_rescues(region, failed rescues)`
    (the run writes Latest there; it returns AMIs that must not retire now), candidate clocks, due
    stages. `family_grants` (family name -> the "kind:value" grants its policy shares) are what a
    rescue may grant. Snapshots of an unfinished deregistration (`plan.unfinished_snapshots`) are never
    deleted here: a tag is no proof. AWS errors become failed results; the run always goes on."""
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
        ec2 = clients_for(region).ec2
        results += _apply_region(
            region, decisions, inventories[region], ec2, now, family_grants or {}, after_rescues
        )
    return ApplyResult(results=results)


def _apply_region(
    region: str,
    decisions: Sequence[Decision],
    inventory: RegionInventory,
    ec2: EC2Client,
    now: datetime,
    family_grants: Mapping[str, Iterable[str]],
    after_rescues: AfterRescues | None,
) -> list[ActionResult]:
    run = _RegionRun(region, ec2, inventory, now)
    # Rescues first: an AMI back in use must launch again before anything else is changed.
    for decision in decisions:
        if decision.action == "rescue":
            run.rescue(decision, family_grants.get(decision.family, ()))
    failed = {r.image_id for r in run.results if r.status == "failed"}
    pinned = after_rescues(region, failed) if after_rescues is not None else set()
    unclocked = run.mark_candidates(decisions)
    for decision in decisions:
        if decision.stages or decision.action in STAGE_ACTIONS:
            blocked = "the candidate tag could not be written" if decision.image_id in unclocked else None
            if decision.image_id in pinned:
                blocked = "Latest could not be moved away from it"
            run.run_stages(decision, blocked)
    return run.results
