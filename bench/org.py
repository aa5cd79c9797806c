"""An organization's daily run for `make bench`: accounts x regions, each account-region its own chain of
Lambda invocations on the in-memory EC2 of tests/fake_ec2.py (its own token buckets and simulated clock),
the other services of tests/fake_aws.py, and usage reports exchanged through one S3 inbox.

The organization: one owner account bakes golden AMIs (`golden-a` .. `golden-d`, one a day each, shared
with the organization) and every other account is a consumer that launches some of them (launch
templates, an instance, an SSM parameter) and owns AMIs of its own (2 to 10 families `app-0`, `app-1`
.., one a day each, shared with nobody). Every account runs the same policy (deployed to all as one stack set), with the
usage inbox configured.

Each family is in its steady state on the day simulated, as the janitor's own earlier runs left it
(tags and ledger items agree: nothing is tampered): 45 daily AMIs, aged 0 to 44 days. With the default
rules (min_age_days 30, the lifecycle's deprecate at 0 days, disable at 7, deregister at 14) the AMI
aged 30 days becomes a candidate today (and is deprecated), 31-36 are deprecated, the one aged 37 is
due to be disabled, 38-43 are disabled and the one aged 44 is due to be deregistered; the newest is not
shared yet (the owner's run shares it). So each family gives the day three due stages and two of them
run a clock, as they do every day.

What uses the owner's AMIs: every consumer's launch templates name recent `golden-a` and `golden-b`
AMIs; consumer n (n = 1, 2, ...) also keeps `golden-c` aged 37 in a launch template when n % 10 == 1,
and runs an instance of `golden-d` aged 44 and builds on `golden-b` aged 37 with an Image Builder
recipe when n % 20 == 2. So those stay (their consumers report them used) and the same ages of the
other golden families retire on schedule.

One account-region's day (`run_account_region`) is the scheduled run, as `engine.run` does it with a
work queue: `engine.build_plan` (the inventory, the plan, launch permissions and, for the owner, the
usage reports of the accounts its AMIs are shared with, then the plan settled on them),
`engine.publish_usage` (its own report to the inbox), then `executor.apply_plan` with the due stages cut
by `engine.cut_due` and the shares by `sharer.apply_shares`; then each slice as one invocation of the
slice worker (`slicer.run_slice`: a new pacer that starts empty, four AMIs in flight, the consumers'
reports read again). The scheduled run's per-AMI reads go one at a time here (the function reads 8 at
once: that phase is an upper bound), unpaced like the deployed function's client; the services beside
EC2 take the same latency but are not throttled. The ledger is the fake's (tests/fake_ec2.FakeLedger, checked against the real
table in tests/integration/test_ledger.py); the run's record, its report and its queue messages are
not simulated.

The organization's day (`simulate_org`): the model is consumers first. Every consumer account-region
runs at the scheduled hour, all in parallel (each its own Lambda, its own buckets); the owner's regions
start once the last consumer report of the day is in the inbox (in a deployment: the owner's schedule
an offset later), all in parallel too. The day's wall time is the later of the last consumer's end and
the owner's start plus its longest region. Each account-region is simulated one after the other in
real time, each on its own simulated clock.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from ami_janitor import engine  # noqa: E402
from ami_janitor.aws import executor, sharer, slicer  # noqa: E402
from ami_janitor.aws.clients import RegionClients  # noqa: E402
from ami_janitor.core import sharing, slices  # noqa: E402
from ami_janitor.core.model import Decision, LedgerItem, LedgerStage, Reference, iso  # noqa: E402
from ami_janitor.core.policy import (  # noqa: E402
    CANDIDATE_TAG,
    PRIOR_DEPRECATION_TAG,
    PRIOR_PERMISSIONS_TAG,
    SHARED_BY_JANITOR_TAG,
    Policy,
    parse_policy,
)
from fake_aws import AccountRegion, Inbox, Organization, account_region  # noqa: E402
from fake_ec2 import FakeEC2, FakeImage, nearest_minute  # noqa: E402
from fake_throttle import AccountBuckets  # noqa: E402

REGIONS = (
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "ca-central-1",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-central-1",
    "eu-north-1",
    "ap-south-1",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-southeast-1",
    "ap-southeast-2",
    "sa-east-1",
)
NOW = datetime(2026, 11, 25, 3, tzinfo=UTC)  # the day's scheduled hour
LATENCY = 0.05  # simulated seconds per call, every service
GAP = 1.0  # simulated seconds between two invocations of a region's chain
OWNER = "100000000000"
ORGANIZATION_ID = "o-0rgsim0000"
INBOX_BUCKET = "org-ami-usage"
GOLDEN = ("golden-a", "golden-b", "golden-c", "golden-d")
APPS = tuple(f"app-{n}" for n in range(10))


def app_families(n: int) -> tuple[str, ...]:
    """Consumer n's own families: 2 to 10 (90 to 450 AMIs in a region)."""
    return APPS[: 2 + n % 9]


DAYS = 45  # daily AMIs a family holds in its steady state: aged 0 to 44 days
# Ages (days) of the day's work in a family: a new candidate, the disable and the deregister stages due.
NEW_CANDIDATE, DISABLE_DUE, DEREGISTER_DUE = 30, 37, 44
KEEPS_GOLDEN_C, RUNS_GOLDEN_D = (10, 1), (20, 2)  # consumer n with n % m == r
BUILDS_ON_GOLDEN_B = RUNS_GOLDEN_D  # an Image Builder recipe whose parent is golden-b aged DISABLE_DUE


def consumer_id(n: int) -> str:
    return f"{100000000000 + n:012d}"


def organization(consumers: int) -> Organization:
    return Organization(ORGANIZATION_ID, OWNER, [OWNER, *(consumer_id(n) for n in range(1, consumers + 1))])


def org_policy(regions: Sequence[str], org: Organization) -> Policy:
    families = [
        {"name": name, "match": {"name": f"{name}-*"}, "share_with": {"organizations": [org.arn]}}
        for name in GOLDEN
    ] + [{"name": name, "match": {"name": f"{name}-*"}} for name in APPS]
    return parse_policy(
        {
            "mode": "enforce",
            "regions": list(regions),
            "defaults": {"limits": {"max_actions_per_run": 200}},
            "families": families,
            "usage_reports": {"inbox": f"s3://{INBOX_BUCKET}/org", "max_age_hours": 48},
        }
    )


def image_id(account: int, region: int, family: int, age: int) -> str:
    """Unique across the organization (a consumer names the owner's AMIs by id)."""
    return f"ami-{account:05x}{region:02x}{family:02x}{age:08x}"


def created_at(age: int) -> datetime:
    return NOW - timedelta(days=age, hours=1)


def add_family(
    fake: FakeEC2,
    account: int,
    region: int,
    family: int,
    name: str,
    grant: str | None,
    in_use: frozenset[int] = frozenset(),
) -> None:
    """A family's 45 daily AMIs in their steady state, with the ledger items and the janitor's tags its
    earlier runs left (see the module's docstring); `grant`: the share its family keeps on them;
    `in_use`: the ages another account has kept using since they were new (never retiring: only
    shared)."""
    for age in range(DAYS):
        ami = image_id(account, region, family, age)
        image = FakeImage(ami, f"{name}-{age:03d}", created_at(age), snapshot_ids=(f"snap-{ami[4:]}",))
        shared = grant is not None and age > 0  # the newest is shared by today's run
        grants = (grant,) if shared and grant else ()
        if grants:
            image.permissions = set(grants)
            image.tags[SHARED_BY_JANITOR_TAG] = ",".join(grants)
        if age <= NEW_CANDIDATE or age in in_use:
            if grants:
                fake.ledger.items[ami] = LedgerItem(image_id=ami, grants=grants)
            fake.add_image(image)
            continue
        first = NOW - timedelta(days=age - NEW_CANDIDATE)
        stages = {"deprecate": LedgerStage(at=first, confirmed=first)}
        image.deprecation_time = nearest_minute(first)
        image.tags.update({CANDIDATE_TAG: iso(first) or "", PRIOR_DEPRECATION_TAG: "none"})
        if age > DISABLE_DUE:
            disabled = first + timedelta(days=7)
            stages["disable"] = LedgerStage(at=disabled, prior_launch_permissions=grants, confirmed=disabled)
            image.state = "disabled"
            image.permissions = set()
            image.tags[PRIOR_PERMISSIONS_TAG] = ",".join(grants)
        fake.ledger.items[ami] = LedgerItem(image_id=ami, first_candidate=first, stages=stages, grants=grants)
        fake.add_image(image)


def new_region(region: str, start: datetime) -> FakeEC2:
    fake = FakeEC2(region, throttle=AccountBuckets(), latency=LATENCY, results_rate=1.0)
    fake.clock = start
    fake.ledger.adopted = NOW - timedelta(days=365)
    return fake


def owner_region(region: str, inbox: Inbox, org: Organization, start: datetime) -> AccountRegion:
    fake = new_region(region, start)
    r = REGIONS.index(region)
    # What some consumer launches (see consumer_region): in use since they were new.
    in_use = {
        "golden-b": frozenset({DISABLE_DUE}),
        "golden-c": frozenset({DISABLE_DUE}),
        "golden-d": frozenset({DEREGISTER_DUE}),
    }
    for f, name in enumerate(GOLDEN):
        add_family(fake, 0, r, f, name, f"org:{org.arn}", in_use.get(name, frozenset()))
    return account_region(fake, OWNER, inbox, organization=org)


def consumer_region(n: int, region: str, inbox: Inbox) -> AccountRegion:
    """Consumer n's region: its own families, and what it launches of the owner's."""
    fake = new_region(region, NOW)
    r = REGIONS.index(region)
    for f, name in enumerate(app_families(n)):
        add_family(fake, n, r, f, name, None)
        newest = image_id(n, r, f, 0)
        fake.references.append(
            Reference(image_id=newest, kind="instance", resource_id=f"i-{newest[4:]}", detail="")
        )
    golden = {name: f for f, name in enumerate(GOLDEN)}
    used = [image_id(0, r, golden["golden-a"], n % 3), image_id(0, r, golden["golden-b"], n % 20)]
    if n % KEEPS_GOLDEN_C[0] == KEEPS_GOLDEN_C[1]:
        used.append(image_id(0, r, golden["golden-c"], DISABLE_DUE))
    for k, ami in enumerate(used):
        template = f"lt-{n:05x}{r:02x}{k:010x}"
        fake.references.append(
            Reference(image_id=ami, kind="launch-template", resource_id=template, detail="")
        )
    if n % RUNS_GOLDEN_D[0] == RUNS_GOLDEN_D[1]:
        ami = image_id(0, r, golden["golden-d"], DEREGISTER_DUE)
        fake.references.append(
            Reference(image_id=ami, kind="instance", resource_id=f"i-{ami[4:]}", detail="")
        )
    recipes, images = {}, {}
    if n % BUILDS_ON_GOLDEN_B[0] == BUILDS_ON_GOLDEN_B[1]:
        recipe = f"arn:aws:imagebuilder:{region}:{consumer_id(n)}:image-recipe/on-golden-b/1.0.0"
        ami = image_id(0, r, golden["golden-b"], DISABLE_DUE)
        if n % (2 * BUILDS_ON_GOLDEN_B[0]) == BUILDS_ON_GOLDEN_B[1]:
            recipes[recipe] = ami
        else:  # every other one names the owner's Image Builder build of it
            recipes[recipe] = golden_b_build(region)
            images[recipes[recipe]] = {region: ami}
    parameters = {"/platform/golden-a/current": image_id(0, r, golden["golden-a"], 0)}
    return account_region(fake, consumer_id(n), inbox, parameters=parameters, recipes=recipes, images=images)


def golden_b_build(region: str) -> str:
    """The owner's Image Builder build version of golden-b aged DISABLE_DUE, shared with its consumers."""
    return f"arn:aws:imagebuilder:{region}:{OWNER}:image/golden-b/1.{DISABLE_DUE}.0/1"


@dataclass(frozen=True)
class Invocation:
    kind: str  # "scheduled" or "slice"
    seconds: float  # simulated
    amis: int  # the slice's AMIs; the scheduled run's decisions


@dataclass
class RegionRun:
    """One account-region's day: its invocations, what it did, and its calls."""

    account: str
    region: str
    start: float  # simulated seconds after the scheduled hour
    published: float = 0.0  # when its usage report was in the inbox (seconds after the hour)
    invocations: list[Invocation] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    refused: int = 0  # RequestLimitExceeded answers
    statuses: Counter[str] = field(default_factory=Counter)
    held: dict[str, str] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)  # AMIs deregistered today
    disabled: set[str] = field(default_factory=set)  # AMIs disabled today
    reports: list[str] = field(default_factory=list)
    tampered: int = 0
    skipped: list[str] = field(default_factory=list)
    wall: float = 0.0  # real seconds the simulation took

    @property
    def seconds(self) -> float:
        """Simulated seconds from the scheduled run's start to the last slice's end."""
        return sum(i.seconds for i in self.invocations) + GAP * max(0, len(self.invocations) - 1)

    @property
    def end(self) -> float:
        return self.start + self.seconds

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


def run_account_region(area: AccountRegion, policy: Policy, start: float) -> RegionRun:
    """The account-region's scheduled run and its slices (see the module's docstring)."""
    began = time.perf_counter()
    fake, clients = area.ec2, area.clients
    region = fake.region
    run = RegionRun(account=area.account, region=region, start=start)
    now = fake.clock
    before = {i: image.state for i, image in fake.images.items()}

    def clients_for(_region: str) -> RegionClients:
        return clients

    # The scheduled run (one invocation), unpaced like the deployed function's client.
    plan, loaded = engine.build_plan(policy, [region], clients_for, now)
    usage = engine.publish_usage(policy, [loaded[region]], clients_for, now)
    run.published = start + fake.elapsed
    run.reports = usage.get("usage_reports", [])
    run.skipped = [f"{s.region}: {s.error}" for s in plan.regions if s.status == "skipped"]
    run.tampered = len(plan.tampered)
    run.decisions = {d.image_id: d for d in plan.decisions}
    work: list[slices.WorkSlice] = []

    def run_due(due_region: str, due: list[Decision]) -> list[executor.ActionResult]:
        consumers, expanded = engine._consumers(loaded[due_region])  # as engine.run gives them to the cut
        work.extend(
            engine.cut_due(plan, policy, due_region, due, now, consumers=consumers, expanded=expanded)
        )
        return []

    if not run.skipped:
        applied = executor.apply_plan(
            plan,
            loaded,
            clients_for,
            now,
            ledger_for=lambda _region: fake.ledger,
            rescue_grants=lambda image: sharing.rescue_grants(policy, image),
            run_due=run_due,
        )
        run.statuses.update(r.status for r in applied.results)
        shared = sharer.apply_shares(clients_for, plan.shares, [loaded[region]], lambda _region: fake.ledger)
        run.statuses.update(f"share {r.status}" for r in shared)
    run.invocations.append(Invocation("scheduled", fake.elapsed, len(plan.decisions)))

    # Each slice: one invocation of the slice worker.
    for part in work:
        fake.advance(GAP)
        fake.pacer(full=False)
        paced = area.clients  # the slice worker's own
        began_slice = fake.elapsed
        done = slicer.run_slice(
            paced,
            fake.ledger,
            policy,
            part,
            fake.clock,
            side_by_side=fake.side_by_side(slicer.SLICE_WORKERS),
        )
        run.invocations.append(Invocation("slice", fake.elapsed - began_slice, len(part.items)))
        run.statuses.update(r.status for r in done.results)
        run.held.update(done.held)
    fake.before_call = None

    run.calls = area.api_calls()
    run.refused = sum(fake.throttle.refused.values()) if fake.throttle else 0
    run.gone = set(fake.deregistered)
    run.disabled = {
        i for i, image in fake.images.items() if image.state == "disabled" and before[i] != "disabled"
    }
    run.wall = time.perf_counter() - began
    return run


@dataclass
class OrgRun:
    consumers: int
    regions: tuple[str, ...]
    inbox: Inbox
    runs: list[RegionRun] = field(default_factory=list)
    wall: float = 0.0  # real seconds

    @property
    def owner_runs(self) -> list[RegionRun]:
        return [r for r in self.runs if r.account == OWNER]

    @property
    def consumer_runs(self) -> list[RegionRun]:
        return [r for r in self.runs if r.account != OWNER]

    @property
    def owner_start(self) -> float:
        """When the owner's regions start: the last consumer report of the day is in the inbox."""
        return max((r.published for r in self.consumer_runs), default=0.0)

    @property
    def day(self) -> float:
        """Simulated seconds from the scheduled hour to the organization's last invocation's end."""
        return max(r.end for r in self.runs)

    @property
    def longest(self) -> RegionRun:
        return max(self.runs, key=lambda r: r.seconds)

    def calls_per_region(self) -> list[int]:
        return [r.total_calls for r in self.runs]

    def mean_calls(self, runs: Sequence[RegionRun]) -> float:
        return statistics.mean(r.total_calls for r in runs) if runs else 0.0


def simulate_org(consumers: int, regions: Sequence[str]) -> OrgRun:
    """The organization's day in `regions`: every consumer's region, then the owner's (see the module's
    docstring)."""
    started = time.perf_counter()
    org = organization(consumers)
    policy = org_policy(regions, org)
    inbox = Inbox()
    result = OrgRun(consumers=consumers, regions=tuple(regions), inbox=inbox)
    for region in regions:
        for n in range(1, consumers + 1):
            result.runs.append(run_account_region(consumer_region(n, region, inbox), policy, 0.0))
    start = result.owner_start
    for region in regions:
        area = owner_region(region, inbox, org, NOW + timedelta(seconds=start))
        result.runs.append(run_account_region(area, policy, start))
    result.wall = time.perf_counter() - started
    return result


if __name__ == "__main__":
    # `python bench/org.py [REGIONS]`: the bench's figures for the first REGIONS regions (all 17 by default).
    import bench

    bench.bench_org(int(sys.argv[1]) if sys.argv[1:] else len(REGIONS))
