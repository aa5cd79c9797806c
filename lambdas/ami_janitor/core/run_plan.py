"""The plan of a whole run, in one pass: retirement and Latest (the planner), shares and copies from the
same groups; then, once the edge has read the launch permissions the plan asked for, the plan settled
on them (never planned again from scratch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from ami_janitor.core import planner
from ami_janitor.core.keys import KeyResolutions
from ami_janitor.core.model import (
    Decision,
    Image,
    Plan,
    RegionInventory,
    RegionStatus,
    Share,
    UsageView,
    parse_time,
)
from ami_janitor.core.planner import is_janitor_touched, shared_outside
from ami_janitor.core.policy import Policy
from ami_janitor.core.replication import plan_replication, within_copy_limit
from ami_janitor.core.sharing import plan_shares, share_for

# Decisions of AMIs this run retires (or may retire soon): never shared first, and their launch
# permissions decide whether they are shared outside share_with.
RETIRING = frozenset({"wait", "deprecate", "disable", "deregister"})


def plan_run(
    inventories: Sequence[RegionInventory],
    policy: Policy,
    now: datetime,
    targets: Sequence[RegionInventory] = (),
    keys: KeyResolutions | None = None,
) -> Plan:
    """Decisions, Latest, shares and copies of `inventories`; `targets` are copy destinations only
    (their AMIs, read without references, are not planned); `keys`: what the aliases of replica keys
    resolve to now."""
    grouped = planner.group_regions(inventories, policy)
    plan = planner.plan(inventories, policy, now, grouped)
    usable = [inv for inv in inventories if inv.error is None]
    retiring = {(d.region, d.image_id) for d in plan.decisions if d.action in RETIRING}
    shares = [s for s in plan_shares(usable, policy, now, grouped) if (s.region, s.image_id) not in retiring]
    copies, problems = plan_replication([*usable, *targets], policy, now, grouped, keys)
    planned = {inv.region for inv in usable}
    copies, held = within_copy_limit([c for c in copies if c.source_region in planned], [*usable, *targets])
    # A copy target that could not be read gets no copy this run: skipped, and said so like any region
    # (the plan of `--region` one source region had dropped its copies there without a word).
    unread = [
        RegionStatus(region=t.region, status="skipped", error=f"copy target not read: {t.error}")
        for t in targets
        if t.error is not None
    ]
    return plan.model_copy(
        update={
            "regions": [*plan.regions, *unread],
            "summary": plan.summary.model_copy(
                update={"regions_skipped": plan.summary.regions_skipped + len(unread)}
            ),
            "shares": shares,
            "copies": copies,
            "notes": [*plan.notes, *problems, *held],
        }
    )


def needed_details(plan: Plan, inventories: Mapping[str, RegionInventory]) -> dict[str, list[str]]:
    """Region -> the AMIs whose per-AMI details (DescribeImageReferences, launch permissions, and the
    usage reports of those they are shared with) the plan needs, so only these are read: the candidates
    it retires this run (the caps hold back the rest, as keeps) or runs a clock on, and those the janitor
    has started on that a cap holds back (referenced or shared outside share_with, they are rescued).
    An AMI whose launch permissions were read already (to see whether it lost a grant) is among them:
    its references and reports are not."""
    actions: dict[str, dict[str, str]] = {}
    for decision in plan.decisions:
        actions.setdefault(decision.region, {})[decision.image_id] = decision.action
    needed: dict[str, list[str]] = {}
    for region, by_image in sorted(actions.items()):
        unread = [
            image.image_id
            for image in inventories[region].images
            if image.state in ("available", "disabled") and _may_need(by_image.get(image.image_id), image)
        ]
        if unread:
            needed[region] = unread
    return needed


def _may_need(action: str | None, image: Image) -> bool:
    """Whether an AMI's launch permissions could change this decision."""
    return action in RETIRING or (action == "keep" and is_janitor_touched(image))


def settle(plan: Plan, inventories: Mapping[str, RegionInventory], policy: Policy) -> Plan:
    """The plan once the details it asked for are read: a candidate something references (found by
    DescribeImageReferences: the other sources were judged already) or shared outside its family's
    share_with is kept (rescued if the janitor had started on it). The run then acts on fewer AMIs than
    the caps allowed: the caps are not spent again."""
    images = {
        (region, image.image_id): image
        for region, inventory in inventories.items()
        for image in inventory.images
        if image.launch_permissions is not None
    }
    referenced: dict[tuple[str, str], list[str]] = {}
    for region, inventory in inventories.items():
        for reference in inventory.references:
            referenced.setdefault((region, reference.image_id), []).append(reference.detail)
    now = parse_time(plan.generated_at) or datetime.now(UTC)
    decisions = [
        _settled(
            d,
            images.get((d.region, d.image_id)),
            referenced.get((d.region, d.image_id), []),
            policy,
            (inventories[d.region].usage, now) if d.region in inventories else None,
        )
        for d in plan.decisions
    ]
    # What the details added to a region's notes (a report not sent, Organizations not readable).
    notes = list(
        dict.fromkeys(
            [*plan.notes, *(f"{region}: {n}" for region, inv in inventories.items() for n in inv.notes)]
        )
    )
    if all(new is old for new, old in zip(decisions, plan.decisions, strict=True)):
        return plan if notes == plan.notes else plan.model_copy(update={"notes": notes})
    usable = [inv for inv in inventories.values() if inv.error is None]
    summary = planner.summarize(decisions, usable, plan.summary.regions_skipped).model_copy(
        update={"tampered": plan.summary.tampered}
    )
    shares = _with_shares_of_the_kept(plan, decisions, inventories, policy)
    return plan.model_copy(
        update={"decisions": decisions, "summary": summary, "notes": notes, "shares": shares}
    )


def _with_shares_of_the_kept(
    plan: Plan, decisions: Sequence[Decision], inventories: Mapping[str, RegionInventory], policy: Policy
) -> list[Share]:
    """The plan's shares, and those of the AMIs the details kept: planned to retire, they had none
    (plan_run), and kept now they get the family's share_with as any kept member does."""
    kept = [
        new
        for new, old in zip(decisions, plan.decisions, strict=True)
        if new is not old and old.action in RETIRING and new.action not in RETIRING
    ]
    if not kept:
        return plan.shares
    images = {(region, image.image_id): image for region, inv in inventories.items() for image in inv.images}
    added = [
        share
        for decision in kept
        if (share := share_for(images[(decision.region, decision.image_id)], policy.family(decision.family)))
    ]
    # In the plan's order (region, family, architecture, newest first): the decisions' order.
    order = {(d.region, d.image_id): index for index, d in enumerate(decisions)}
    return sorted([*plan.shares, *added], key=lambda share: order[(share.region, share.image_id)])


def _settled(
    decision: Decision,
    image: Image | None,
    references: list[str],
    policy: Policy,
    usage: tuple[UsageView | None, datetime] | None,
) -> Decision:
    if image is None or not _may_need(decision.action, image):
        return decision
    family = policy.family(decision.family)
    reasons = sorted(set(references))
    if not reasons and not policy.rules_for(family).allow_shared:
        reasons = shared_outside(image, family)
    if not reasons and policy.usage_reports is not None and usage is not None:
        from ami_janitor.core.usage import usage_reasons  # a policy with usage_reports

        reasons = usage_reasons(image, usage[0], policy.usage_reports, usage[1])
    if not reasons:
        return decision
    action = "rescue" if is_janitor_touched(image) else "keep"
    update = {"action": action, "reasons": reasons, "stages": [], "next_action": None, "next_action_at": None}
    return decision.model_copy(update=update)
