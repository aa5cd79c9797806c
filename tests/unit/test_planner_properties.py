"""Safety properties of the planner over random fleets and policies (hypothesis).

`make test` runs a quick profile; `make fuzz` runs 10,000 examples per property.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ami_janitor.core import trust
from ami_janitor.core.model import (
    Image,
    LaunchPermission,
    LedgerItem,
    LedgerStage,
    LedgerView,
    Plan,
    Reference,
    RegionInventory,
    iso,
)
from ami_janitor.core.planner import ACTING
from ami_janitor.core.policy import (
    CANDIDATE_TAG,
    COPY_GENERATION_TAG_PREFIX,
    PRIOR_DEPRECATION_TAG,
    PRIOR_PERMISSIONS_TAG,
    RETIRED_FROM_TAG,
    SHARED_BY_JANITOR_TAG,
    SOURCE_CREATED_TAG,
    Policy,
    parse_policy,
)
from ami_janitor.core.run_plan import needed_details, plan_run, settle
from builders import NOW

OPT_OUT = "ami-janitor:keep"
OWN_ACCOUNT = "123456789012"


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    stage = st.one_of(st.none(), st.integers(0, 30))
    days = sorted(d for d in [draw(stage), draw(stage), draw(stage)] if d is not None)
    lifecycle: dict[str, Any] = {}
    for key in ("deprecate_after_days", "disable_after_days", "deregister_after_days"):
        lifecycle[key] = days.pop(0) if days and draw(st.booleans()) else None
    family: dict[str, Any] = {
        "name": "app",
        "match": {"tags": {"Project": "App"}, "name": "app-*"},
        "latest": {"tag": "Latest", "ssm_parameter": "/ami/app/{arch}/latest"},
        "share_with": {"accounts": [OWN_ACCOUNT]},
        "public": draw(st.booleans()),
    }
    return parse_policy(
        {
            "regions": ["us-east-1"],
            "defaults": {
                "keep_latest": draw(st.integers(1, 5)),
                "min_age_days": draw(st.integers(0, 60)),
                "launched_within_days": draw(st.integers(0, 30)),
                "allow_shared": draw(st.booleans()),
                "lifecycle": lifecycle,
                "limits": {
                    "max_actions_per_run": draw(st.integers(0, 40)),
                    "max_fraction_per_family": draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
                },
            },
            "families": [family],
        }
    )


@st.composite
def fleets(draw: st.DrawFn) -> RegionInventory:
    count = draw(st.integers(0, 40))
    rng = random.Random(draw(st.integers(0, 2**32)))
    snapshots = [f"snap-{i:04x}" for i in range(count + 3)]
    images: list[Image] = []
    references: list[Reference] = []
    for index in range(count):
        tags = {"Project": "App"}
        if rng.random() < 0.1:
            tags[OPT_OUT] = ""
        if rng.random() < 0.1:
            tags["Latest"] = "true"
        item: LedgerItem | None = None
        if rng.random() < 0.4:
            since = NOW - timedelta(days=rng.randint(0, 40))
            stages = {"deprecate": LedgerStage(at=since)} if rng.random() < 0.5 else {}
            item = LedgerItem(image_id=f"ami-{index:017x}", first_candidate=since, stages=stages)  # type: ignore[arg-type]
        if rng.random() < 0.2:  # a forged clock: says nothing
            tags[CANDIDATE_TAG] = iso(NOW - timedelta(days=rng.randint(0, 400))) or ""
            tags[PRIOR_DEPRECATION_TAG] = "none"
        perms: list[LaunchPermission] = []
        if rng.random() < 0.15:
            perms.append(LaunchPermission(kind="user", value=rng.choice([OWN_ACCOUNT, "999988887777"])))
        public = rng.random() < 0.05
        if public:
            perms.append(LaunchPermission(kind="group", value="all"))
        image_id = f"ami-{index:017x}"
        state = rng.choice(["available"] * 6 + ["disabled", "pending"])
        if state != "available":
            perms, public = [], False  # EC2: only an available AMI has launch permissions
        images.append(
            Image(
                image_id=image_id,
                region="us-east-1",
                name=f"app-{index}",
                architecture=rng.choice(["x86_64", "arm64"]),
                state=state,
                created=NOW - timedelta(days=rng.randint(0, 200), minutes=rng.randint(0, 1000)),
                tags=tags,
                snapshot_ids=tuple(rng.sample(snapshots, rng.randint(0, 2))),
                size_gib=8,
                public=public,
                deregistration_protection=rng.random() < 0.05,
                last_launched=NOW - timedelta(days=rng.randint(0, 60)) if rng.random() < 0.2 else None,
                launch_permissions=tuple(perms),
                ledger=item,
            )
        )
        if rng.random() < 0.15:
            references.append(
                Reference(
                    image_id=image_id, kind="instance", resource_id="i-1", detail="used by instance i-1"
                )
            )
    parameters = {}
    if images and rng.random() < 0.5:
        parameters["/ami/app/x86_64/latest"] = rng.choice(images).image_id
    return RegionInventory(
        region="us-east-1", images=tuple(images), references=tuple(references), parameters=parameters
    )


def protected_reason(image: Image, inventory: RegionInventory, policy: Policy) -> str | None:
    """Why this AMI must never be retired, from the raw inputs (independent of the planner)."""
    rules = policy.rules_for(policy.families[0])
    if any(r.image_id == image.image_id for r in inventory.references):
        return "referenced"
    if image.image_id in inventory.parameters.values() and not any(
        i.architecture == "x86_64" and i.state == "available" for i in inventory.images
    ):
        return "pointer"  # a group with no available AMI: the rotation leaves its parameter as it is
    if OPT_OUT in image.tags:
        return "opted out"
    if image.deregistration_protection:
        return "protected"
    if image.last_launched and NOW - image.last_launched <= timedelta(days=rules.launched_within_days):
        return "launched"
    if not rules.allow_shared:
        if image.public and not policy.families[0].public:
            return "public"
        foreign = [
            p for p in image.launch_permissions or () if p.key not in {f"user:{OWN_ACCOUNT}", "group:all"}
        ]
        if foreign:
            return "foreign share"
    return None


def planned(inventory: RegionInventory, policy: Policy) -> Plan:
    """A run's one pass, as the engine makes it: the inventory holds no details (launch permissions, and
    references only DescribeImageReferences finds) of a third of the AMIs; the plan asks for those it
    needs, reads them (from `inventory`, the truth) and settles."""
    truth = {i.image_id: i for i in inventory.images}
    hidden = {i.image_id for i in inventory.images if int(i.image_id[-3:], 16) % 3 == 0}
    unread = tuple(
        i.model_copy(update={"launch_permissions": None}) if i.image_id in hidden else i
        for i in inventory.images
    )
    seen = tuple(r for r in inventory.references if r.image_id not in hidden)
    blank = inventory._replace(images=unread, references=seen)
    first = plan_run([blank], policy, NOW)
    needed = set(needed_details(first, {blank.region: blank}).get(blank.region, []))
    read = tuple(truth[i.image_id] if i.image_id in needed else i for i in unread)
    found = tuple(r for r in inventory.references if r.image_id not in hidden or r.image_id in needed)
    return settle(first, {blank.region: blank._replace(images=read, references=found)}, policy)


@given(fleets(), policies())
def test_nothing_in_use_is_ever_retired(inventory: RegionInventory, policy: Policy) -> None:
    images = {i.image_id: i for i in inventory.images}
    for decision in planned(inventory, policy).decisions:
        if decision.action in ACTING or decision.action == "wait":
            reason = protected_reason(images[decision.image_id], inventory, policy)
            assert reason is None, (decision, reason)


@given(fleets(), policies())
def test_never_fewer_than_keep_latest_per_group(inventory: RegionInventory, policy: Policy) -> None:
    keep = policy.rules_for(policy.families[0]).keep_latest
    result = planned(inventory, policy)
    by_group: dict[str, list[Image]] = defaultdict(list)
    images = {i.image_id: i for i in inventory.images}
    actions = {d.image_id: d.action for d in result.decisions}
    for image in inventory.images:
        if image.state in ("available", "disabled"):
            by_group[image.architecture].append(image)
    for members in by_group.values():
        newest = sorted(members, key=lambda i: (i.created, i.name, i.image_id), reverse=True)[:keep]
        for image in newest:
            assert actions[image.image_id] in ("keep", "rescue"), images[image.image_id]


@given(fleets(), policies())
def test_caps_hold(inventory: RegionInventory, policy: Policy) -> None:
    limits = policy.defaults.limits
    result = planned(inventory, policy)
    acting = [d for d in result.decisions if d.action in ACTING]
    # Snapshot deletions count too: those of this run's deregistrations that no AMI left uses.
    going = {d.image_id for d in acting if d.action == "deregister"}
    left = {s for i in inventory.images if i.image_id not in going for s in i.snapshot_ids}
    deleted = {s for i in inventory.images if i.image_id in going for s in i.snapshot_ids} - left
    spent = len(acting) + len(deleted) + len(result.unfinished_snapshots)
    assert spent <= limits.max_actions_per_run, (len(acting), sorted(deleted), result.unfinished_snapshots)
    sizes: dict[str, int] = defaultdict(int)
    for decision in result.decisions:
        sizes[decision.architecture] += 1
    moved: dict[str, int] = defaultdict(int)
    for decision in acting:
        moved[decision.architecture] += 1
    for arch, count in moved.items():
        assert count <= math.floor(limits.max_fraction_per_family * sizes[arch])


@given(fleets(), policies(), st.randoms(use_true_random=False))
def test_plan_is_deterministic(inventory: RegionInventory, policy: Policy, rng: random.Random) -> None:
    shuffled = list(inventory.images)
    rng.shuffle(shuffled)
    again = inventory._replace(images=tuple(shuffled))
    assert planned(inventory, policy).to_json() == planned(again, policy).to_json()


@given(fleets(), policies())
def test_every_member_appears_once_and_candidates_in_use_are_rescued(
    inventory: RegionInventory, policy: Policy
) -> None:
    result: Plan = planned(inventory, policy)
    ids = [d.image_id for d in result.decisions]
    assert sorted(ids) == sorted(i.image_id for i in inventory.images)
    images = {i.image_id: i for i in inventory.images}
    for decision in result.decisions:
        image = images[decision.image_id]
        reason = protected_reason(image, inventory, policy)
        if image.ledger is not None and reason is not None:
            assert decision.action == "rescue", (decision, reason)


def enabled_by_rescue(image: Image, actions: dict[str, str]) -> bool:
    stage = image.ledger.stages.get("disable") if image.ledger is not None else None
    return actions[image.image_id] == "rescue" and stage is not None and not stage.already_disabled


@given(fleets(), policies())
def test_latest_points_at_the_newest_available(inventory: RegionInventory, policy: Policy) -> None:
    result = planned(inventory, policy)
    actions = {d.image_id: d.action for d in result.decisions}
    for change in result.latest:
        if change.to is None:
            continue
        # A rescue (of an AMI the janitor disabled) comes before Latest moves: it may be the newest.
        members = [
            i
            for i in inventory.images
            if i.architecture == change.architecture
            and (i.state == "available" or (i.state == "disabled" and enabled_by_rescue(i, actions)))
        ]
        newest = max(members, key=lambda i: (i.created, i.name, i.image_id))
        assert change.to == newest.image_id
        assert actions[change.to] in ("keep", "rescue")


# The janitor's own tag keys (not the opt-out, which keeps), forged with any suffix and value.
JANITOR_KEYS = (
    CANDIDATE_TAG,
    PRIOR_DEPRECATION_TAG,
    PRIOR_PERMISSIONS_TAG,
    SHARED_BY_JANITOR_TAG,
    RETIRED_FROM_TAG,
    SOURCE_CREATED_TAG,
    COPY_GENERATION_TAG_PREFIX.rstrip(":"),
)
# A suffix is any text, or digits of any script (a part number is `:2`, `:3`...).
suffixes = st.text(max_size=3) | st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=2)
forged_tags = st.lists(
    st.tuples(st.integers(0, 39), st.sampled_from(JANITOR_KEYS), suffixes, st.text(max_size=40)),
    max_size=6,
)


@given(fleets(), policies(), forged_tags, st.sampled_from([None, NOW - timedelta(days=1)]))
def test_forged_janitor_tags_neither_stop_the_plan_nor_make_it_act(
    inventory: RegionInventory,
    policy: Policy,
    forged: list[tuple[int, str, str, str]],
    adopted: datetime | None,
) -> None:
    """Anyone may write any key and value: the plan is still made, and acts on no AMI, and at no stage,
    that it would not have acted on without them but for the caps; whether the region's tags were
    adopted (`tampered` then reads them) or are about to be (adoption reads them), as the engine reads
    a region."""
    items = {i.image_id: i.ledger for i in inventory.images if i.ledger is not None}
    inventory = inventory._replace(
        ledger=LedgerView(table="ami-janitor-ledger", items=items, adopted=adopted)
    )
    images = list(inventory.images)
    for index, base, suffix, value in forged if images else []:
        image = images[index % len(images)]
        key = f"{base}:{suffix}" if suffix else base
        images[index % len(images)] = image.model_copy(update={"tags": {**image.tags, key: value}})
    before = planned(trust.adopted_view(inventory, policy, NOW), policy)
    after = planned(trust.adopted_view(inventory._replace(images=tuple(images)), policy, NOW), policy)
    acting = {(d.image_id, d.action) for d in before.decisions if d.action in ACTING}
    # A forged tag may change which of the due AMIs the caps let through (adopted, a forged clock keeps
    # its AMI as it is, and its place goes to the next): only one the caps held back, whose stage is due
    # by the ledger's clock.
    held = {d.image_id for d in before.decisions if any(r.startswith("held back by") for r in d.reasons)}
    for decision in after.decisions:
        if decision.action in ACTING and (decision.image_id, decision.action) not in acting:
            assert decision.image_id in held, decision
