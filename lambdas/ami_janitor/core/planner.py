"""The pure planner: inventory + policy + now -> plan. No AWS calls, no clock, no randomness."""

from __future__ import annotations

import gc
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from itertools import repeat
from operator import attrgetter, itemgetter
from typing import Any

from pydantic import BaseModel

from ami_janitor.core import guardrails, trust
from ami_janitor.core.model import (
    Decision,
    Image,
    LatestChange,
    Plan,
    RegionInventory,
    RegionStatus,
    ScheduledBake,
    Stage,
    Summary,
    Tampered,
    iso,
)
from ami_janitor.core.policy import (
    Family,
    Policy,
    Rules,
)

ACTING: frozenset[str] = frozenset({"deprecate", "disable", "deregister"})
# States in which an AMI counts toward keep-N (pending and failed builds are not versions yet).
RANKED_STATES = frozenset({"available", "disabled"})


# The package's records are NamedTuples (the frozen ones) or plain classes with slots like this one,
# not the standard library's data classes: each of those compiles generated code as its module loads
# (about 3.5 million instructions), and these modules load at every cold start.
class Group:
    """A family's members in one region with one architecture, newest first."""

    __slots__ = (
        "architecture",
        "contested",
        "family",
        "members",
        "region",
        "rules",
        "superseded",
        "tag_holders",
    )

    def __init__(
        self,
        region: str,
        family: Family,
        architecture: str,
        rules: Rules,
        members: list[Image] | None = None,
        superseded: set[str] | None = None,
        tag_holders: list[str] | None = None,
        contested: frozenset[str] = frozenset(),
    ) -> None:
        self.region = region
        self.family = family
        self.architecture = architecture
        self.rules = rules
        self.members: list[Image] = [] if members is None else members
        # Originals whose encrypted same-region copy stands in for them (set by build_groups).
        self.superseded: set[str] = set() if superseded is None else superseded
        # Members carrying the family's Latest tag, newest first (set by build_groups: tags never change
        # in a plan, so a rescued view of the group keeps them).
        self.tag_holders: list[str] = [] if tag_holders is None else tag_holders
        # Members that match several families too (set by build_groups): kept, a policy error, and
        # neither ranked, nor a Latest target, nor a Latest holder to untag.
        self.contested = contested

    def with_members(self, members: list[Image], superseded: set[str] | None = None) -> Group:
        """A copy of the group with `members` (and `superseded`, when given); its other fields are this
        group's own objects, the Latest tag's holders among them."""
        return Group(
            self.region,
            self.family,
            self.architecture,
            self.rules,
            members,
            self.superseded if superseded is None else superseded,
            self.tag_holders,
            self.contested,
        )


def order_key(image: Image) -> tuple[datetime, str, str]:
    return (image.order_time, image.name, image.image_id)


def is_janitor_touched(image: Image) -> bool:
    """The ledger has a candidate clock running on it: keeping it means a rescue (undo what the stages
    did, close the clock). Tags say nothing here: anyone may write them."""
    return trust.open_item(image) is not None


def janitor_grants(image: Image) -> set[str]:
    """Launch permissions the janitor granted itself, as its ledger records them (never a tag), and
    still in place: none once a disable removed them (trust.grants_removed), so that a share the owner
    made after enabling the AMI by hand is judged as the owner's."""
    if image.ledger is None or trust.grants_removed(image):
        return set()
    return set(image.ledger.grants)


# order_key of an AMI that is no copy, made in C: most groups have no copy at all.
_BY_CREATION = attrgetter("created", "name", "image_id")
_CREATED = attrgetter("created")


def build_groups(inventory: RegionInventory, policy: Policy) -> tuple[list[Group], dict[str, list[str]]]:
    """Groups of the region's managed AMIs, and for AMIs matching several families, those names."""
    by_key: dict[tuple[str, str], Group] = {}
    with_copies: set[tuple[str, str]] = set()  # groups ordered by order_key, not by creation
    conflicts: dict[str, list[str]] = {}
    matchers = [(family, family.match.matcher()) for family in policy.families]
    latest_tags = {family.name: family.latest.tag for family in policy.families if family.latest}
    tagged: dict[tuple[str, str], list[Image]] = defaultdict(list)
    for image in inventory.images:
        name, tags = image.name, image.tags
        family: Family | None = None
        for candidate, matches in matchers:  # a loop, not a list per AMI: one family matches, mostly
            if matches(name, tags):
                if family is not None:
                    family = _conflict(image, matchers, conflicts)
                    break
                family = candidate
        if family is None:
            continue
        key = (family.name, image.architecture)
        group = by_key.get(key)
        if group is None:
            group = by_key[key] = Group(
                inventory.region, family, image.architecture, policy.rules_for(family)
            )
        group.members.append(image)
        if image.copied_from is not None:
            with_copies.add(key)
        names = conflicts.get(image.image_id)
        if names is None:
            tag = latest_tags.get(family.name)
            if tag is not None and tag in tags:
                tagged[key].append(image)
        else:
            # Never a Latest target: a Latest tag it carries (a tagger's, as likely as not) is taken
            # back by the rotation of every family it matches whose tag that is.
            for name in names:
                tag = latest_tags.get(name)
                if tag is not None and tag in tags:
                    tagged[(name, image.architecture)].append(image)
    groups = [by_key[key] for key in sorted(by_key)]
    for group in groups:
        copies = (group.family.name, group.architecture) in with_copies
        _newest_first(group.members, copies)
        holders = tagged.get((group.family.name, group.architecture))
        if holders:
            _newest_first(holders, copies)
            group.tag_holders = [holder.image_id for holder in holders]
        group.superseded = superseded_ids(group) if copies else set()
        if conflicts:
            group.contested = frozenset(m.image_id for m in group.members if m.image_id in conflicts)
    return groups, conflicts


def _newest_first(images: list[Image], copies: bool) -> None:
    """Sorts by order_key, newest first. Without copies, by creation time alone where no two AMIs share
    one (the same order, without a key tuple per AMI)."""
    if copies:
        images.sort(key=order_key, reverse=True)
    elif len(set(map(_CREATED, images))) == len(images):
        images.sort(key=_CREATED, reverse=True)
    else:
        images.sort(key=_BY_CREATION, reverse=True)


def _conflict(
    image: Image,
    matchers: list[tuple[Family, Callable[[str, dict[str, str]], bool]]],
    conflicts: dict[str, list[str]],
) -> Family:
    """The family an AMI matching several is grouped with (it is kept: a policy error); records them."""
    families = [family for family, matches in matchers if matches(image.name, image.tags)]
    conflicts[image.image_id] = sorted(f.name for f in families)
    return min(families, key=lambda f: f.name)


def superseded_ids(group: Group) -> set[str]:
    """Originals whose encrypted same-region copy stands in for them (encrypt in place)."""
    return {
        source
        for image in group.members
        if image.copied_from is not None  # most AMIs: no copy at all
        if (source := image.source_image_id)
        and image.source_region == group.region
        and image.state == "available"
    }


def latest_target(group: Group, now: datetime) -> Image | None:
    """The newest available AMI of the group: the one the Latest pointer names."""
    for image in group.members:
        if (
            image.state == "available"
            and not image.deprecated_at(now)
            and image.image_id not in group.superseded
            and image.image_id not in group.contested
        ):
            return image
    return None


def kept_by_rank(group: Group, now: datetime) -> set[str]:
    """The members the group keeps by its order alone: its `keep_latest` newest ranked members (available
    or disabled, not superseded, not contested) and its Latest where the family has one. _judge applies
    the same two rules one AMI at a time."""
    kept: set[str] = set()
    rank = 0
    for image in group.members:
        if (
            image.state in RANKED_STATES
            and image.image_id not in group.superseded
            and image.image_id not in group.contested
        ):
            rank += 1
            if rank > group.rules.keep_latest:
                break
            kept.add(image.image_id)
    latest = latest_target(group, now) if group.family.latest is not None else None
    if latest is not None:
        kept.add(latest.image_id)
    return kept


GroupKey = tuple[str, str]  # a group's family and architecture


def rotation_errors(
    groups: Sequence[Group],
    conflicts: Mapping[str, Sequence[str]],
    policy: Policy,
    now: datetime,
    inventory: RegionInventory,
) -> dict[GroupKey, str]:
    """The groups of one region whose Latest this run leaves where it is, and why: their one SSM
    parameter would have to name AMIs of several architectures, or an AMI newer than their Latest
    target matches several families, or their parameter names an AMI newer than the target that the
    family no longer selects (moving Latest to the target would move it back past that AMI: a tag
    written on, or taken off, a family's newest AMI must not move its Latest to an older one)."""
    errors: dict[GroupKey, str] = {}
    # The architectures whose groups have an AMI Latest could name (a failed build, or one disabled or
    # deprecated, never is: the parameter names the others' alone).
    archs: dict[str, set[str]] = defaultdict(set)
    for group in groups:
        if group.family.latest is not None and latest_target(group, now) is not None:
            archs[group.family.name].add(group.architecture)
    for family in policy.families:
        parameter = family.latest.ssm_parameter if family.latest else None
        found = archs.get(family.name, set())
        if parameter and "{arch}" not in parameter and len(found) > 1:
            message = (
                f"family {family.name}: latest.ssm_parameter {parameter} must contain {{arch}}: its available "
                f"AMIs in {groups[0].region} have several architectures ({', '.join(sorted(found))}); not rotated"
            )
            errors.update(((family.name, arch), message) for arch in found)
    errors.update(_left_the_family(groups, inventory, now, errors, conflicts))
    errors.update(_tag_left_the_family(groups, inventory, now, errors, policy))
    if not conflicts:
        return errors
    # The contested AMIs that could be Latest, by each (family, architecture) they match; under the
    # family's name alone too, for a family with one parameter for every architecture (the group of
    # another architecture writes that parameter).
    contested: dict[GroupKey, list[Image]] = defaultdict(list)
    for group in groups:
        if not group.contested:
            continue
        for image in group.members:
            if (
                image.image_id in group.contested
                and image.state == "available"
                and not image.deprecated_at(now)
            ):
                for name in conflicts[image.image_id]:
                    contested[(name, image.architecture)].append(image)
                    contested[(name, "")].append(image)
    for group in groups:
        latest = group.family.latest
        key = (group.family.name, group.architecture)
        if latest is None or key in errors:
            continue
        rivals = contested.get((group.family.name, "") if latest.one_parameter else key)
        if not rivals:
            continue
        target = latest_target(group, now)
        for image in rivals:
            if target is None or order_key(image) > order_key(target):
                errors[key] = (
                    f"family {group.family.name} ({group.architecture}) in {group.region}: {image.image_id}, "
                    f"newer than any other AMI of the group, matches several families "
                    f"({', '.join(conflicts[image.image_id])}); Latest not rotated"
                )
                break
    return errors


def _left_the_family(
    groups: Sequence[Group],
    inventory: RegionInventory,
    now: datetime,
    errors: Mapping[GroupKey, str],
    conflicts: Mapping[str, Sequence[str]],
) -> dict[GroupKey, str]:
    """The groups whose SSM parameter names an AMI of theirs that the family no longer selects (its tags
    changed, or the policy's match), still available and newer than the group's Latest target. The
    parameter is not moved back to the older target: only EC2's facts (that AMI disabled, deprecated
    or deregistered) or a person (writing the parameter) move it. An AMI matching this family and
    others is left to the check below; one that matches others but no longer this one has left it too
    (a tagger who takes a family's key off its newest AMI and puts two other families' on). An AMI whose
    name the family's glob does not name was never the family's (a name never changes): the parameter
    was written by hand to it, and the rotation writes it back."""
    found: dict[GroupKey, str] = {}
    by_id: dict[str, Image] | None = None
    for group in groups:
        latest, key = group.family.latest, _key(group)
        if latest is None or latest.ssm_parameter is None or key in errors:
            continue
        parameter = latest.parameter_for(group.architecture)
        named = inventory.parameters.get(parameter) if parameter else None
        if named is None or group.family.name in conflicts.get(named, ()):
            continue
        # One parameter for every architecture: the groups of the others write it too, and it may name
        # their AMI; one per architecture naming another architecture's AMI is none of this group's.
        writers = (
            [g for g in groups if g.family.name == group.family.name] if latest.one_parameter else [group]
        )
        if any(member.image_id == named for writer in writers for member in writer.members):
            continue
        if by_id is None:
            by_id = {image.image_id: image for image in inventory.images}
        image = by_id.get(named)
        target = latest_target(group, now)
        if (
            image is None
            or target is None
            or not group.family.match.names(image.name)
            or (image.architecture != group.architecture and not latest.one_parameter)
            or image.state != "available"
            or image.deprecated_at(now)
            or order_key(image) <= order_key(target)
        ):
            continue
        found[key] = (
            f"family {group.family.name} ({group.architecture}) in {group.region}: {parameter} names "
            f"{named}, newer than {target.image_id} and available, which the family no longer selects "
            f"(its tags changed, or the tags the policy's match asks for); Latest not moved back: disable or deprecate "
            f"{named}, or write the parameter by hand"
        )
    return found


def _tag_left_the_family(
    groups: Sequence[Group],
    inventory: RegionInventory,
    now: datetime,
    errors: Mapping[GroupKey, str],
    policy: Policy,
) -> dict[GroupKey, str]:
    """As _left_the_family, for a family whose Latest is a tag: the groups where an AMI its name glob
    selects, and no family now does, carries its Latest tag and is newer than its Latest target, still
    available (a tagger took the family's tag off the newest AMI, which the rotation had tagged). The
    tag is not moved back to the older target. A family matched by tags alone is left out: it names
    any AMI, and a tag-writer decides its members (the plan warns)."""
    tags = {
        _key(g): g.family.latest.tag
        for g in groups
        if g.family.latest is not None
        and g.family.latest.tag is not None
        and not g.family.match.by_tags_alone
        and _key(g) not in errors
    }
    if not tags:
        return {}
    # The AMIs carrying one of those tags that no family selects (a few, where any: one pass).
    keys = set(tags.values())
    matches = [family.match.matches for family in policy.families]
    loose = [
        image
        for image in inventory.images
        if any(image.tags.get(key) == "true" for key in keys)
        and not any(match(image.name, image.tags) for match in matches)
    ]
    if not loose:
        return {}
    found: dict[GroupKey, str] = {}
    for group in (g for g in groups if _key(g) in tags):
        tag, names = tags[_key(group)], group.family.match.names
        target = latest_target(group, now)
        if target is None:
            continue
        for image in loose:
            if (
                image.tags.get(tag) == "true"
                and image.architecture == group.architecture
                and image.state == "available"
                and names(image.name)
                and not image.deprecated_at(now)
                and order_key(image) > order_key(target)
            ):
                found[_key(group)] = (
                    f"family {group.family.name} ({group.architecture}) in {group.region}: {image.image_id} "
                    f"carries its Latest tag {tag}, newer than {target.image_id} and available, "
                    f"which the family no longer selects (its tags changed); Latest not moved back: "
                    f"disable or deprecate {image.image_id}, or take its {tag} tag off"
                )
                break
    return found


def rotation(
    group: Group, inventory: RegionInventory, now: datetime, pointer_error: str | None
) -> LatestChange | None:
    """What this run changes to the group's Latest tag and SSM parameter (None: nothing)."""
    latest = group.family.latest
    if latest is None or pointer_error:
        return None
    target = latest_target(group, now)
    tag = latest.tag
    holders = group.tag_holders if tag else []
    parameter = latest.parameter_for(group.architecture)
    current = inventory.parameters.get(parameter) if parameter else None
    if target is None:
        if not holders:
            return None
        return LatestChange(
            region=group.region,
            family=group.family.name,
            architecture=group.architecture,
            **{"from": holders[0]},
            to=None,
            ssm_parameter=parameter,
            untag=holders,
            warning="no available AMI in the group: the Latest tag is removed, the parameter is left as it is",
        )
    tag_ok = latest.tag is None or (holders == [target.image_id] and target.tags.get(latest.tag) == "true")
    parameter_ok = parameter is None or current == target.image_id
    if tag_ok and parameter_ok:
        return None
    return LatestChange(
        region=group.region,
        family=group.family.name,
        architecture=group.architecture,
        **{"from": holders[0] if holders else current},
        to=target.image_id,
        ssm_parameter=parameter,
        untag=[h for h in holders if h != target.image_id],
    )


def _references_index(inventory: RegionInventory, parameters: dict[str, str]) -> dict[str, list[str]]:
    index: dict[str, set[str]] = defaultdict(set)
    for reference in inventory.references:
        index[reference.image_id].add(reference.detail)
    for name, value in parameters.items():
        index[value].add(f"value of SSM parameter {name}")
    return {image_id: sorted(details) for image_id, details in index.items()}


def _day(value: datetime) -> str:
    return value.strftime("%Y-%m-%d")


# Judges one member of a group (the AMI, its field dict, its order time): the reasons that keep it (and
# rescue a candidate); none: a candidate.
_Judge = Callable[[Image, dict[str, Any], datetime], list[str]]
_STANDS_IN = "its encrypted copy in this region stands in for it"


def _judge(
    group: Group,
    now: datetime,
    references: dict[str, list[str]],
    conflicts: dict[str, list[str]],
    latest_id: str | None,
    tag_stays: bool,
) -> _Judge:
    """Why each member of one group is kept, members taken newest first (the rank counts on). A member
    nothing keeps is a candidate: ranked, superseded or not among the newest, and old (_decide_group).
    A closure over the loop's invariants: it runs once per AMI of the account. The Latest tag keeps its
    holders only where this run cannot rotate (`tag_stays`): elsewhere the rotation moves it to
    `latest_id` first."""
    rules, family, superseded, contested = group.rules, group.family, group.superseded, group.contested
    allowed = set(family.share_with.grants()) | ({"group:all"} if family.public else set())
    keep_latest, opt_out, check_shares = rules.keep_latest, rules.opt_out_tag, not rules.allow_shared
    young_after = now - timedelta(days=rules.min_age_days)
    launched_after = now - timedelta(days=rules.launched_within_days)
    latest_tag = family.latest.tag if family.latest and tag_stays else None
    among = f"among the {keep_latest} newest of its group (#"
    rank = 0  # of the ranked members judged so far

    def judge(image: Image, values: dict[str, Any], order_time: datetime) -> list[str]:
        nonlocal rank
        keep: list[str] = []
        image_id, state, tags = values["image_id"], values["state"], values["tags"]
        if image_id in conflicts:
            keep.append(f"matches several families ({', '.join(conflicts[image_id])}): policy error")
        if state not in RANKED_STATES:
            keep.append(f"state {state}: not managed until available")
        elif image_id not in superseded and image_id not in contested:
            rank += 1
            if rank <= keep_latest:
                keep.append(f"{among}{rank})")
        if order_time > young_after:
            age_from = "source created" if order_time != values["created"] else "created"
            keep.append(f"younger than {rules.min_age_days} days ({age_from} {_day(order_time)})")
        if image_id == latest_id:
            keep.append("Latest of its group")
        elif latest_tag and latest_tag in tags:
            keep.append(f"carries the {latest_tag} tag")
        if image_id in references:
            keep.extend(references[image_id])
        last_launched = values["last_launched"]
        if last_launched and last_launched >= launched_after:
            keep.append(f"launched {_day(last_launched)} (within {rules.launched_within_days} days)")
        if check_shares and (values["public"] or values["launch_permissions"]):
            keep.extend(shared_outside(image, family, allowed))
        if opt_out in tags:
            keep.append(f"opted out (tag {opt_out})")
        if values["deregistration_protection"]:
            keep.append("deregistration protection is on")
        return keep

    return judge


def shared_outside(image: Image, family: Family, allowed: set[str] | None = None) -> list[str]:
    """Keep reasons of an AMI shared beyond the family's share_with (or public without public: true).
    `allowed` is the family's grants, when the caller has them at hand. The grants the janitor made
    retire with the AMI, but in a family matched by tags alone: a tag may have brought the AMI there
    from the family that shared it, and there they are neither revoked nor retired (share_for)."""
    if allowed is None:
        allowed = set(family.share_with.grants()) | ({"group:all"} if family.public else set())
    reasons: list[str] = []
    if image.public and not family.public:
        reasons.append("public (the family does not set public: true)")
    if image.launch_permissions:
        own = allowed if family.match.by_tags_alone else allowed | janitor_grants(image)
        for grant in sorted(p.key for p in image.launch_permissions if p.key not in own):
            if grant == "group:all" and image.public:
                continue  # reported as public above
            reasons.append(f"shared with {grant} (not in share_with)")
    return reasons


_SECONDS = tuple(f"{second:02}Z" for second in range(60))


def _stamper() -> Callable[[datetime], str]:
    """iso(), for the creation time of every AMI of a region: the date and the hour and minute made
    once each and kept (an aware datetime's isoformat costs four times as much, and a plan of 50,000
    AMIs formats 50,000 of them)."""
    dates: dict[int, str] = {}
    minutes: dict[int, str] = {}

    def stamp(value: datetime) -> str:
        if value.tzinfo is not UTC:
            return iso(value) or ""
        day = value.toordinal()
        date = dates.get(day)
        if date is None:
            date = dates[day] = value.date().isoformat() + "T"
        minute = value.hour * 60 + value.minute
        clock = minutes.get(minute)
        if clock is None:
            clock = minutes[minute] = f"{value.hour:02}:{value.minute:02}:"
        return date + clock + _SECONDS[value.second]

    return stamp


def _configured_stages(rules: Rules) -> list[tuple[Stage, int]]:
    return [(stage, days) for stage, days in rules.lifecycle.stage_days() if days is not None]  # type: ignore[misc]


_ALL_FIELDS = set(Decision.model_fields)
# The setters of the slots every pydantic model has (what model_construct sets), called directly:
# object.__setattr__ looks each one up again.
_SLOTS = BaseModel.__dict__
_set_dict = _SLOTS["__dict__"].__set__
_set_fields_set = _SLOTS["__pydantic_fields_set__"].__set__
_set_extra = _SLOTS["__pydantic_extra__"].__set__
_set_private = _SLOTS["__pydantic_private__"].__set__


def _decision(fields: dict[str, Any]) -> Decision:
    """A Decision over `fields`, its own dict. Every field comes from validated models, so validation
    (and model_construct's per-field loop) is skipped: a plan of 50,000 AMIs makes 50,000 of these.
    Decisions are frozen, so they share one fields-set. The caps still edit the dict of those that
    act, before the plan is returned."""
    decision = object.__new__(Decision)
    _set_dict(decision, fields)
    _set_fields_set(decision, _ALL_FIELDS)
    _set_extra(decision, None)
    _set_private(decision, None)
    return decision


_NOTHING_KEEPS = "not referenced, not launched recently, not Latest, not shared outside share_with"


def _candidate(
    reasons: list[str], plan: trust.StagePlan, since: str | None, next_at: str | None, instance_store: bool
) -> str:
    """The action of a candidate (nothing keeps it); adds the reasons its stage plan gives."""
    reasons.append(_NOTHING_KEEPS)
    due = plan.due
    if instance_store and "deregister" in due:
        reasons.append("instance-store backed: deregistration leaves its S3 bundle in place")
    if plan.finishing:
        reasons.append(f"{plan.finishing} recorded in the ledger but not done: done again")
    if due:
        reasons.append(f"{', '.join(due)} due (candidate since {since})")
        return due[-1]
    reasons.append(f"{plan.next_stage} due {next_at}" if plan.next_stage else "no further stage configured")
    return "wait"


# A candidate's stage plan, its candidate_since and next_action_at texts, its action and the reasons
# the plan adds.
_Staged = tuple[trust.StagePlan, str | None, str | None, str, tuple[str, ...]]


def _staged(image: Image, configured: list[tuple[Stage, int]], now: datetime) -> _Staged:
    plan = trust.stage_plan(image, configured, now)
    since, next_at = iso(plan.since), iso(plan.next_at)
    reasons: list[str] = []
    action = _candidate(reasons, plan, since, next_at, image.root_device_type == "instance-store")
    return plan, since, next_at, action, tuple(reasons)


# A decision whose stages are due, made held back until the caps let it move (they hold back most of a
# backlog): (image, the decision's own field dict, its stage plan as _staged made it). A tuple, not an
# object: a backlog makes tens of thousands of them.
_Due = tuple[Image, dict[str, Any], _Staged]


def _decide_group(
    group: Group, judge: _Judge, now: datetime, stamp: Callable[[datetime], str], rescued: set[str]
) -> tuple[list[Decision], list[_Due]]:
    """The decisions of the group, and those whose stages are due (newest first), held back until the
    caps let them move. Adds the AMIs it rescues to `rescued`."""
    decisions: list[Decision] = []
    due: list[_Due] = []
    region, family, architecture = group.region, group.family.name, group.architecture
    configured = _configured_stages(group.rules)
    # Every EBS-backed candidate without a ledger clock has the same stage plan and its reasons: made
    # once (a backlog of tens of thousands is mostly such candidates, and the caps hold most back).
    fresh: _Staged | None = None
    superseded, rules = group.superseded, group.rules
    not_among = f"not among the {rules.keep_latest} newest of its group"
    older = f"older than {rules.min_age_days} days"
    for image in group.members:
        # The AMI's fields read from its dict: an attribute of a pydantic model is looked up on its
        # class first (a dozen reads per AMI, for every AMI of the account).
        values = image.__dict__
        created, image_id, copied_from = values["created"], values["image_id"], values["copied_from"]
        # image.order_time, without the property's call for the AMIs that are no copy (most).
        order_time = created if copied_from is None else image.order_time
        keep = judge(image, values, order_time)
        item = values["ledger"]
        clock = item if item is not None and item.is_open else None
        next_stage: Stage | None = None
        next_text: str | None = None
        pending: _Staged | None = None
        if keep:
            since_text = iso(clock.first_candidate) if clock is not None else None
            action = "keep"
            if clock is not None:
                action = "rescue"
                rescued.add(image_id)
            reasons = keep
        else:
            if clock is None and values["root_device_type"] != "instance-store":
                staged = fresh = fresh or _staged(image, configured, now)
            else:
                staged = _staged(image, configured, now)
            stage_plan, since_text, next_text, action, tail = staged
            # Nothing keeps it: ranked and not among the newest (or superseded), and old.
            reasons = [_STANDS_IN if image_id in superseded else not_among, older, *tail]
            next_stage = stage_plan.next_stage
            if stage_plan.due:
                pending, action, next_stage, next_text = staged, "keep", stage_plan.due[0], None
        fields = {
            "region": region,
            "family": family,
            "architecture": architecture,
            "image_id": image_id,
            "name": values["name"],
            "created": stamp(created),
            "action": action,
            "reasons": reasons,
            "candidate_since": since_text,
            "next_action": next_stage,
            "next_action_at": next_text,
            "snapshots": list(values["snapshot_ids"]),
            "size_gib": values["size_gib"],
            "source_image_id": None if copied_from is None else image.source_image_id,
            "stages": [],
        }
        decisions.append(_decision(fields))
        if pending is not None:
            due.append((image, fields, pending))
    return decisions, due


def _snapshot_users(groups: list[Group], inventory: RegionInventory | None) -> Counter[str]:
    """How many of the region's AMIs use each snapshot (a snapshot another AMI uses is not deleted)."""
    images = inventory.images if inventory is not None else [m for g in groups for m in g.members]
    # Each AMI once per snapshot: one mapping a snapshot on two devices is its only user all the same.
    return Counter(s for image in images for s in set(image.snapshot_ids))


def _cost(image: Image, action: str, users: Counter[str] | None) -> int:
    """Actions a decision spends of max_actions_per_run: its stage move, plus each snapshot its
    deregistration deletes (snapshot deletions count toward the caps)."""
    if action != "deregister" or users is None:
        return 1
    return 1 + sum(1 for s in set(image.snapshot_ids) if users[s] <= 1)


# A due decision's _Staged, and the action it moves to if the caps let it: read in C.
_STAGED, _STAGED_ACTION = itemgetter(2), itemgetter(3)


def _move(fields: dict[str, Any], staged: _Staged) -> None:
    """A due decision the caps let move: its action and stages."""
    plan, _, next_at, action, _ = staged
    fields["action"], fields["next_action"], fields["next_action_at"] = action, plan.next_stage, next_at
    fields["stages"] = list(plan.due)


def _apply_caps(
    due: list[list[_Due]],
    groups: list[Group],
    policy: Policy,
    inventory: RegionInventory | None = None,
    spent: int = 0,
) -> None:
    """Let the due decisions of each group (`due`, by group, newest first) move, oldest first, up to the
    caps, and say which cap holds back each of the others: per group a fraction of the AMIs, per region
    a count of actions (stage moves and snapshot deletions)."""
    allowed: list[int] = []
    group_reason: list[str] = []
    for g in groups:
        fraction = g.rules.limits.max_fraction_per_family
        # The fraction as written (0.29 x 100 is 28.999... in floating point): floor of the exact product
        # (fractions loads decimal: imported where a region has groups, not at each cold start).
        from fractions import Fraction

        allowed.append(math.floor(Fraction(str(fraction)) * len(g.members)))
        group_reason.append(
            f"held back by max_fraction_per_family ({fraction:g} of {len(g.members)} members"
            f" = {allowed[-1]} per run)"
        )
    budget = policy.defaults.limits.max_actions_per_run - spent
    region_reason = f"held back by max_actions_per_run ({policy.defaults.limits.max_actions_per_run})"
    deregistering = any("deregister" in map(_STAGED_ACTION, map(_STAGED, entries)) for entries in due)
    users = _snapshot_users(groups, inventory) if deregistering else None
    # Where every move costs one action, a group moves only among its oldest min(allowed, budget): the
    # newer ones wait behind them, held back by whichever cap has filled by then. Only the oldest are
    # put in order (a backlog of tens of thousands, capped at a thousand a run). A region's AMI ids are
    # unique, so the oldest of a group are the last of its newest-first list.
    heads: list[tuple[tuple[datetime, str, str], int, Image, dict[str, Any], _Staged]] = []
    tails: list[list[_Due]] = []
    for index, entries in enumerate(due):
        split = max(0, len(entries) - max(0, min(allowed[index], budget))) if users is None else 0
        tails.append(entries[:split])
        heads.extend(
            (order_key(image), index, image, fields, staged) for image, fields, staged in entries[split:]
        )
    heads.sort(key=itemgetter(0))
    moved = [0] * len(groups)
    total = 0
    for _, index, image, fields, staged in heads:
        cost = 1 if users is None else _cost(image, staged[3], users)
        if moved[index] >= allowed[index]:
            reason = group_reason[index]
        elif total + cost > budget:
            reason = region_reason
            if cost > 1:
                reason += f": deregistering it would delete {cost - 1} snapshot(s), {cost} actions"
        else:
            moved[index] += 1
            total += cost
            _move(fields, staged)
            if users is not None and staged[3] == "deregister":
                # Gone with this run: the last of a snapshot's users deletes it, and pays for it (an AMI
                # that maps a snapshot twice is one user of it, as _snapshot_users counts).
                users.subtract(set(image.snapshot_ids))
            continue
        fields["reasons"].append(reason)
    for index, tail in enumerate(tails):
        reason = group_reason[index] if moved[index] >= allowed[index] else region_reason
        for _, fields, _ in tail:
            fields["reasons"].append(reason)


def plan_region(
    inventory: RegionInventory,
    policy: Policy,
    now: datetime,
    grouped: tuple[list[Group], dict[str, list[str]]],
    spent: int = 0,
) -> tuple[list[Decision], list[LatestChange], list[str]]:
    """Decisions and Latest changes of one region (inventory complete), plus policy errors.

    Judged after this run's rotation: the Latest pointer parameters hold the values the rotation
    writes. Latest changes are those after this run's rescues (a rescued AMI may be the newest)."""
    groups, conflicts = grouped
    errors = rotation_errors(groups, conflicts, policy, now, inventory)
    before = {id(group): rotation(group, inventory, now, errors.get(_key(group))) for group in groups}

    def judged(
        errors: Mapping[GroupKey, str], moves: Iterable[LatestChange | None]
    ) -> tuple[list[Decision], set[str]]:
        """Every group's decisions (caps applied) and rescues, after the rotation `moves` writes and with
        the Latest tag staying where `errors` leaves a group unrotated."""
        parameters = dict(inventory.parameters)
        for change in moves:
            if change is not None and change.ssm_parameter and change.to:
                parameters[change.ssm_parameter] = change.to
        references = _references_index(inventory, parameters)
        decisions: list[Decision] = []
        due: list[list[_Due]] = []
        stamp = _stamper()
        rescued: set[str] = set()
        for group in groups:
            target = latest_target(group, now) if group.family.latest else None
            tag_stays = _key(group) in errors
            judge = _judge(group, now, references, conflicts, target.image_id if target else None, tag_stays)
            group_decisions, group_due = _decide_group(group, judge, now, stamp, rescued)
            decisions.extend(group_decisions)
            due.append(group_due)
        _apply_caps(due, groups, policy, inventory, spent)
        return decisions, rescued

    decisions, rescued = judged(errors, before.values())
    changes: list[LatestChange] = []
    views = [
        after_rescues(group, rescued, now)
        if rescued and rescued.intersection(m.image_id for m in group.members)
        else group
        for group in groups
    ]
    # The groups as the rescues leave them are judged again: a rescued AMI may give another
    # architecture an AMI Latest could name (one parameter without {arch} must not name both).
    rescues_changed_a_group = any(view is not group for view, group in zip(views, groups, strict=True))
    settled = rotation_errors(views, conflicts, policy, now, inventory) if rescues_changed_a_group else errors
    for group, view in zip(groups, views, strict=True):
        error = settled.get(_key(group))
        change = (
            before[id(group)]
            if view is group and error == errors.get(_key(group))
            else rotation(view, inventory, now, error)
        )
        if change is not None:
            changes.append(change)
    if settled != errors:
        # The rescues left a group unrotated that the decisions took as rotated (or the other way): its
        # Latest holders were judged as if Latest had left them. Judged again, as the rotation will be.
        decisions, _ = judged(settled, changes)
    policy_errors = [
        *sorted(set(errors.values()) | set(settled.values())),
        *(
            f"{image_id} matches several families ({', '.join(names)}): kept"
            for image_id, names in sorted(conflicts.items())
        ),
    ]
    return decisions, changes, policy_errors


def _key(group: Group) -> GroupKey:
    return (group.family.name, group.architecture)


def after_rescues(group: Group, rescued: set[str], now: datetime) -> Group:
    """The group as EC2 will show it once the rescues are done: enabled, deprecation restored."""
    members = [_rescued_view(m, now) if m.image_id in rescued else m for m in group.members]
    after = group.with_members(members)
    after.superseded = superseded_ids(after)
    return after


def _rescued_view(image: Image, now: datetime) -> Image:
    """What a rescue leaves, by the ledger: a disable it recorded undone, its prior deprecation back
    (stages adopted from tags stay as EC2 shows them)."""
    deprecation = image.deprecation_time
    deprecate = trust.undoable_stage(image, "deprecate")
    if deprecate is not None:
        prior = deprecate.prior_deprecation
        if prior is None:
            deprecation = None
        elif prior > now:
            deprecation = prior
    disable = trust.undoable_stage(image, "disable")
    disabled = image.state == "disabled" and disable is not None and not disable.already_disabled
    state = "available" if disabled else image.state
    return image.model_copy(update={"state": state, "deprecation_time": deprecation})


# AMIs a plan note names by id; the rest are counted.
_LISTED = 20


def left_by_the_policy(inventory: RegionInventory, groups: Sequence[Group]) -> list[str]:
    """AMIs the ledger has a candidate clock on that no family selects any more (a family removed, its
    match narrowed, its tags changed): neither retired further nor rescued, so a disabled one would
    stay disabled unseen."""
    staged = [
        image.image_id
        for image in inventory.images
        if trust.open_item(image) is not None
        and any(trust.undoable_stage(image, stage) for stage in ("deprecate", "disable"))
    ]
    if not staged:
        return []
    members = {member.image_id for group in groups for member in group.members}
    return sorted(image_id for image_id in staged if image_id not in members)


def scheduled_bakes(inventory: RegionInventory, policy: Policy) -> list[ScheduledBake]:
    """The instance each scheduled bake of the region would image now, or why it would refuse.

    A family's scheduled bake runs in its bake regions only (Policy.bake_regions: within the policy's
    regions, as replication targets hold copies, not builds)."""
    bakes: list[ScheduledBake] = []
    for family in policy.families:
        if family.bake is None or family.bake.schedule is None:
            continue
        if inventory.region not in policy.bake_regions(family):
            continue
        from ami_janitor.core import build_instance  # a family that bakes here

        choice = build_instance.choose(family, inventory.region, inventory.build_instances)
        bakes.append(
            ScheduledBake(
                region=inventory.region,
                family=family.name,
                instance_id=choice.instance_id,
                reason=None if choice.refused else choice.reason,
                refusal=choice.reason if choice.refused else None,
            )
        )
    return bakes


_ACTION = attrgetter("action")
_REASONS, _LAST = attrgetter("reasons"), itemgetter(-1)


def summarize(decisions: list[Decision], inventories: Sequence[RegionInventory], skipped: int) -> Summary:
    # Counted in C, and the deregistrations looked for only where there are some: a plan of 50,000.
    counts = Counter(map(_ACTION, decisions))
    freed = [d for d in decisions if d.action == "deregister"] if counts["deregister"] else []
    deregistered = {d.image_id for d in freed}
    candidates = {s for d in freed for s in d.snapshots}
    still_used: set[str] = set()
    if candidates:  # a snapshot shared with an AMI that stays is not freed
        for inventory in inventories:
            for image in inventory.images:
                if image.image_id not in deregistered:
                    still_used.update(s for s in image.snapshot_ids if s in candidates)
    # Only the caps end a decision's reasons so, and only on one they leave a "keep": read in C.
    last_reasons = map(_LAST, map(_REASONS, decisions))
    held = sum(map(str.startswith, last_reasons, repeat("held back by"))) if counts["keep"] else 0
    return Summary(
        images=len(decisions),
        kept=counts["keep"] + counts["rescue"],
        retired=counts["deregister"],
        snapshots_deleted=len(candidates - still_used),
        gib_freed_max=sum(d.size_gib for d in freed),
        waiting=counts["wait"],
        deprecated=counts["deprecate"],
        disabled=counts["disable"],
        rescued=counts["rescue"],
        held_by_cap=held,
        regions_skipped=skipped,
    )


Grouped = dict[str, tuple[list[Group], dict[str, list[str]]]]


def group_regions(inventories: Iterable[RegionInventory], policy: Policy) -> Grouped:
    """The groups (and conflicts) of every usable inventory, by region: built once per run."""
    return {inv.region: build_groups(inv, policy) for inv in inventories if inv.error is None}


def plan(
    inventories: Sequence[RegionInventory], policy: Policy, now: datetime, grouped: Grouped | None = None
) -> Plan:
    """Retirement and Latest of every region. The same inventories, policy and now give the same JSON
    bytes. `grouped` (from group_regions) saves building the groups again."""
    # Planning allocates many short-lived, acyclic objects; the cyclic collector would rescan the
    # whole inventory again and again (a third of the time on 50,000 AMIs) and find nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _plan(inventories, policy, now, grouped)
    finally:
        if collecting:
            gc.enable()


def _plan(
    inventories: Sequence[RegionInventory], policy: Policy, now: datetime, grouped: Grouped | None
) -> Plan:
    ordered = sorted(inventories, key=lambda inv: inv.region)
    usable = [inv for inv in ordered if inv.error is None]
    if grouped is None:
        grouped = group_regions(usable, policy)
    statuses: list[RegionStatus] = []
    decisions: list[Decision] = []
    changes: list[LatestChange] = []
    policy_errors: list[str] = []
    notes: list[str] = []
    unfinished: list[str] = []
    tampered: list[Tampered] = []
    bakes: list[ScheduledBake] = []
    if policy.mode == "paused":
        notes.append("mode is paused: nothing is applied")
    notes.extend(guardrails.family_warnings(policy))
    notes.extend(guardrails.bake_warnings(policy))
    notes.extend(guardrails.inbox_warnings(policy))
    notes.extend(guardrails.brownout_warnings(policy))
    for inventory in ordered:
        if inventory.error is not None:
            statuses.append(RegionStatus(region=inventory.region, status="skipped", error=inventory.error))
            continue
        statuses.append(RegionStatus(region=inventory.region, status="ok"))
        # Snapshots of a deregistration the ledger recorded and a crash interrupted: deleted first,
        # and counted toward the region's max_actions_per_run (those past it wait for later runs).
        finishing = trust.unfinished_within(inventory, policy.defaults.limits.max_actions_per_run)
        orphaned = [s.snapshot_id for s in finishing.snapshots]
        region_decisions, region_changes, region_errors = plan_region(
            inventory, policy, now, grouped[inventory.region], spent=len(orphaned)
        )
        decisions.extend(region_decisions)
        changes.extend(region_changes)
        bakes.extend(scheduled_bakes(inventory, policy))
        policy_errors.extend(region_errors)
        notes.extend(f"{inventory.region}: {note}" for note in inventory.notes)
        if guardrails.families_by_tags_and_name(policy):
            members = {m.image_id for g in grouped[inventory.region][0] for m in g.members}
            notes.extend(guardrails.enrollable_warnings(inventory, policy, members))
        for rule in inventory.recycle_bin_rules:
            notes.append(f"{inventory.region}: {rule}; storage freed there is deferred until the bin expires")
        if orphaned:
            notes.append(
                f"{inventory.region}: snapshots of an unfinished deregistration the ledger recorded: "
                f"{len(orphaned)}, deleted by this run where it applies"
            )
        if finishing.left:
            shown = ", ".join(finishing.left[:_LISTED]) + (
                f" and {len(finishing.left) - _LISTED} more" if len(finishing.left) > _LISTED else ""
            )
            notes.append(
                f"{inventory.region}: unfinished deregistrations whose snapshots wait for a later run "
                f"(max_actions_per_run {policy.defaults.limits.max_actions_per_run}; one whose snapshots "
                f"alone outnumber it waits until it is raised): {shown}"
            )
        unfinished.extend(orphaned)
        left = left_by_the_policy(inventory, grouped[inventory.region][0])
        if left:
            shown = ", ".join(left[:_LISTED]) + (
                f" and {len(left) - _LISTED} more" if len(left) > _LISTED else ""
            )
            notes.append(
                f"{inventory.region}: in no family of the policy, with stages the janitor applied and no "
                f"longer follows (left as they are; `ami-janitor rescue AMI_ID` undoes them): {shown}"
            )
        tampered.extend(trust.tampered(inventory))
        if inventory.ledger is None:
            notes.append(
                f"{inventory.region}: no ledger table: candidate clocks shown as they would start at the "
                "first enforce run"
            )
    skipped = sum(1 for s in statuses if s.status == "skipped")
    return Plan(
        mode=policy.mode,
        generated_at=iso(now) or "",
        regions=statuses,
        decisions=decisions,
        latest=changes,
        bakes=bakes,
        summary=summarize(decisions, usable, skipped).model_copy(update={"tampered": len(tampered)}),
        policy_errors=policy_errors,
        notes=notes,
        unfinished_snapshots=sorted(unfinished),
        tampered=tampered,
    )
