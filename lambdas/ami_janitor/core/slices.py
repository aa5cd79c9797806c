"""A region's due stages, cut into slices of work that each fit well inside one invocation.

The scheduled run plans once, applies what must come first (rescues, Latest, candidate clocks) and
cuts the due stages into slices: queued to the slice worker when deployed, run one after the other
by the CLI. A slice carries only what it must do, never why: its worker reads its AMIs again and
holds back any that a fresh fact puts in doubt (`hold_reason`). The caps were spent by the plan, so
slices together never act on more AMIs than one run may.
"""

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from ami_janitor.core import trust
from ami_janitor.core.model import AMI_ID_PATTERN, Decision, Image, LedgerItem, Stage, iso
from ami_janitor.core.planner import shared_outside
from ami_janitor.core.policy import Policy

# A slice older than this is not run: the next scheduled run plans again from what is there then.
MAX_SLICE_AGE = timedelta(hours=12)
# At most this many AMIs per slice, and this many bytes of them in its message: below SQS's 256 KiB
# with room for the slice's own fields (an AMI shared with an organization lists every consumer).
MAX_SLICE_ITEMS = 1000
MAX_SLICE_BYTES = 240_000
STAGE_ACTIONS = frozenset({"deprecate", "disable", "deregister"})
# An item without consumers: its id (up to 21), family (up to 64), stages and keys, well under this.
_PLAIN_ITEM_BYTES = 200


class SliceItem(BaseModel):
    # Off the scheduled run's path: its validator is built when first used, not at each cold start.
    model_config = ConfigDict(defer_build=True, extra="forbid", frozen=True)

    image_id: str = Field(pattern=AMI_ID_PATTERN)
    family: str = Field(min_length=1)
    stages: tuple[Stage, ...] = Field(min_length=1)
    # The accounts it is shared with whose usage reports the plan read: the slice reads them again.
    consumers: tuple[str, ...] = ()
    # The organizations and OUs it is shared with that the plan expanded into those accounts: any other
    # found by the slice was granted since the plan, its accounts' reports unread.
    grants: tuple[str, ...] = ()


class WorkSlice(BaseModel):
    """One message of the work queue: part of one region's due stages of one run."""

    # Off the scheduled run's path: its validator is built when first used, not at each cold start.
    model_config = ConfigDict(defer_build=True, extra="forbid", frozen=True)

    run: str = Field(min_length=1)  # the plan's generated_at: one run per region and time
    region: str = Field(min_length=1)
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    planned_at: datetime
    policy: str = Field(min_length=1)  # the digest of the policy the plan was made with
    items: tuple[SliceItem, ...] = Field(min_length=1, max_length=MAX_SLICE_ITEMS)

    @property
    def key(self) -> str:
        """Unique per slice: the queue's deduplication id and the run record's slice name."""
        return f"{self.region}/{self.run}/{self.index}"


def policy_digest(policy: Policy) -> str:
    """What the plan was made with: a slice of another policy's plan is not run."""
    text = json.dumps(policy.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def slice_digest(work: WorkSlice) -> str:
    """What the run recorded of each slice it queued, in the ledger table: a message that differs
    (consumers dropped, an AMI or a stage added) was not queued by the run, and is not run."""
    return hashlib.sha256(work.model_dump_json().encode()).hexdigest()[:32]


def due_stages(decision: Decision) -> tuple[Stage, ...]:
    """The stages a decision takes this run, in order."""
    if decision.stages:
        return tuple(decision.stages)
    if decision.action in STAGE_ACTIONS:
        return (decision.action,)  # type: ignore[return-value]
    return ()


def item_cost(item: SliceItem, refill: Mapping[Stage, float]) -> float:
    """Seconds of paced calls an AMI's stages need at most: each stage's slowest API refill."""
    return sum(1.0 / refill[stage] for stage in item.stages)


def cut(
    decisions: Iterable[Decision],
    *,
    run: str,
    region: str,
    planned_at: datetime,
    policy: str,
    budget_seconds: float,
    refill: Mapping[Stage, float],
    consumers: Mapping[str, Sequence[str]] | None = None,
    expanded: Mapping[str, Sequence[str]] | None = None,
) -> list[WorkSlice]:
    """The due stages of `region`'s decisions (in plan order), in slices whose paced calls fit in
    `budget_seconds` (at `refill` AMIs per second per stage), MAX_SLICE_ITEMS and MAX_SLICE_BYTES.
    `consumers`: AMI id -> the accounts whose usage reports the plan relied on; `expanded`: AMI id ->
    the organization and OU grants the plan expanded into them."""
    shared, grants = consumers or {}, expanded or {}
    items = [
        SliceItem(
            image_id=d.image_id,
            family=d.family,
            stages=stages,
            consumers=tuple(sorted(shared.get(d.image_id, ()))),
            grants=tuple(sorted(grants.get(d.image_id, ()))),
        )
        for d in decisions
        if d.region == region and (stages := due_stages(d))
    ]
    groups: list[list[SliceItem]] = []
    spent, size = budget_seconds, 0  # start a first group
    for item in items:
        cost = item_cost(item, refill)
        # Only an AMI shared with others weighs much: the rest are measured by their consumers' count.
        length = len(item.model_dump_json()) + 1 if item.consumers or item.grants else _PLAIN_ITEM_BYTES
        if (
            spent + cost > budget_seconds
            or len(groups[-1]) >= MAX_SLICE_ITEMS
            or size + length > MAX_SLICE_BYTES
        ):
            groups.append([])
            spent, size = 0.0, 0
        groups[-1].append(item)
        spent += cost
        size += length
    return [
        WorkSlice(
            run=run,
            region=region,
            index=index,
            count=len(groups),
            planned_at=planned_at,
            policy=policy,
            items=tuple(group),
        )
        for index, group in enumerate(groups)
    ]


def stale(work: WorkSlice, now: datetime) -> str | None:
    if now - work.planned_at > MAX_SLICE_AGE:
        return f"planned at {iso(work.planned_at)}, more than {MAX_SLICE_AGE} ago: the next run plans again"
    return None


def done_before(item: SliceItem, recorded: LedgerItem | None, planned_at: datetime) -> str | None:
    """Why an AMI the slice finds gone needs nothing more: its ledger item shows the deregister stage
    recorded (or, recorded by an earlier run that stopped before EC2 took it, redone) since the plan
    and confirmed, so an earlier delivery of this slice retired it (the worker stopped before the run's
    record counted the slice). None otherwise: a gone AMI is held back."""
    if recorded is None or recorded.deregistered is None or "deregister" not in item.stages:
        return None
    entry = recorded.stages.get("deregister")
    if entry is None or max(entry.at, entry.redone or entry.at) < planned_at:
        return None
    return f"done by an earlier delivery of this slice (deregistered {iso(recorded.deregistered)})"


def hold_reason(
    item: SliceItem,
    image: Image | None,
    references: Sequence[str],
    planned_at: datetime,
    policy: Policy,
    now: datetime,
) -> str | None:
    """Why a slice must not take an AMI's stages now, from what was read when the slice started; None
    when nothing changed that the plan relied on. Only ever holds back: a held AMI is planned again
    (and rescued, if the janitor started on it) by the next scheduled run. A stage is taken only when
    the ledger's clock says it is due (or the ledger recorded it already), whatever the slice says."""
    if image is None:
        return "no longer in the region"
    if image.state not in ("available", "disabled"):
        return f"state {image.state} since the plan"
    names = {family.name for family in policy.families}
    if item.family not in names:
        return f"family {item.family} is no longer in the policy"
    family = policy.family(item.family)
    rules = policy.rules_for(family)
    if not family.match.matches(image.name, image.tags):
        return f"no longer matches family {item.family}"
    # Tags can enroll an AMI in a second family: the plan keeps such an AMI (a policy error), so does a slice.
    also = [
        f.name for f in policy.families if f.name != item.family and f.match.matches(image.name, image.tags)
    ]
    if also:
        return f"matches family {also[0]} too"
    if rules.opt_out_tag in image.tags:
        return f"opted out (tag {rules.opt_out_tag}) since the plan"
    if image.deregistration_protection:
        return "deregistration protection is on"
    latest_tag = family.latest.tag if family.latest else None
    if latest_tag and latest_tag in image.tags:
        return f"carries the {latest_tag} tag"
    if image.last_launched is not None and image.last_launched > planned_at:
        return f"launched {iso(image.last_launched)}, after the plan"
    # EC2 reports a launch up to a day late: one before the plan, unseen by it, keeps the AMI as the
    # plan's own rule would have.
    launched_after = now - timedelta(days=rules.launched_within_days)
    if image.last_launched is not None and image.last_launched >= launched_after:
        return f"launched {iso(image.last_launched)} (within {rules.launched_within_days} days)"
    if references:
        return "in use since the plan: " + "; ".join(sorted(set(references)))
    shared = share_hold(item, image, policy)
    if shared is not None:
        return shared
    # The run started every clock its slices need; a clock closed since is a rescue (by hand, mostly).
    item_ledger = trust.open_item(image)
    if item_ledger is None:
        return "no candidate clock open in the ledger (rescued since the plan)"
    configured = [(stage, days) for stage, days in rules.lifecycle.stage_days() if days is not None]
    due = trust.stage_plan(image, configured, now).due  # type: ignore[arg-type]
    recorded = set(item_ledger.stages)
    early = [stage for stage in item.stages if stage not in due and stage not in recorded]
    if early:
        return f"{early[0]} is not due by the ledger's clock"
    return None


def share_hold(item: SliceItem, image: Image, policy: Policy) -> str | None:
    """Rule 5 on the AMI as read now: why its shares keep it, or None. Public is DescribeImages' own
    field, read with the slice; other shares count once the AMI's launch permissions are read (the
    disable stage reads them anyway). Grants in share_with and those the ledger records as the janitor's
    retire with the AMI, as in the plan, unless the family allows shares. With `usage_reports`, a grant
    whose accounts' reports the plan did not read holds it too, whatever the family allows (as the
    plan keeps a shared AMI until each consumer's fresh report says it is not used)."""
    family = policy.family(item.family)
    reasons = [] if policy.rules_for(family).allow_shared else shared_outside(image, family)
    if not reasons and policy.usage_reports is not None:
        reasons = _unread_consumers(item, image)
    return "; ".join(reasons) + " since the plan" if reasons else None


def _unread_consumers(item: SliceItem, image: Image) -> list[str]:
    """The grants (share_with's included) whose accounts' usage reports the slice did not read: an
    account not among the item's consumers; an organization or OU the plan did not expand into them
    (granted since the plan). The next plan reads their reports. (An account that joined an
    organization or OU the plan expanded is not seen here: the next plan reads its report.)"""
    from ami_janitor.core.usage import consumer_grants  # a policy with usage_reports

    reasons: list[str] = []
    for grant in consumer_grants(image, ""):
        kind, _, value = grant.partition(":")
        if (kind == "user" and value not in item.consumers) or (kind != "user" and grant not in item.grants):
            reasons.append(
                f"shared with {grant}, whose usage report the plan did not read (the next plan reads it)"
            )
    return reasons
