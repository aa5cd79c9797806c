"""Properties of plan + apply over random fleets (hypothesis), against the in-memory EC2 of fake_ec2.py.

Each example builds a fleet (shared snapshots, references, opt-outs, protection, foreign and own shares,
owner deprecation times, unmanaged AMIs, unfinished deletions), then plans and applies it as a scheduled
run does: inventory, plan, load the launch permissions of the candidates, plan again, apply. Multi-step
examples advance `now` by whole days between runs; some inject throttles, lost answers and crashes.

`now` lies a day ahead of the wall clock, so `deprecate_at(now)` depends on `now` alone.
`make test` runs a quick profile; `make fuzz` runs 10,000 examples per property.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError
from hypothesis import given
from hypothesis import strategies as st

from ami_janitor import engine
from ami_janitor.aws import slicer
from ami_janitor.aws.clients import READ_WORKERS, RegionClients
from ami_janitor.aws.executor import ActionResult, ApplyResult, RunDue, apply_plan, deprecate_at, rescue_image
from ami_janitor.core import trust
from ami_janitor.core.model import (
    Decision,
    LedgerItem,
    LedgerSnapshot,
    LedgerStage,
    Plan,
    Reference,
    RegionInventory,
    iso,
)
from ami_janitor.core.planner import ACTING, build_groups, latest_target
from ami_janitor.core.policy import (
    CANDIDATE_TAG,
    PRIOR_DEPRECATION_TAG,
    PRIOR_PERMISSIONS_TAG,
    RETIRED_FROM_TAG,
    SHARED_BY_JANITOR_TAG,
    SOURCE_CREATED_TAG,
    SOURCE_IMAGE_TAG,
    SOURCE_REGION_TAG,
    Policy,
    parse_policy,
)
from ami_janitor.core.run_plan import needed_details, plan_run, settle
from ami_janitor.core.sharing import desired_grants, rescue_grants
from fake_aws import region_clients
from fake_ec2 import MUTATING, Call, Crash, FakeEC2, FakeImage, ImageView

REGION = "us-east-1"
BASE = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(days=1)
OPT_OUT = "ami-janitor:keep"
LATEST = "Latest"
OWN_ACCOUNT = "123456789012"
PARTNERS = [f"2000000000{n:02d}" for n in range(20)]  # in share_with: AMIs shared with them retire
FOREIGN = "999988887777"  # not in share_with: an AMI shared with it is kept unless allow_shared
ORG = "arn:aws:organizations::123456789012:organization/o-abc123def4"
STAGE_DAYS = ("deprecate_after_days", "disable_after_days", "deregister_after_days")


# ---- policies and fleets --------------------------------------------------------------------------


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    stage = st.one_of(st.none(), st.integers(0, 30))
    days = sorted(d for d in [draw(stage), draw(stage), draw(stage)] if d is not None)
    lifecycle: dict[str, Any] = {}
    for key in STAGE_DAYS:
        lifecycle[key] = days.pop(0) if days and draw(st.booleans()) else None
    if draw(st.booleans()):
        limits = {"max_actions_per_run": 1000, "max_fraction_per_family": 1.0}
    else:
        limits = {
            "max_actions_per_run": draw(st.integers(0, 40)),
            "max_fraction_per_family": draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        }
    family: dict[str, Any] = {
        "name": "app",
        "match": {"tags": {"Project": "App"}, "name": "app-*"},
        "latest": {"tag": LATEST, "ssm_parameter": "/ami/app/{arch}/latest"},
        "share_with": {"accounts": [OWN_ACCOUNT, *PARTNERS], "organizations": [ORG]},
        "public": draw(st.booleans()),
    }
    return parse_policy(
        {
            "mode": "enforce",
            "regions": [REGION],
            "defaults": {
                "keep_latest": draw(st.integers(1, 5)),
                "min_age_days": draw(st.integers(0, 60)),
                "launched_within_days": draw(st.integers(0, 30)),
                "allow_shared": draw(st.booleans()),
                "lifecycle": lifecycle,
                "limits": limits,
            },
            "families": [family],
        }
    )


@dataclass(frozen=True)
class Fleet:
    """How to build one fleet; `clean`: no janitor state yet (the janitor has never run on it)."""

    count: int
    seed: int
    clean: bool
    results_rate: float

    def build(self, *, fail_rate: float = 0.0, crash_rate: float = 0.0) -> FakeEC2:
        return build_fleet(self, fail_rate, crash_rate)


def fleets(*, clean: bool | None = None) -> st.SearchStrategy[Fleet]:
    return st.builds(
        Fleet,
        count=st.integers(0, 30),
        seed=st.integers(0, 2**32),
        clean=st.booleans() if clean is None else st.just(clean),
        results_rate=st.sampled_from([0.0, 0.5, 1.0]),
    )


def _minute(value: datetime) -> datetime:
    return value.replace(second=0, microsecond=0)


def _permissions(rng: random.Random) -> set[str]:
    granted: set[str] = set()
    if rng.random() < 0.3:
        granted.add(f"user:{OWN_ACCOUNT}")
    if rng.random() < 0.15:
        granted.update(f"user:{p}" for p in rng.sample(PARTNERS, rng.randint(1, len(PARTNERS))))
    if rng.random() < 0.1:
        granted.add(f"org:{ORG}")
    if rng.random() < 0.08:
        granted.add(f"user:{FOREIGN}")
    if rng.random() < 0.05:
        granted.add("group:all")
    return granted


def build_fleet(spec: Fleet, fail_rate: float, crash_rate: float) -> FakeEC2:
    rng = random.Random(spec.seed)
    fake = FakeEC2(
        REGION,
        seed=rng.randrange(2**32),
        results_rate=spec.results_rate,
        fail_rate=fail_rate,
        crash_rate=crash_rate,
    )
    pool = [f"snap-{n:017x}" for n in range(spec.count + 4)]
    for snapshot_id in pool:  # the unused ones are snapshots the janitor must never delete
        fake.add_snapshot(snapshot_id)
    for index in range(spec.count):
        image_id = f"ami-{index:017x}"
        created = BASE - timedelta(days=rng.randint(0, 200), minutes=rng.randint(0, 1000))
        tags = {"Project": "App" if rng.random() < 0.9 else "Other"}
        if rng.random() < 0.08:
            tags[OPT_OUT] = ""
        if rng.random() < 0.08:
            tags[LATEST] = "true"
        if index and rng.random() < 0.05:
            source = rng.randrange(index)
            tags[SOURCE_IMAGE_TAG] = f"ami-{source:017x}"
            tags[SOURCE_REGION_TAG] = rng.choice([REGION, "eu-west-1"])
            tags[SOURCE_CREATED_TAG] = iso(fake.images[f"ami-{source:017x}"].created) or ""
        state = rng.choice(["available"] * 16 + ["disabled"] * 3 + ["pending"])
        instance_store = rng.random() < 0.05
        image = FakeImage(
            image_id=image_id,
            name=f"app-{index}",
            created=created,
            architecture=rng.choice(["x86_64", "arm64"]),
            state=state,
            tags=tags,
            snapshot_ids=() if instance_store else tuple(rng.sample(pool, rng.randint(1, 3))),
            root_device_type="instance-store" if instance_store else "ebs",
            deprecation_time=_minute(BASE + timedelta(minutes=rng.randint(-90 * 1440, 120 * 1440)))
            if rng.random() < 0.15
            else None,
            protected=rng.random() < 0.05,
            last_launched=BASE - timedelta(days=rng.randint(0, 60)) if rng.random() < 0.2 else None,
            permissions=_permissions(rng) if state == "available" else set(),
        )
        fake.add_image(image)
        if not spec.clean and rng.random() < 0.35:
            _janitor_state(rng, image, fake)
        if rng.random() < 0.12:
            fake.references.append(_reference(image_id, len(fake.references)))
    if fake.images and rng.random() < 0.5:
        fake.parameters["/ami/app/x86_64/latest"] = rng.choice(sorted(fake.images))
    fake.ledger.adopted = BASE - timedelta(days=400)
    if not spec.clean:
        # Unfinished deletions: a deregistration the ledger recorded stopped before its snapshots.
        used = sorted(fake.used_snapshots())
        for n in range(rng.randint(0, 2)):
            gone = f"ami-gone{n:012x}"
            snapshots = [f"snap-orphan{n:09x}"]
            if used and rng.random() < 0.3:  # recorded, but another AMI uses it now: never deleted
                snapshots.append(rng.choice(used))
            for snapshot_id in snapshots:
                fake.add_snapshot(snapshot_id, {RETIRED_FROM_TAG: gone})
            fake.ledger.items[gone] = LedgerItem(
                image_id=gone,
                first_candidate=BASE - timedelta(days=60),
                stages={"deregister": LedgerStage(at=BASE - timedelta(days=1))},
                snapshots=tuple(LedgerSnapshot(snapshot_id=s, image_id=gone) for s in snapshots),
            )
        # Marks the ledger does not back (a forgery, or an older janitor's): never a reason to delete.
        if used and rng.random() < 0.3:
            fake.add_snapshot(rng.choice(used), {RETIRED_FROM_TAG: "ami-gone00000000ff"})
        fake.add_snapshot("snap-forged000000", {RETIRED_FROM_TAG: "ami-gone00000000fe"})
    return fake


def _janitor_state(rng: random.Random, image: FakeImage, fake: FakeEC2) -> None:
    """What earlier runs left: the candidate clock and the stages they applied, in the ledger (and the
    mirror tags for people, which no decision reads)."""
    since = BASE - timedelta(days=rng.randint(0, 40))
    image.tags[CANDIDATE_TAG] = iso(since) or ""
    stages: dict[str, LedgerStage] = {}
    if rng.random() < 0.5:
        image.tags[PRIOR_DEPRECATION_TAG] = iso(image.deprecation_time) or "none"
        stages["deprecate"] = LedgerStage(at=since, prior_deprecation=image.deprecation_time, confirmed=since)
        janitor_time = _minute(since + timedelta(minutes=1))
        if image.deprecation_time is None or image.deprecation_time > janitor_time:
            image.deprecation_time = janitor_time
        if image.state == "disabled":
            prior = (f"user:{OWN_ACCOUNT}",) if rng.random() < 0.5 else ()
            image.tags[PRIOR_PERMISSIONS_TAG] = ",".join(prior)
            stages["disable"] = LedgerStage(at=since, prior_launch_permissions=prior, confirmed=since)
    fake.ledger.items[image.image_id] = LedgerItem(
        image_id=image.image_id,
        first_candidate=since,
        stages=stages,  # type: ignore[arg-type]
    )


def janitor_started(fake: FakeEC2, image_id: str) -> bool:
    """The ledger has a clock running on the AMI (what makes keeping it a rescue)."""
    item = fake.ledger.items.get(image_id)
    return item is not None and item.is_open


def _reference(image_id: str, n: int) -> Reference:
    return Reference(
        image_id=image_id, kind="instance", resource_id=f"i-{n:08x}", detail=f"instance i-{n:08x}"
    )


# ---- running the janitor as a scheduled run does --------------------------------------------------


@dataclass
class Round:
    now: datetime
    plan: Plan
    inventory: RegionInventory
    before: dict[str, ImageView]
    calls: list[Call]
    applied: ApplyResult | None  # None: the run crashed
    decisions: dict[str, Decision] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.decisions = {d.image_id: d for d in self.plan.decisions}


def clients_for(fake: FakeEC2) -> RegionClients:
    return region_clients(fake, read_workers=READ_WORKERS)


def slice_budgets() -> st.SearchStrategy[float | None]:
    """How a run applies its due stages: here on the plan's view (None), or in slices of that many
    seconds of paced calls (0.2: one stage of one AMI each), each reading its AMIs again."""
    return st.sampled_from([None, 0.2, 0.6, 300.0])


def sliced_runner(fake: FakeEC2, policy: Policy, plan: Plan, now: datetime, budget: float) -> RunDue:
    """engine.run's slices, run in this process one after the other (as `ami-janitor apply`)."""

    def run_due(region: str, due: list[Decision]) -> list[ActionResult]:
        work = engine.cut_due(plan, policy, region, due, now, budget)
        return [
            r
            for part in work
            for r in slicer.run_slice(clients_for(fake), fake.ledger, policy, part, now).results
        ]

    return run_due


def plan_region(
    fake: FakeEC2, policy: Policy, now: datetime, all_permissions: bool
) -> tuple[Plan, RegionInventory]:
    """engine.build_plan: inventory, one plan, the launch permissions it asks for, the plan settled."""
    inventory = fake.describe(permissions=all_permissions)
    first = plan_run([inventory], policy, now)
    needed = needed_details(first, {fake.region: inventory}).get(fake.region)
    if not needed:
        return first, inventory
    inventory = fake.describe(permissions=True if all_permissions else needed)
    return settle(first, {fake.region: inventory}, policy), inventory


def run(
    fake: FakeEC2,
    policy: Policy,
    now: datetime,
    grants: bool,
    all_permissions: bool = False,
    sliced: float | None = None,
) -> Round:
    fake.clock = now
    before = fake.views()
    start = len(fake.calls)
    result, inventory = plan_region(fake, policy, now, all_permissions)
    try:
        applied: ApplyResult | None = apply_plan(
            result,
            {fake.region: inventory},
            lambda _: clients_for(fake),
            now,
            ledger_for=lambda _: fake.ledger,
            rescue_grants=(lambda image: rescue_grants(policy, image)) if grants else None,
            run_due=sliced_runner(fake, policy, result, now, sliced) if sliced is not None else None,
        )
    except Crash:
        applied = None
    return Round(now, result, inventory, before, fake.calls[start:], applied)


def touched(calls: Iterable[Call]) -> set[str]:
    """Every AMI and snapshot a mutating call named."""
    ids: set[str] = set()
    for call in calls:
        if call.operation == "describe_image_attribute":
            continue
        for key in ("ImageId", "SnapshotId"):
            if key in call.params:
                ids.add(call.params[key])
        ids.update(call.params.get("Resources") or ())
    return ids


def stage_days(policy: Policy) -> dict[str, int | None]:
    return dict(policy.defaults.lifecycle.stage_days())


def latest_targets(fake: FakeEC2, policy: Policy, now: datetime) -> dict[str, str | None]:
    """Architecture -> the Latest target of that group (None where the group has none)."""
    groups, _ = build_groups(fake.describe(), policy)
    targets: dict[str, str | None] = {}
    for group in groups:
        target = latest_target(group, now)
        targets[group.architecture] = target.image_id if target else None
    return targets


def kept_by_inputs(
    image: FakeImage, fake: FakeEC2, policy: Policy, now: datetime, targets: dict[str, str | None]
) -> str | None:
    """Why a managed AMI must never be retired, read from the fleet alone (independent of the planner)."""
    rules = policy.defaults
    family = policy.families[0]
    if any(r.image_id == image.image_id for r in fake.references):
        return "referenced"
    # A run moves the Latest tag and pointer to its group's newest available AMI before any stage: that
    # AMI is kept; the old holders are not, unless the group has none (the pointer then stays put).
    if image.image_id in targets.values():
        return "Latest"
    for name, value in fake.parameters.items():
        # /ami/app/<arch>/latest: the rotation of that architecture's group rewrites it, if it can.
        if value == image.image_id and targets.get(name.split("/")[3]) is None:
            return "SSM pointer"
    if OPT_OUT in image.tags:
        return "opted out"
    if image.protected:
        return "deregistration protection"
    if image.last_launched and now - image.last_launched <= timedelta(days=rules.launched_within_days):
        return "launched recently"
    if not rules.allow_shared:
        if image.public and not family.public:
            return "public"
        allowed = set(family.share_with.grants()) | ({"group:all"} if family.public else set())
        if image.permissions - allowed:
            return "shared outside share_with"
    return None


def steps() -> st.SearchStrategy[list[int]]:
    """Days between runs (0: the same day again)."""
    return st.lists(st.integers(0, 15), min_size=1, max_size=4)


# ---- 1. no snapshot in use is ever deleted --------------------------------------------------------


@given(fleets(), policies(), steps(), st.booleans(), st.booleans(), slice_budgets())
def test_no_snapshot_in_use_is_ever_deleted(
    fleet: Fleet, policy: Policy, days: list[int], faults: bool, grants: bool, sliced: float | None
) -> None:
    fake = fleet.build(fail_rate=0.05 if faults else 0.0, crash_rate=0.01 if faults else 0.0)
    now = BASE
    for step in days:
        now += timedelta(days=step)
        users_before = {
            s: {i.image_id for i in fake.images.values() if s in i.snapshot_ids} for s in fake.snapshots
        }
        # Snapshots the ledger recorded for a deregistration it has not confirmed, whose AMI is gone.
        recorded = {
            snapshot.snapshot_id
            for item in fake.ledger.items.values()
            if "deregister" in item.stages and item.deregistered is None and item.closed is None
            if item.image_id not in fake.images
            for snapshot in item.snapshots
        }
        deleted_before = len(fake.deleted_snapshots)
        round_ = run(fake, policy, now, grants, sliced=sliced)
        deleted = fake.deleted_snapshots[deleted_before:]
        remaining = set(fake.images)
        # Every snapshot of every AMI that still exists still exists.
        missing = fake.used_snapshots() - set(fake.snapshots)
        assert not missing, missing
        # The inventory names every AMI: the executor never even asks to delete a snapshot in use.
        assert not fake.refused_in_use, fake.refused_in_use
        # A deleted snapshot belonged to an AMI this run deregistered, or the ledger recorded it for one
        # an earlier run deregistered, and no AMI that remains uses it: a retired-from tag alone (an
        # earlier run's mark, or anyone's forgery) never deletes one.
        for snapshot_id in deleted:
            users = users_before[snapshot_id]
            assert users or snapshot_id in recorded, (snapshot_id, users)
            assert not users & remaining, (snapshot_id, users, remaining)
        if round_.applied is not None:
            reported = round_.applied.snapshots_deleted
            assert len(reported) == len(set(reported))
            assert set(reported) <= set(deleted)
            if not faults:
                assert set(reported) == set(deleted)
        # The recorded ones a run deletes are those its plan lists, within its max_actions_per_run.
        finishing = set(round_.plan.unfinished_snapshots)
        assert len(finishing) <= policy.defaults.limits.max_actions_per_run
        if not faults:
            # ... and no such snapshot is left behind: nothing else is ever deleted.
            gone = set(users_before) - set(fake.snapshots)
            for snapshot_id, users in users_before.items():
                ours = users or (snapshot_id in recorded and snapshot_id in finishing)
                freed = ours and not users & remaining
                assert (snapshot_id in gone) == bool(freed), (snapshot_id, users, remaining)


# ---- 2. nothing kept is touched -------------------------------------------------------------------


@given(fleets(), policies(), st.booleans(), st.booleans(), st.booleans(), slice_budgets())
def test_nothing_kept_is_touched(
    fleet: Fleet, policy: Policy, faults: bool, grants: bool, all_permissions: bool, sliced: float | None
) -> None:
    fake = fleet.build(fail_rate=0.05 if faults else 0.0, crash_rate=0.01 if faults else 0.0)
    snapshot_tags = {s: dict(tags) for s, tags in fake.snapshots.items()}
    fleet_before = copy.deepcopy(fake.images)
    ledger_before = {i: janitor_started(fake, i) for i in fake.images}
    targets = latest_targets(fake, policy, BASE)  # as the run judges them, before it changes anything
    round_ = run(fake, policy, BASE, grants, all_permissions, sliced)
    named = touched(round_.calls)
    for image_id, before in round_.before.items():
        decision = round_.decisions.get(image_id)
        image = fleet_before[image_id]
        reason = kept_by_inputs(image, fake, policy, BASE, targets) if decision else None
        untouched_by_janitor = not ledger_before.get(image_id, False)
        if reason and untouched_by_janitor and image.state in ("available", "disabled"):
            assert decision is not None and decision.action == "keep", (image_id, reason, decision)
        if decision is None or decision.action == "keep":
            # Unmanaged or kept: byte-identical, and no call named it or its snapshots' marks.
            assert image_id not in named, (image_id, decision)
            assert fake.images[image_id].view() == before, (image_id, decision)
            for snapshot_id in image.snapshot_ids:
                assert fake.snapshots.get(snapshot_id) == snapshot_tags[snapshot_id], snapshot_id


# ---- 3. rescue undoes every stage -----------------------------------------------------------------


def assert_restored(image: FakeImage, original: FakeImage, now: datetime, grants: set[str]) -> None:
    # An AMI its owner had disabled stays disabled: the janitor undoes only what it did.
    assert image.state == original.state, (image, original)
    assert image.tags == original.tags, (image.tags, original.tags)
    # What the AMI had before the janitor disabled it; a public AMI the janitor disabled is made public
    # again only where the family allows it.
    public = {"group:all"} - grants
    assert original.permissions - public <= image.permissions <= original.permissions, (image, original)
    prior = original.deprecation_time
    if prior is None or prior > deprecate_at(now):
        assert image.deprecation_time == prior, (image.deprecation_time, prior)
    else:  # the owner's time has passed: it stays deprecated, as it would have been
        assert image.deprecation_time is not None
        assert image.deprecation_time <= max(prior, deprecate_at(now))


@given(
    fleets(clean=True),
    policies(),
    st.lists(st.integers(0, 15), min_size=1, max_size=6),
    st.integers(0, 15),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**32),
)
def test_rescue_undoes_every_stage(
    fleet: Fleet, policy: Policy, days: list[int], last: int, faults: bool, grants: bool, seed: int
) -> None:
    rng = random.Random(seed)
    fake = fleet.build()
    originals = copy.deepcopy(fake.images)
    extra = desired_grants(policy.families[0]) if grants else set()
    now = BASE
    kept = {r.resource_id for r in fake.references}  # the fleet's own references stay
    for step in days:
        now += timedelta(days=step)
        # References come and go between runs: AMIs are rescued (maybe half way), and retired again.
        fake.references = [r for r in fake.references if r.resource_id in kept or rng.random() < 0.5]
        for image_id in sorted(fake.images):
            if janitor_started(fake, image_id) and rng.random() < 0.3:
                fake.references.append(_reference(image_id, len(fake.references) + 100))
        if faults:  # rescues come first in a run: the first calls are theirs
            kinds = ["throttle", "lost", "retried", "crash"]
            fake.faults = {fake.mutating_calls + rng.randrange(8): rng.choice(kinds) for _ in range(2)}
        run(fake, policy, now, grants)
    # The last run: no more faults; some AMIs the janitor is retiring are in use again.
    fake.faults = {}
    now += timedelta(days=last)
    retiring = sorted(i for i in fake.images if janitor_started(fake, i))
    chosen = [i for i in retiring if rng.random() < 0.8]
    for image_id in chosen:
        fake.references.append(_reference(image_id, len(fake.references) + 1000))
    round_ = run(fake, policy, now, grants)
    assert round_.applied is not None and round_.applied.failed == 0, round_.applied
    for image_id in chosen:
        assert round_.decisions[image_id].action == "rescue", round_.decisions[image_id]
        assert_restored(fake.images[image_id], originals[image_id], now, extra)
    # Rescued means done: the next run at the same time leaves them alone.
    again = run(fake, policy, now, grants)
    assert not touched(again.calls) & set(chosen), [c for c in again.calls if c.image_id in chosen]
    # By hand (`ami-janitor rescue AMI_ID`): the same end state, from DescribeImages alone.
    inventory = {i.image_id: i for i in fake.describe().images}
    for image_id in sorted(i for i in fake.images if janitor_started(fake, i)):
        image = inventory[image_id].model_copy(update={"ledger": None})  # as DescribeImages gives it
        results = rescue_image(clients_for(fake), fake.ledger, image, now, shared=extra)
        assert [r.status for r in results] == ["ok"], results
        assert not janitor_started(fake, image_id)
        assert_restored(fake.images[image_id], originals[image_id], now, extra)


# ---- 4. convergence -------------------------------------------------------------------------------


def settling(first: Round) -> set[str]:
    """AMIs of the groups in which the first run rescued an AMI. The plan judges a group on its state
    before this run's rescues; a rescue that enables an AMI or takes back its deprecation changes that
    state (which AMI is Latest, which originals an encrypted copy stands in for, the keep-N ranks), so
    the next run may decide the group's other AMIs once more. A reported design question, not a choice."""
    groups = {(d.family, d.architecture) for d in first.plan.decisions if d.action == "rescue"}
    members = {d.image_id for d in first.plan.decisions if (d.family, d.architecture) in groups}
    # So may an AMI those groups' pointers held (a pointer may hold another group's AMI): the rotation
    # after the rescue moves the pointer off it, and only the next run sees it free.
    parameters = {
        f"value of SSM parameter {c.ssm_parameter}"
        for c in first.plan.latest
        if (c.family, c.architecture) in groups and c.ssm_parameter
    }
    pointed = {d.image_id for d in first.plan.decisions if parameters.intersection(d.reasons)}
    return members | pointed


@given(fleets(), policies(), st.booleans(), st.booleans(), slice_budgets())
def test_a_second_run_changes_nothing(
    fleet: Fleet, policy: Policy, grants: bool, all_permissions: bool, sliced: float | None
) -> None:
    fake = fleet.build()
    first = run(fake, policy, BASE, grants, all_permissions, sliced)
    assert first.applied is not None
    held = {
        d.image_id for d in first.plan.decisions if d.reasons and d.reasons[-1].startswith("held back by")
    }
    # So are the unfinished deregistrations whose snapshots did not fit in the first run's cap: their
    # AMIs are gone, their snapshots those the ledger recorded.
    waiting = {
        item.image_id: [s.snapshot_id for s in item.snapshots]
        for item in trust.unfinished_deregistrations(first.inventory)
        if item.image_id
        in trust.unfinished_within(first.inventory, policy.defaults.limits.max_actions_per_run).left
    }
    held |= set(waiting)
    second = run(fake, policy, BASE, grants, all_permissions, sliced)
    moved = {i for i in touched(second.calls) if i.startswith("ami-")}
    # Only what a cap held back the first time moves now (caps are per run). On a fleet the janitor
    # has never seen, the first run rescues nothing, so nothing settles.
    assert moved <= held | settling(first), sorted(moved - held - settling(first))
    snapshots = {s for i in moved for s in (waiting[i] if i in waiting else first.before[i].snapshot_ids)}
    assert {i for i in touched(second.calls) if not i.startswith("ami-")} <= snapshots
    # Repeated runs reach a fixpoint: nothing left to do at this time.
    for _ in range(len(fake.images) + 1):
        again = run(fake, policy, BASE, grants, all_permissions, sliced)
        if not [c for c in again.calls if c.operation in MUTATING]:
            return
    raise AssertionError(f"no fixpoint after {len(fake.images) + 1} runs at the same time")


# ---- 5. staged order ------------------------------------------------------------------------------


def check_stage_call(call: Call, decision: Decision | None, item: LedgerItem | None, policy: Policy) -> None:
    """A stage's call: the stage was due, and every earlier configured stage had been applied."""
    days = stage_days(policy)
    stage = {
        "enable_image_deprecation": "deprecate",
        "disable_image": "disable",
        "deregister_image": "deregister",
    }[call.operation]
    assert decision is not None and decision.action in ACTING and stage in decision.stages, (call, decision)
    image = call.before
    assert image is not None, call
    assert days[stage] is not None, f"{stage} is not configured"
    assert item is not None and item.first_candidate is not None, "a stage ran before its clock was recorded"
    assert stage in item.stages, "a stage ran before the ledger recorded it"
    assert item.first_candidate + timedelta(days=days[stage]) <= call.clock, (stage, item, call.clock)
    deprecated = image.deprecation_time is not None
    if stage == "disable" and days["deprecate"] is not None:
        assert deprecated, ("not deprecated first", image)
    if stage == "deregister" and days["disable"] is not None:
        assert image.state == "disabled", ("not disabled first", image)
    # A disabled AMI (by its owner too) has settled the earlier stages: it launches no more.
    if stage == "deregister" and days["deprecate"] is not None:
        assert deprecated or image.state == "disabled", ("not deprecated first", image)


# A stage's call -> the stage before it that EC2 shows in the call's view of the AMI.
_SHOWN_BEFORE = {"disable_image": "enable_image_deprecation", "deregister_image": "disable_image"}
# Runs are days apart; a run's calls spread over its simulated seconds.
_WITHIN_A_RUN = timedelta(hours=1)


def check_brownout(call: Call, last_call: dict[tuple[str, str], datetime], policy: Policy) -> None:
    """A stage waits its configured gap after the janitor's call that made the stage before it take
    effect (the last such call before it: a failed first try does not count), never less: the brownout
    before a disable or a deregistration is what lets an AMI's users notice."""
    earlier = _SHOWN_BEFORE.get(call.operation)
    image = call.before
    if earlier is None or image is None:
        return
    shown = (
        image.deprecation_time is not None
        if earlier == "enable_image_deprecation"
        else image.state == "disabled"
    )
    made = last_call.get((image.image_id, earlier))
    days = stage_days(policy)
    stage, previous = {
        "disable_image": ("disable", "deprecate"),
        "deregister_image": ("deregister", "disable"),
    }[call.operation]
    if not shown or made is None or days[stage] is None or days[previous] is None:
        return  # the owner's change, or a stage the policy skips: no janitor call to count from
    gap = timedelta(days=days[stage] - days[previous])  # type: ignore[operator]
    assert made + gap <= call.clock + _WITHIN_A_RUN, (call.operation, image.image_id, made, gap, call.clock)


@given(
    fleets(),
    policies(),
    st.lists(st.integers(0, 15), min_size=2, max_size=5),
    st.booleans(),
    st.booleans(),
    slice_budgets(),
)
def test_stages_run_in_order_and_only_when_due(
    fleet: Fleet, policy: Policy, days: list[int], faults: bool, grants: bool, sliced: float | None
) -> None:
    fake = fleet.build(fail_rate=0.05 if faults else 0.0, crash_rate=0.01 if faults else 0.0)
    now = BASE
    last_call: dict[tuple[str, str], datetime] = {}
    for step in days:
        now += timedelta(days=step)
        round_ = run(fake, policy, now, grants, sliced=sliced)
        for call in round_.calls:
            if call.retry:
                continue  # the same call again: it meets the state its first attempt set
            decision = round_.decisions.get(call.image_id or "")
            rescue = decision is not None and decision.action == "rescue"
            if call.operation in ("disable_image", "deregister_image") or (
                call.operation == "enable_image_deprecation" and not rescue
            ):
                check_stage_call(call, decision, fake.ledger.items.get(call.image_id or ""), policy)
                check_brownout(call, last_call, policy)
            if call.image_id is not None and not rescue:
                last_call[(call.image_id, call.operation)] = call.clock


# ---- 6. forged janitor tags ------------------------------------------------------------------------


def forge(rng: random.Random, fake: FakeEC2, now: datetime) -> None:
    """What a principal who may only tag writes: every janitor record, backdated and widened."""
    ids = sorted(fake.images)
    for image_id in rng.sample(ids, k=min(len(ids), rng.randint(0, 6))):
        tags = fake.images[image_id].tags
        tags[CANDIDATE_TAG] = iso(now - timedelta(days=rng.randint(0, 400))) or ""
        tags[PRIOR_DEPRECATION_TAG] = rng.choice(["none", iso(now + timedelta(days=900)) or ""])
        tags[PRIOR_PERMISSIONS_TAG] = f"group:all,user:{FOREIGN}"
        tags[SHARED_BY_JANITOR_TAG] = f"user:{FOREIGN},user:{PARTNERS[0]}"
        if rng.random() < 0.5 and len(ids) > 1:
            source = rng.choice(ids)
            tags[SOURCE_IMAGE_TAG] = source
            tags[SOURCE_REGION_TAG] = REGION
            tags[SOURCE_CREATED_TAG] = iso(now - timedelta(days=999)) or ""
    snapshots = sorted(fake.snapshots)
    for snapshot_id in rng.sample(snapshots, k=min(len(snapshots), rng.randint(0, 4))):
        fake.snapshots[snapshot_id][RETIRED_FROM_TAG] = rng.choice([*ids, "ami-gone00000000aa"])


@given(fleets(), policies(), steps(), st.booleans(), st.booleans(), st.integers(0, 2**32))
def test_forged_janitor_tags_make_no_stage_sooner_delete_nothing_and_grant_nothing(
    fleet: Fleet, policy: Policy, days: list[int], adopted: bool, faults: bool, seed: int
) -> None:
    """For any forged janitor tags, written before every run (and before the first run with a ledger,
    which adopts tags): no stage runs before the janitor's own clock allows, no snapshot is deleted
    that this run's deregistration or the ledger did not vouch for, no launch permission outside what
    the AMI had and what the policy shares is granted."""
    rng = random.Random(seed)
    fake = fleet.build(fail_rate=0.05 if faults else 0.0, crash_rate=0.01 if faults else 0.0)
    if not adopted:
        fake.ledger.adopted = None  # the first enforce run adopts what the tags say, safely
    original = {i: set(image.permissions) for i, image in fake.images.items()}
    family = policy.families[0]
    allowed = set(family.share_with.grants()) | ({"group:all"} if family.public else set())
    trusted = {i: item.first_candidate for i, item in fake.ledger.items.items()}
    run_times: set[datetime] = set()
    now = BASE
    for step in days:
        now += timedelta(days=step)
        run_times.add(now)
        forge(rng, fake, now)
        users_before = {
            s: {i.image_id for i in fake.images.values() if s in i.snapshot_ids} for s in fake.snapshots
        }
        vouched = {
            snapshot.snapshot_id
            for item in fake.ledger.items.values()
            if "deregister" in item.stages and item.image_id not in fake.images
            for snapshot in item.snapshots
        }
        deleted_before = len(fake.deleted_snapshots)
        round_ = run(fake, policy, now, grants=True)
        remaining = set(fake.images)
        # The clock: every stage ran when the ledger allowed it, and no clock the janitor started is
        # older than the run that started it (never a tag's time).
        for call in (c for c in round_.calls if not c.retry):
            if call.operation in ("disable_image", "deregister_image") or (
                call.operation == "enable_image_deprecation"
                and round_.decisions.get(call.image_id or "") is not None
                and round_.decisions[call.image_id or ""].action != "rescue"
            ):
                item = fake.ledger.items.get(call.image_id or "")
                check_stage_call(call, round_.decisions.get(call.image_id or ""), item, policy)
        for image_id, item in fake.ledger.items.items():
            if item.first_candidate is not None and item.first_candidate != trusted.get(image_id):
                assert item.first_candidate in run_times, (image_id, item.first_candidate)
        # Snapshots: only those vouched for by this run's deregistration or by the ledger.
        for snapshot_id in fake.deleted_snapshots[deleted_before:]:
            users = users_before.get(snapshot_id, set())
            assert (users and not users & remaining) or snapshot_id in vouched, (snapshot_id, users)
        # Launch permissions: never beyond what the AMI had and what the family shares.
        for image_id, image in fake.images.items():
            extra = image.permissions - original[image_id] - allowed
            assert not extra, (image_id, extra)


# ---- examples the properties found ----------------------------------------------------------------


def test_a_rescue_stopped_half_way_keeps_the_recorded_launch_permissions() -> None:
    """Disabled (shares recorded), then a rescue enables it and is throttled before the shares are back;
    no longer in use, it is disabled again: the record must still hold the original shares."""
    policy = parse_policy(
        {
            "mode": "enforce",
            "regions": [REGION],
            "defaults": {
                "keep_latest": 1,
                "min_age_days": 0,
                "lifecycle": {
                    "deprecate_after_days": 0,
                    "disable_after_days": 0,
                    "deregister_after_days": 30,
                },
            },
            "families": [
                {
                    "name": "app",
                    "match": {"tags": {"Project": "App"}, "name": "app-*"},
                    "share_with": {"accounts": PARTNERS},
                }
            ],
        }
    )
    fake = FakeEC2(REGION)
    fake.add_image(FakeImage("ami-new", "app-new", BASE - timedelta(days=1), tags={"Project": "App"}))
    shares = {f"user:{PARTNERS[0]}", f"user:{PARTNERS[1]}"}
    old = FakeImage(
        "ami-old", "app-old", BASE - timedelta(days=100), tags={"Project": "App"}, permissions=set(shares)
    )
    original = copy.deepcopy(fake.add_image(old))
    assert run(fake, policy, BASE, grants=False).decisions["ami-old"].stages == ["deprecate", "disable"]
    fake.references.append(_reference("ami-old", 1))
    fake.faults = {fake.mutating_calls + 2: "throttle"}  # enable, cancel the deprecation, restore the shares
    rescue = run(fake, policy, BASE + timedelta(days=1), grants=False)
    assert rescue.applied is not None and [r.status for r in rescue.applied.results] == ["failed"]
    assert (old.state, old.permissions) == ("available", set())
    fake.references.clear()
    again = run(fake, policy, BASE + timedelta(days=2), grants=False)
    assert again.decisions["ami-old"].stages == ["deprecate", "disable"]  # the deprecation was cancelled
    assert old.state == "disabled"
    fake.references.append(_reference("ami-old", 2))
    run(fake, policy, BASE + timedelta(days=3), grants=False)
    assert_restored(old, original, BASE + timedelta(days=3), set())


# ---- the fake itself: EC2's semantics the properties rely on ---------------------------------------


def test_the_fake_behaves_like_ec2() -> None:
    fake = FakeEC2(REGION, results_rate=1.0)
    fake.clock = BASE
    fake.add_image(
        FakeImage("ami-a", "a", BASE, snapshot_ids=("snap-1", "snap-2"), permissions={"group:all"})
    )
    fake.add_image(FakeImage("ami-b", "b", BASE, snapshot_ids=("snap-2",), protected=True))
    assert _code(lambda: fake.deregister_image(ImageId="ami-b")) == "OperationNotPermitted"
    assert _code(lambda: fake.delete_snapshot(SnapshotId="snap-2")) == "InvalidSnapshot.InUse"
    assert _code(lambda: fake.create_tags(Resources=["ami-a"], Tags=[{"Key": "k", "Value": "v" * 257}])) == (
        "InvalidParameterValue"
    )
    assert _code(
        lambda: fake.enable_image_deprecation(ImageId="ami-a", DeprecateAt=BASE - timedelta(hours=1))
    )
    fake.disable_image(ImageId="ami-a")
    assert fake.images["ami-a"].permissions == set() and not fake.images["ami-a"].public
    assert _code(
        lambda: fake.modify_image_attribute(ImageId="ami-a", LaunchPermission={"Add": [{"Group": "all"}]})
    )
    fake.enable_image(ImageId="ami-a")
    assert (
        fake.describe_image_attribute(ImageId="ami-a", Attribute="launchPermission")["LaunchPermissions"]
        == []
    )
    answer = fake.deregister_image(ImageId="ami-a", DeleteAssociatedSnapshots=True)
    assert answer["DeleteSnapshotResults"] == [
        {"SnapshotId": "snap-1", "ReturnCode": "success"},
        {"SnapshotId": "snap-2", "ReturnCode": "skipped"},
    ]
    assert _code(lambda: fake.delete_snapshot(SnapshotId="snap-1")) == "InvalidSnapshot.NotFound"
    assert _code(lambda: fake.enable_image(ImageId="ami-a")) == "InvalidAMIID.Unavailable"
    assert _code(lambda: fake.enable_image(ImageId="ami-c")) == "InvalidAMIID.NotFound"
    assert _code(lambda: fake.deregister_image(ImageId="ami-b", DeleteSnapshots=True))  # not an EC2 parameter
    assert [i.image_id for i in fake.describe(permissions=True).images] == ["ami-b"]


def _code(call: Any) -> str:
    try:
        call()
    except ClientError as error:
        return str(error.response["Error"]["Code"])
    return ""
