"""Inventory models (the AWS answers, parsed once) and the plan (the engine's contract)."""

# Annotations evaluated when the module runs (no `from __future__ import annotations`): pydantic
# would otherwise compile and evaluate each field's annotation string at every cold start.

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, get_args

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from ami_janitor.core.policy import Mode

# The states an EC2 AMI State Change event reports (detail.State), which the event rule selects.
AmiState = Literal["available", "failed", "deregistered", "disabled"]
AMI_STATES: tuple[AmiState, ...] = get_args(AmiState)
# An AMI id as an event or a queue message must spell it.
AMI_ID_PATTERN = r"^ami-[0-9a-f]{8,17}$"


def parse_time(value: str | datetime | None) -> datetime | None:
    """Parse an AWS or tag timestamp; always in UTC. None or garbage gives None."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # In UTC: a time whose offset takes it past year 1 or 9999 is no time (it could not be compared
        # with, or written as, another).
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None


def api_time(raw: Mapping[str, Any], key: str, subject: str) -> datetime | None:
    """A time field of an EC2 answer: None where the answer has none; one that is there but is no time
    is a malformed answer (ValueError: its source fails and the region is skipped), never taken as
    absent (a LastLaunchedTime misread would lose a keep reason). Tags and records keep parse_time."""
    value = raw.get(key)
    if value is None:
        return None
    parsed = parse_time(value)
    if parsed is None:
        raise ValueError(f"{subject} has {key} {value!r}, which is no time")
    return parsed


def iso(value: datetime | None) -> str | None:
    """ISO 8601 UTC with a Z and whole seconds: the one time format in tags and plans."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(timespec="seconds")[:19] + "Z"


# What an applied step did: done, failed, or nothing to do.
Status = Literal["ok", "failed", "skipped"]
# What a plan decides for an AMI, and the retirement stages (the ledger records each it applied).
Action = Literal["keep", "wait", "deprecate", "disable", "deregister", "rescue"]
Stage = Literal["deprecate", "disable", "deregister"]
STAGES: tuple[Stage, ...] = ("deprecate", "disable", "deregister")  # in the order they are applied


# What a record holds where it holds nothing, read only: a NamedTuple's default is shared.
_NOTHING: Mapping[Any, Any] = MappingProxyType({})


# Empty lists and dicts are plain defaults (`= []`) throughout the package: pydantic gives each instance
# its own copy, and unlike `default_factory=list` it need not inspect a signature for each field when
# the class is made (a cold start makes every model class).
class _Frozen(BaseModel):
    # Built at first use, not at import: the records of AMIs, references and the ledger, which a region
    # holding no AMI (most regions of most accounts) never makes.
    model_config = ConfigDict(defer_build=True, frozen=True, extra="forbid")


# ---- the ledger -----------------------------------------------------------------------------------
# Before the inventory: an Image carries its ledger item, an inventory its ledger. (Defined after them,
# they were forward references: each of those models was built twice, first in vain.)
# Their times are aware (AwareDatetime): one stored without a zone (written by hand) makes its item
# unreadable, named by its key, rather than stopping the plan where it is compared with `now`.


class LedgerStage(_Frozen):
    """A retirement stage the janitor applied, and what it recorded before changing the AMI."""

    at: AwareDatetime
    prior_deprecation: AwareDatetime | None = None
    prior_launch_permissions: tuple[str, ...] = ()  # LaunchPermission keys ("user:123456789012")
    # The AMI was disabled before the janitor's disable stage (by its owner): a rescue leaves it so.
    already_disabled: bool = False
    # Recorded from an older janitor's tags when the ledger adopted them, not from a change the janitor
    # made here: anyone may have written those tags, so a rescue restores nothing from this record.
    adopted: bool = False
    # When EC2 accepted the change (None: recorded, then the run stopped before or during the call).
    confirmed: AwareDatetime | None = None
    # When a later run did it again, EC2 having never taken it: the next stage's delay counts from then.
    redone: AwareDatetime | None = None


class LedgerCopy(_Frozen):
    """A copy the janitor started: its source, destination, generation and ClientToken."""

    source_image_id: str
    source_region: str
    region: str
    generation: int = 1
    token: str
    image_id: str | None = None
    # The source's CreationDate as EC2 reported it when the copy started: a replica's age and order.
    source_created: AwareDatetime | None = None
    # The family, the key as the policy named it and the key ARN the copy was made with: a later alias
    # that resolves elsewhere is refused (see core.keys).
    family: str | None = None
    kms_key_id: str | None = None
    kms_key_arn: str | None = None
    started: AwareDatetime | None = None


class LedgerSnapshot(_Frozen):
    """A snapshot marked for deletion with the AMI being deregistered."""

    snapshot_id: str
    image_id: str


class LedgerBake(_Frozen):
    instance_id: str
    at: AwareDatetime


class LedgerItem(_Frozen):
    """What the janitor did to one AMI (one ledger item); EC2's own facts are never copied here."""

    image_id: str
    first_candidate: AwareDatetime | None = None
    stages: dict[Stage, LedgerStage] = {}
    grants: tuple[str, ...] = ()  # launch permission keys the janitor granted
    # Of those, the ones recorded and not yet confirmed made (a run died before ModifyImageAttribute
    # answered): granted again while the family lists them.
    granting: tuple[str, ...] = ()
    # Launch permissions the family lists that EC2 already showed when the janitor came to grant them:
    # somebody else made them, so they are not the janitor's (never revoked, never counted as its own);
    # recorded so that the next run does not plan them again.
    grants_found: tuple[str, ...] = ()
    copies: tuple[LedgerCopy, ...] = ()
    snapshots: tuple[LedgerSnapshot, ...] = ()
    bakes: tuple[LedgerBake, ...] = ()
    # This AMI is a copy the janitor made (in this region's ledger): its source and the source's age.
    replica: LedgerCopy | None = None
    closed: AwareDatetime | None = None
    # Set once DeregisterImage succeeded and its recorded snapshots were handled (the confirmation).
    deregistered: AwareDatetime | None = None
    # Epoch seconds after which DynamoDB deletes the item (set once the AMI is deregistered).
    ttl: int | None = None
    # The table's `last_stage` as read, which its conditional writes compare with: the latest stage,
    # but in an item an older version recorded out of order (a stage after a later one) the earlier.
    # Never written back; None where the item was not read from a table.
    written_last_stage: Stage | None = Field(None, exclude=True)

    @field_validator("copies", mode="before")
    @classmethod
    def _copies_in_order(cls, value: Any) -> Any:
        """The table keeps copies as a map by "<region>#<generation>" (so each is recorded once)."""
        if isinstance(value, Mapping):
            return [value[key] for key in sorted(value)]
        return value

    @field_validator("grants", "granting", "grants_found", mode="before")
    @classmethod
    def _grants_sorted(cls, value: Any) -> Any:
        """The table keeps grants as string sets."""
        if isinstance(value, set | frozenset):
            return sorted(value)
        return value

    @property
    def is_open(self) -> bool:
        """A candidate clock runs (a rescue closes it; a later candidacy starts a new one)."""
        return self.first_candidate is not None and self.closed is None

    @property
    def last_stage(self) -> Stage | None:
        """The latest stage recorded (the table keeps it as `last_stage`, for its conditional writes)."""
        return max(self.stages, key=STAGES.index) if self.stages else None

    @property
    def compared_stage(self) -> Stage | None:
        """The last stage a conditional write on the item as read compares with: as the table has it."""
        return self.written_last_stage or self.last_stage


class UnfinishedRun(_Frozen):
    """A run whose record in the ledger table (aws/runs.py) counts fewer slices done than it queued, or
    all of them but no summary sent, and that no later run has reported yet."""

    run: str
    slices: int
    done: int
    started: AwareDatetime | None = None


class LedgerView(NamedTuple):
    """A region's ledger as one run read it (one Scan, consistent): every item by AMI id."""

    table: str
    items: Mapping[str, LedgerItem] = _NOTHING
    # When an enforce run adopted the janitor tags it found (None: not yet; `tampered` stays quiet).
    adopted: datetime | None = None
    # Items the first enforce run writes from the tags it adopts (already merged into `items`).
    adopting: Mapping[str, LedgerItem] = _NOTHING
    # Earlier runs whose slices were not all counted (the same Scan reads the run records).
    unfinished_runs: tuple[UnfinishedRun, ...] = ()


class LaunchPermission(_Frozen):
    kind: Literal["user", "group", "org", "ou"]
    value: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.value}"

    @classmethod
    def from_key(cls, key: str) -> "LaunchPermission":
        kind, _, value = key.partition(":")
        return cls(kind=kind, value=value)

    @classmethod
    def from_api(cls, raw: dict[str, str]) -> "LaunchPermission":
        if "UserId" in raw:
            return cls(kind="user", value=raw["UserId"])
        if "Group" in raw:
            return cls(kind="group", value=raw["Group"])
        if "OrganizationArn" in raw:
            return cls(kind="org", value=raw["OrganizationArn"])
        if "OrganizationalUnitArn" in raw:
            return cls(kind="ou", value=raw["OrganizationalUnitArn"])
        raise ValueError(f"unknown launch permission {raw!r}")

    def to_api(self) -> dict[str, str]:
        field = {"user": "UserId", "group": "Group", "org": "OrganizationArn", "ou": "OrganizationalUnitArn"}
        return {field[self.kind]: self.value}


class Image(_Frozen):
    """One self-owned AMI as DescribeImages reports it."""

    image_id: str
    region: str
    name: str
    architecture: str
    state: str
    created: datetime
    tags: dict[str, str] = {}
    snapshot_ids: tuple[str, ...] = ()
    size_gib: int = 0
    root_device_type: str = "ebs"
    public: bool = False
    # Any EBS snapshot of the AMI encrypted (replication encrypts in place only unencrypted sources).
    encrypted: bool = False
    deprecation_time: datetime | None = None
    deregistration_protection: bool = False
    last_launched: datetime | None = None
    # None: not loaded (DescribeImageAttribute is one call per AMI, made only for AMIs a decision needs).
    launch_permissions: tuple[LaunchPermission, ...] | None = None
    # What CopyImage made it from, as EC2 says (SourceImageId, SourceImageRegion): set by EC2, not a tag.
    copied_from: str | None = None
    copied_from_region: str | None = None
    # For a copy the ledger does not record: its source's creation (or order), as EC2 reports it in the
    # source's region (set by the inventory; None: not a copy, recorded, or the source is not visible).
    copied_from_created: datetime | None = None
    # The janitor's ledger item of this AMI (attached by with_ledger; None: nothing recorded).
    ledger: LedgerItem | None = None

    @classmethod
    def from_api(cls, region: str, raw: dict[str, Any]) -> "Image":
        snapshots: list[str] = []
        size = 0
        for mapping in raw.get("BlockDeviceMappings") or []:
            ebs = mapping.get("Ebs") or {}
            if ebs.get("SnapshotId"):
                snapshots.append(ebs["SnapshotId"])
            size += int(ebs.get("VolumeSize") or 0)
        created = parse_time(raw.get("CreationDate"))
        if created is None:
            raise ValueError(f"image {raw.get('ImageId')} has no valid CreationDate")
        # EC2 always gives it: guessed, a missing state would be taken as available (and retired). (The
        # architecture is x86_64 where none is given: the emulator gives none for a registered AMI.)
        if not raw.get("State"):
            raise ValueError(f"image {raw.get('ImageId')} has no State")
        protection = str(raw.get("DeregistrationProtection") or "disabled")
        return cls(
            image_id=raw["ImageId"],
            region=region,
            name=raw.get("Name") or "",
            architecture=raw.get("Architecture") or "x86_64",
            state=raw["State"],
            created=created,
            tags={t["Key"]: t.get("Value", "") for t in raw.get("Tags") or []},
            snapshot_ids=tuple(snapshots),
            size_gib=size,
            root_device_type=raw.get("RootDeviceType") or "ebs",
            public=bool(raw.get("Public")),
            encrypted=any(
                (m.get("Ebs") or {}).get("Encrypted") for m in raw.get("BlockDeviceMappings") or []
            ),
            deprecation_time=api_time(raw, "DeprecationTime", f"image {raw['ImageId']}"),
            # "enabled", "enabled-with-cooldown" or "disabled-until <time>" (cooldown still protects).
            deregistration_protection=protection.startswith("enabled")
            or protection.startswith("disabled-until"),
            last_launched=api_time(raw, "LastLaunchedTime", f"image {raw['ImageId']}"),
            copied_from=raw.get("SourceImageId") or None,
            copied_from_region=raw.get("SourceImageRegion") or None,
        )

    @property
    def replica_record(self) -> "LedgerCopy | None":
        """The ledger's record that the janitor made this AMI as a copy, where EC2 names the same source
        (SourceImageId/SourceImageRegion): only then is it a replica. No tag has a say; a copy EC2 knows
        of but the ledger does not is an original, ordered by its source's creation where the inventory
        could read it (copied_from_created)."""
        if self.copied_from is None or self.ledger is None:
            return None
        record = self.ledger.replica
        if record is None:
            return None
        if (record.source_image_id, record.source_region) != (self.copied_from, self.copied_from_region):
            return None
        return record

    @property
    def source_image_id(self) -> str | None:
        if self.copied_from is None:  # most AMIs: not a copy at all
            return None
        record = self.replica_record
        return record.source_image_id if record is not None else None

    @property
    def source_region(self) -> str | None:
        record = self.replica_record
        return record.source_region if record is not None else None

    @property
    def is_replica(self) -> bool:
        return self.replica_record is not None

    @property
    def order_time(self) -> datetime:
        """Age and order: a copy counts from its source's creation (as the ledger recorded it when the
        janitor started the copy, else as EC2 reports the source), so a late copy is never young, nor
        newer than what it copies."""
        if self.copied_from is None:
            return self.created
        record = self.replica_record
        if record is not None and record.source_created is not None:
            return record.source_created
        if self.copied_from_created is not None:
            return min(self.copied_from_created, self.created)
        return self.created

    def deprecated_at(self, now: datetime) -> bool:
        return self.deprecation_time is not None and self.deprecation_time <= now


class Reference(_Frozen):
    """Something that can still launch an AMI."""

    image_id: str
    kind: str
    resource_id: str
    detail: str


class RetiredSnapshot(_Frozen):
    """A snapshot tagged ami-janitor:retired-from (deregistration started, maybe not finished)."""

    snapshot_id: str
    image_id: str


class BuildInstance(_Frozen):
    """A live instance that a family's bake names (by bake.instance_id or its bake.instance_tag)."""

    instance_id: str
    state: str
    launched: datetime | None = None
    tags: dict[str, str] = {}

    @classmethod
    def from_api(cls, raw: dict[str, Any]) -> "BuildInstance":
        return cls(
            instance_id=raw["InstanceId"],
            state=str((raw.get("State") or {}).get("Name") or "unknown"),
            launched=parse_time(raw.get("LaunchTime")),
            tags={t["Key"]: t.get("Value", "") for t in raw.get("Tags") or []},
        )


class ReceivedReport(NamedTuple):
    """An account's usage report for one region, as the owner read it from that account's prefix of
    the inbox: dated by S3's LastModified (the writer cannot set it); `problem` where it is unreadable."""

    account: str
    received_at: datetime
    # AMI id -> what uses it in that account (launch template, instance, SSM parameter...).
    uses: Mapping[str, tuple[str, ...]] = _NOTHING
    problem: str | None = None


class UsageView(NamedTuple):
    """What an owner knows of other accounts' use of its shared AMIs, in one region."""

    own_account: str
    # account -> its report for this region; an account missing here sent none.
    reports: Mapping[str, ReceivedReport] = _NOTHING
    # 'org:ARN' / 'ou:ARN' -> the accounts in it; None where Organizations could not say.
    expansions: Mapping[str, tuple[str, ...] | None] = _NOTHING


class RegionInventory(NamedTuple):
    """What a run read of one region: the AMIs (each parsed from EC2's answer) and what refers to them."""

    region: str
    images: tuple[Image, ...] = ()
    references: tuple[Reference, ...] = ()
    # The live instances some family's bake names: what the plan says a scheduled bake would image.
    build_instances: tuple[BuildInstance, ...] = ()
    # name -> value of every SSM parameter the policy points at (Latest pointers).
    parameters: Mapping[str, str] = _NOTHING
    retired_snapshots: tuple[RetiredSnapshot, ...] = ()
    recycle_bin_rules: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    # The region's ledger; None where it has no ledger table (a plan says so, an apply is refused).
    ledger: LedgerView | None = None
    # What the scan saw, for the per-AMI reads after the plan: the live instances (a reference from a
    # terminated one does not count) and the parameter names (how a parameter ARN is spelled).
    instance_ids: frozenset[str] = frozenset()
    parameter_names: frozenset[str] = frozenset()
    # Other accounts' usage reports about the shared AMIs the plan needs (only with usage_reports).
    usage: UsageView | None = None
    # Set when any source failed: the region is skipped, no decision on a partial inventory.
    error: str | None = None


class Outcome(BaseModel):
    """A result whose optional keys are in its JSON only where they apply: a field left at its default
    is left out, one given (even None, as null) stays."""

    @model_serializer(mode="wrap")
    def _given_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        fields = type(self).model_fields
        return {
            key: value
            for key, value in data.items()
            if key not in fields or fields[key].is_required() or key in self.model_fields_set
        }


# ---- the plan -------------------------------------------------------------------------------------


class _PlanModel(BaseModel):
    # The JSON of a plan uses the aliases (a Latest change's `from`) however it is dumped.
    model_config = ConfigDict(frozen=True, populate_by_name=True, serialize_by_alias=True)


class RegionStatus(_PlanModel):
    region: str
    status: Literal["ok", "skipped"]
    error: str | None = None


class Decision(_PlanModel):
    region: str
    family: str
    architecture: str
    image_id: str
    name: str
    created: str
    action: Action
    reasons: list[str]
    candidate_since: str | None = None
    next_action: Stage | None = None
    next_action_at: str | None = None
    snapshots: list[str] = []
    size_gib: int = 0
    source_image_id: str | None = None
    # The stages this run applies, in order (all that are due): ["deprecate", "disable", "deregister"].
    stages: list[Stage] = []


class LatestChange(_PlanModel):
    region: str
    family: str
    architecture: str
    from_: str | None = Field(None, alias="from")
    to: str | None
    ssm_parameter: str | None = None
    # Tag holders that lose the tag (more than one after a race or a hand edit).
    untag: list[str] = []
    warning: str | None = None


class Copy(_PlanModel):
    family: str
    source_image_id: str
    source_region: str
    region: str
    # As the policy names it (a key ARN or an alias) ...
    kms_key_id: str | None = None
    generation: int = 1
    # ... and the key ARN CopyImage is given (an alias resolved in the target region when planned).
    kms_key_arn: str | None = None


class Share(_PlanModel):
    image_id: str
    region: str
    add: list[str] = []
    remove: list[str] = []


class Summary(_PlanModel):
    images: int = 0
    kept: int = 0
    retired: int = 0
    snapshots_deleted: int = 0
    gib_freed_max: int = 0
    waiting: int = 0
    deprecated: int = 0
    disabled: int = 0
    rescued: int = 0
    held_by_cap: int = 0
    regions_skipped: int = 0
    tampered: int = 0


class Tampered(_PlanModel):
    """A janitor tag that disagrees with the ledger: reported, never obeyed."""

    region: str
    image_id: str  # the AMI (or snapshot) carrying the tag
    tag: str
    value: str
    ledger: str | None  # what the ledger records (None: nothing)


class ScheduledBake(_PlanModel):
    """The instance a family's scheduled bake in a region would image, or why it would refuse."""

    region: str
    family: str
    instance_id: str | None = None
    # Why that instance: "pinned by bake.instance_id" or "the only instance tagged K=V".
    reason: str | None = None
    refusal: str | None = None


class Plan(_PlanModel):
    mode: Mode
    generated_at: str
    regions: list[RegionStatus]
    decisions: list[Decision]
    latest: list[LatestChange] = []
    copies: list[Copy] = []
    shares: list[Share] = []
    bakes: list[ScheduledBake] = []
    summary: Summary = Summary()
    policy_errors: list[str] = []
    notes: list[str] = []
    # Snapshots the ledger recorded for an AMI whose deregistration a crash interrupted: deleted by an
    # enforce run (never on a tag's word).
    unfinished_snapshots: list[str] = []
    tampered: list[Tampered] = []

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False) + "\n"


def with_ledger(inventory: RegionInventory) -> RegionInventory:
    """The inventory with each AMI's ledger item attached (the planner then reads one image at a time)."""
    if inventory.ledger is None or not inventory.ledger.items:
        return inventory
    items = inventory.ledger.items
    images = tuple(
        image.model_copy(update={"ledger": items[image.image_id]}) if image.image_id in items else image
        for image in inventory.images
    )
    return inventory._replace(images=images)
