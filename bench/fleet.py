"""A fleet simulator for `make bench`: one region's due deregistrations through the slices, on the
in-memory EC2 of tests/fake_ec2.py with the account's token buckets (tests/fake_throttle.py) and a
simulated clock.

The region holds `amis` AMIs of one family; `due` of them were deprecated and disabled by the janitor
long ago (their ledger items record both stages, confirmed), so each takes only its deregister stage
now; the others are younger than min_age_days and kept. The scheduled run is simulated from its plan
on: the planner on the fake's inventory, then `executor.apply_plan` with the due stages cut by
`engine.cut_due`, as `engine.run` cuts them for the work queue. Each slice is then one invocation of
the slice worker: a new pacer that starts empty (`Pacer(full=False)`, as the worker's new
ClientFactory), `slicer.run_slice` (its reads, then the executor's stages), timed on the fake's clock.
Every EC2 call and ledger access takes `latency` simulated seconds; `gap` seconds pass between two
invocations (SQS hands the region's next slice once the last one is deleted). The scheduled run's own
reads (the inventory, before the plan) are not simulated: they are one invocation of their own.

What is measured: DeregisterImage calls that took effect per simulated second, from the first slice's
start to the last one's end, against the bucket's refill; the invocations and the longest; EC2 calls
and ledger accesses per retired AMI; RequestLimitExceeded answers (the account's buckets throttle any
call a pacer let through too early).
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from ami_janitor import engine  # noqa: E402
from ami_janitor.aws import executor, slicer  # noqa: E402
from ami_janitor.aws.pacing import bucket_of  # noqa: E402
from ami_janitor.core import sharing, slices  # noqa: E402
from ami_janitor.core.model import Decision, LedgerItem, LedgerStage, iso  # noqa: E402
from ami_janitor.core.policy import (  # noqa: E402
    CANDIDATE_TAG,
    PRIOR_DEPRECATION_TAG,
    PRIOR_PERMISSIONS_TAG,
    Policy,
    parse_policy,
)
from ami_janitor.core.run_plan import plan_run  # noqa: E402
from ami_janitor.engine import SLICE_BUDGET_SECONDS  # noqa: E402
from fake_aws import region_clients  # noqa: E402
from fake_ec2 import MUTATING, FakeEC2, FakeImage, nearest_minute  # noqa: E402
from fake_throttle import AccountBuckets  # noqa: E402

REGION = "us-east-1"
NOW = datetime(2026, 11, 25, 3, tzinfo=UTC)
LATENCY = 0.05  # simulated seconds per EC2 call and per ledger access
GAP = 1.0  # simulated seconds between two invocations
# The janitor deprecated the due AMIs this long ago, and disabled them a week later (the default
# lifecycle: deprecate at 0 days, disable at 7, deregister at 14).
STARTED = NOW - timedelta(days=40)


def fleet_policy(due: int) -> Policy:
    """One family, the default lifecycle and rules; the caps let every due AMI go in one run (each
    deregistration costs two actions: the AMI and its own snapshot)."""
    return parse_policy(
        {
            "mode": "enforce",
            "regions": [REGION],
            "defaults": {"limits": {"max_actions_per_run": 2 * due}},
            "families": [{"name": "app", "match": {"name": "app-*"}}],
        }
    )


def build_fleet(amis: int, due: int, *, latency: float = LATENCY, seed: int = 0) -> tuple[FakeEC2, set[str]]:
    """The region (its AMIs, their snapshots, the ledger) and the ids of the due AMIs, spread among the
    others."""
    rng = random.Random(seed)
    fake = FakeEC2(REGION, throttle=AccountBuckets(), latency=latency, results_rate=1.0)
    fake.clock = NOW
    fake.ledger.adopted = NOW - timedelta(days=365)
    chosen = set(rng.sample(range(amis), due))
    disabled_at = STARTED + timedelta(days=7)
    for n in range(amis):
        image_id, snapshot = f"ami-{n:017x}", f"snap-{n:017x}"
        if n not in chosen:
            created = NOW - timedelta(days=rng.uniform(0, 29))  # younger than min_age_days: kept
            fake.add_image(FakeImage(image_id, f"app-{n}", created, snapshot_ids=(snapshot,)))
            continue
        fake.add_image(
            FakeImage(
                image_id,
                f"app-{n}",
                STARTED - timedelta(days=rng.uniform(30, 700)),
                state="disabled",
                deprecation_time=nearest_minute(STARTED),
                snapshot_ids=(snapshot,),
                tags={
                    CANDIDATE_TAG: iso(STARTED) or "",
                    PRIOR_DEPRECATION_TAG: "none",
                    PRIOR_PERMISSIONS_TAG: "",
                },
            )
        )
        fake.ledger.items[image_id] = LedgerItem(
            image_id=image_id,
            first_candidate=STARTED,
            stages={
                "deprecate": LedgerStage(at=STARTED, confirmed=STARTED),
                "disable": LedgerStage(at=disabled_at, confirmed=disabled_at),
            },
        )
    return fake, {f"ami-{n:017x}" for n in chosen}


@dataclass(frozen=True)
class Invocation:
    index: int
    amis: int
    seconds: float  # simulated, from its first call to its last answer
    reading: float  # of which before its first write (its AMIs read again)


@dataclass
class FleetRun:
    amis: int
    due: int
    latency: float
    gap: float
    budget: float
    workers: int = 1  # AMIs in flight in a slice
    planned_deregistrations: int = 0
    scheduled_calls: int = 0  # EC2 calls and ledger writes of the scheduled run after its plan
    invocations: list[Invocation] = field(default_factory=list)
    ec2_calls: Counter[str] = field(default_factory=Counter)  # EC2 API (DeregisterImage) -> calls
    ledger_writes: int = 0
    ledger_reads: int = 0  # DescribeTable and BatchGetItem
    refused: int = 0  # RequestLimitExceeded answers
    deregister_calls: Counter[str] = field(default_factory=Counter)  # AMI -> DeregisterImage calls
    deregistered: int = 0  # due AMIs gone from the region
    remaining: int = 0  # AMIs left in the region
    statuses: Counter[str] = field(default_factory=Counter)  # of the slices' results
    held: int = 0
    in_time_order: bool = False  # the slices' calls reached the fake in the order of simulated time
    wall: float = 0.0  # seconds of real time the simulation took

    @property
    def span(self) -> float:
        """Simulated seconds from the first slice's first call to the last slice's last answer."""
        return sum(i.seconds for i in self.invocations) + self.gap * max(0, len(self.invocations) - 1)

    @property
    def refill(self) -> float:
        return bucket_of("DeregisterImage")[1]

    @property
    def rate(self) -> float:
        """DeregisterImage calls that took effect per simulated second."""
        return self.deregistered / self.span if self.span else 0.0

    @property
    def ratio(self) -> float:
        return self.rate / self.refill

    @property
    def longest(self) -> Invocation:
        return max(self.invocations, key=lambda i: i.seconds)

    @property
    def once(self) -> bool:
        """Every due AMI deregistered, each by exactly one DeregisterImage call."""
        return self.deregistered == self.due and set(self.deregister_calls.values()) == {1}


def simulate(
    amis: int,
    due: int,
    *,
    latency: float = LATENCY,
    gap: float = GAP,
    budget: float = SLICE_BUDGET_SECONDS,
    seed: int = 0,
    paced: bool = True,
    workers: int = slicer.SLICE_WORKERS,
) -> FleetRun:
    """The scheduled run's plan and cut, then each slice as one invocation, `workers` AMIs in flight as
    the worker keeps them (lanes of simulated time: tests/fake_ec2.Lanes). `paced=False`: the slices
    run without a pacer (the account's buckets then refuse what goes too fast)."""
    started = time.perf_counter()
    fake, due_ids = build_fleet(amis, due, latency=latency, seed=seed)
    policy = fleet_policy(due)
    run = FleetRun(amis=amis, due=due, latency=latency, gap=gap, budget=budget, workers=workers)

    # The scheduled run, from its plan on: as engine.run with a work queue.
    inventory = fake.describe(permissions=True)
    plan = plan_run([inventory], policy, NOW)
    run.planned_deregistrations = sum(1 for d in plan.decisions if d.action == "deregister")
    work: list[slices.WorkSlice] = []

    def run_due(region: str, decisions: list[Decision]) -> list[executor.ActionResult]:
        work.extend(engine.cut_due(plan, policy, region, decisions, NOW, budget))
        return []

    scheduled = region_clients(fake)
    applied = executor.apply_plan(
        plan,
        {REGION: inventory},
        lambda _region: scheduled,
        NOW,
        ledger_for=lambda _region: fake.ledger,
        rescue_grants=lambda image: sharing.rescue_grants(policy, image),
        run_due=run_due,
    )
    run.statuses.update(r.status for r in applied.results)
    run.scheduled_calls = len(fake.calls)

    # The slices, one invocation each.
    for index, part in enumerate(work):
        if index:
            fake.advance(gap)
        if paced:
            fake.pacer(full=False)
        clients = region_clients(fake)
        began, first = fake.elapsed, len(fake.calls)
        done = slicer.run_slice(
            clients,
            fake.ledger,
            policy,
            part,
            fake.clock,
            side_by_side=fake.side_by_side(workers) if workers > 1 else None,
        )
        writes = [c for c in fake.calls[first:] if c.operation in MUTATING]
        reading = (writes[0].clock - (NOW + timedelta(seconds=began))).total_seconds() if writes else 0.0
        run.invocations.append(Invocation(index, len(part.items), fake.elapsed - began, reading))
        run.statuses.update(r.status for r in done.results)
        run.held += len(done.held)
    fake.before_call = None

    slice_calls = fake.calls[run.scheduled_calls :]
    run.in_time_order = all(a.clock <= b.clock for a, b in pairwise(slice_calls))
    run.ec2_calls.update(
        "".join(word.title() for word in c.operation.split("_"))  # deregister_image: DeregisterImage
        for c in slice_calls
        if not c.operation.startswith("ledger_")
    )
    run.ledger_writes = sum(1 for c in slice_calls if c.operation.startswith("ledger_"))
    run.ledger_reads = sum(fake.dynamodb.calls.values())
    run.refused = sum(fake.throttle.refused.values()) if fake.throttle else 0
    run.deregister_calls.update(
        str(c.params["ImageId"]) for c in slice_calls if c.operation == "deregister_image"
    )
    run.deregistered = len(due_ids & set(fake.deregistered))
    run.remaining = len(fake.images)
    run.wall = time.perf_counter() - started
    return run
