"""A fleet simulator for `make bench`: one region's due deregistrations through the slices, on the
in-memory EC2 of tests/fake_ec2.py with the account's token buckets (tests/fake_throttle.py) and a
simulated clock.

The region holds `amis` AMIs of one family; `due` of them were deprecated and disabled by the janitor
long ago (their ledger items record both stages, confirmed), so each takes only its deregister stage
now; the others are younger than min_age_days and kept. The scheduled run is simulated from its plan
on: the planner on the fake's inventory, then `executor.apply_plan` with the due stages cut by
`engine.cut_due`, then, as `engine.run` with a work queue, the run's record of its slices and the
slices queued (SQS), and its part of the report in the bucket (as the scheduled handler). Each queued
slice is then one invocation of the slice worker: its message as Lambda's event source hands it,
parsed by the handler's model, a new pacer that starts empty (`Pacer(full=False)`, as the worker's new
ClientFactory), `engine.work_slice` (the run record's check, the slice's reads and stages through
aws/ledger.Ledger, its results to the report bucket, the record's count, the out_of_time reserve of
the worker's timeout), and for the last slice the run's report and summary (`send_run_summary`, S3,
SNS); timed on the fake's clock. Every call of any service (EC2, DynamoDB, SSM, Auto Scaling, Batch,
EMR, S3, SNS, SQS) takes `latency` simulated seconds; `gap` seconds pass between two invocations (SQS
hands the region's next slice once the last one is deleted). The scheduled run's own reads (the
inventory, before the plan) are not simulated: they are one invocation of their own.

What is measured: DeregisterImage calls that took effect per simulated second, from the first slice's
start to the last one's end, against the bucket's refill; the invocations and the longest; every call
of every service per retired AMI (the scheduled run's after its plan, and the slices'); RequestLimitExceeded
answers (the account's buckets throttle any call a pacer let through too early).
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from ami_janitor import engine  # noqa: E402
from ami_janitor.aws import executor, slicer  # noqa: E402
from ami_janitor.aws.clients import RegionClients  # noqa: E402
from ami_janitor.aws.pacing import bucket_of  # noqa: E402
from ami_janitor.aws.slicer import SliceOutcome  # noqa: E402
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
from ami_janitor.engine import SLICE_BUDGET_SECONDS, RunSummary  # noqa: E402
from ami_janitor.handlers.events import Environment  # noqa: E402
from ami_janitor.handlers.scheduled import publish  # noqa: E402
from ami_janitor.handlers.slices import (  # noqa: E402
    RESERVE_MILLIS,
    WORKER_TIMEOUT_SECONDS,
    WorkSliceRecord,
    run_report,
    slice_keeper,
)
from fake_aws import AccountRegion, Inbox, QueuedMessage, Queues, account_region  # noqa: E402
from fake_ec2 import MUTATING, FakeEC2, FakeImage, nearest_minute  # noqa: E402
from fake_throttle import AccountBuckets  # noqa: E402

REGION = "us-east-1"
NOW = datetime(2026, 11, 25, 3, tzinfo=UTC)
LATENCY = 0.05  # simulated seconds per EC2 call and per ledger access
GAP = 1.0  # simulated seconds between two invocations
ACCOUNT = "123456789012"
QUEUE_URL = f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/ami-janitor-work.fifo"
ENVIRONMENT = Environment.model_validate(
    {
        "AWS_REGION": REGION,
        "REPORT_BUCKET": f"ami-janitor-reports-{ACCOUNT}",
        "TOPIC_ARN": f"arn:aws:sns:{REGION}:{ACCOUNT}:ami-janitor",
        "WORK_QUEUE_URL": QUEUE_URL,
    }
)
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
    slices_queued: int = 0
    # Every call, keyed like IAM actions ("ec2:DeregisterImage", "dynamodb:UpdateItem", "s3:PutObject"):
    # the scheduled run's after its plan (its record of the slices, their queueing, its part of the
    # report), and the slices' (the worker's code: its reads, stages, run record, report and summary).
    scheduled_calls: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    invocations: list[Invocation] = field(default_factory=list)
    ledger_writes: int = 0  # UpdateItem of the AMIs' items (of the slices' DynamoDB calls)
    refused: int = 0  # RequestLimitExceeded answers
    deregister_calls: Counter[str] = field(default_factory=Counter)  # AMI -> DeregisterImage calls
    deregistered: int = 0  # due AMIs gone from the region
    remaining: int = 0  # AMIs left in the region
    statuses: Counter[str] = field(default_factory=Counter)  # of the slices' results
    held: int = 0
    summaries: int = 0  # slices that claimed the run's report and summary (the last one's)
    notifications: int = 0  # summaries published to the topic
    reported: RunSummary | None = None  # the run's summary as its last slice sent it
    in_time_order: bool = False  # the slices' calls reached the fake in the order of simulated time
    wall: float = 0.0  # seconds of real time the simulation took

    @property
    def span(self) -> float:
        """Simulated seconds from the first slice's first call to the last slice's last answer."""
        return sum(i.seconds for i in self.invocations) + self.gap * max(0, len(self.invocations) - 1)

    @property
    def ec2_calls(self) -> Counter[str]:
        """The slices' EC2 calls by API (DeregisterImage)."""
        return Counter({k.removeprefix("ec2:"): n for k, n in self.calls.items() if k.startswith("ec2:")})

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


def _sqs_record(message: QueuedMessage, receive_count: int = 1) -> dict[str, Any]:
    """The message as Lambda's SQS event source hands it to the slice worker."""
    return {
        "messageId": message.id,
        "receiptHandle": f"handle-{message.id}",
        "body": message.body,
        "attributes": {
            "ApproximateReceiveCount": str(receive_count),
            "SentTimestamp": "0",
            "SenderId": "AROAEXAMPLE:ami-janitor",
            "ApproximateFirstReceiveTimestamp": "0",
            "MessageGroupId": message.group,
            "MessageDeduplicationId": message.deduplication,
            "SequenceNumber": "1",
        },
        "messageAttributes": {},
        "md5OfBody": hashlib.md5(message.body.encode()).hexdigest(),  # SQS's checksum of the body
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:{REGION}:{ACCOUNT}:ami-janitor-work.fifo",
        "awsRegion": REGION,
    }


def _calls(
    fake: FakeEC2, since: int, dynamodb: Counter[str], services: Iterable[AccountRegion]
) -> Counter[str]:
    """Every call since the fake's `since`-th (EC2's and the ledger writes') and DynamoDB's counts
    `dynamodb`, with the calls of the other services of `services`: keyed like IAM actions."""
    counted: Counter[str] = Counter()
    for call in fake.calls[since:]:
        if call.operation.startswith("ledger_"):
            counted["dynamodb:UpdateItem"] += 1
        else:
            counted["ec2:" + "".join(word.title() for word in call.operation.split("_"))] += 1
    counted.update(
        {f"dynamodb:{api}": n - dynamodb[api] for api, n in fake.dynamodb.calls.items() if n > dynamodb[api]}
    )
    for region in services:
        counted.update(region.calls)
    return counted


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
    """The scheduled run's plan, cut, record and queue, then each queued slice as one invocation of the
    worker's code (engine.work_slice, its results kept in the report bucket; the last slice's report
    and summary sent), `workers` AMIs in flight as the worker keeps them (lanes of simulated time:
    tests/fake_ec2.Lanes). `paced=False`: the slices run without a pacer (the account's buckets then
    refuse what goes too fast)."""
    started = time.perf_counter()
    fake, due_ids = build_fleet(amis, due, latency=latency, seed=seed)
    policy = fleet_policy(due)
    run = FleetRun(amis=amis, due=due, latency=latency, gap=gap, budget=budget, workers=workers)
    inbox, queues = Inbox(), Queues()

    def invocation() -> AccountRegion:
        """The clients of a new invocation: new clients on the same fakes (the bucket and the queue)."""
        return account_region(fake, ACCOUNT, inbox, queues=queues)

    # The scheduled run, from its plan on: as engine.run with a work queue.
    inventory = fake.describe(permissions=True)
    plan = plan_run([inventory], policy, NOW)
    run.planned_deregistrations = sum(1 for d in plan.decisions if d.action == "deregister")
    work: list[slices.WorkSlice] = []

    def run_due(region: str, decisions: list[Decision]) -> list[executor.ActionResult]:
        work.extend(engine.cut_due(plan, policy, region, decisions, NOW, budget))
        return []

    scheduled = invocation()
    scheduled_clients = scheduled.clients
    applied = executor.apply_plan(
        plan,
        {REGION: inventory},
        lambda _region: scheduled_clients,
        NOW,
        ledger_for=engine.ledger_for(policy, lambda _region: scheduled_clients),
        rescue_grants=lambda image: sharing.rescue_grants(policy, image),
        run_due=run_due,
    )
    run.statuses.update(r.status for r in applied.results)
    # Its record of the slices, then the slices queued; its part of the report in the bucket.
    result = engine.queue_slices(
        engine.RunResult(plan=plan, results=applied.results),
        REGION,
        work,
        policy,
        scheduled_clients,
        QUEUE_URL,
        NOW,
    )
    run.slices_queued = result.slices_queued
    publish(ENVIRONMENT, lambda _region: scheduled_clients, result.report(), waiting=result.slices_queued > 0)
    run.scheduled_calls = _calls(fake, 0, Counter(), [scheduled])
    first_call, dynamodb = len(fake.calls), Counter(fake.dynamodb.calls)

    # The slices, one invocation each, in the order the queue hands them.
    workers_regions: list[AccountRegion] = []
    while (message := queues.take(QUEUE_URL)) is not None:
        record = WorkSliceRecord.model_validate(_sqs_record(message))  # the worker's own parsing
        part = record.body
        if run.invocations:
            fake.advance(gap)
        fake.before_call = fake.pacer(full=False).acquire if paced else None
        region = invocation()
        workers_regions.append(region)
        clients = region.clients
        began, first = fake.elapsed, len(fake.calls)
        deadline = began + WORKER_TIMEOUT_SECONDS - RESERVE_MILLIS / 1000
        outcome = engine.work_slice(
            policy,
            part,
            clients,
            fake.clock,
            keep=slice_keeper(ENVIRONMENT, clients),
            out_of_time=lambda deadline=deadline: fake.elapsed >= deadline,
            delivery=int(record.attributes.ApproximateReceiveCount),
            side_by_side=fake.side_by_side(workers),
        )
        if outcome.last:
            run.summaries += 1

            def send(outcome: SliceOutcome = outcome, clients: RegionClients = clients) -> None:
                report = run_report(ENVIRONMENT, clients, outcome)
                publish(ENVIRONMENT, lambda _region: clients, report)
                run.reported = report.summary

            engine.send_run_summary(policy, clients, outcome, send)
        writes = [c for c in fake.calls[first:] if c.operation in MUTATING]
        reading = (writes[0].clock - (NOW + timedelta(seconds=began))).total_seconds() if writes else 0.0
        run.invocations.append(Invocation(part.index, len(part.items), fake.elapsed - began, reading))
        run.statuses.update(r.status for r in outcome.results)
        run.held += len(outcome.held)
    fake.before_call = None

    slice_calls = fake.calls[first_call:]
    run.in_time_order = all(a.clock <= b.clock for a, b in pairwise(slice_calls))
    run.calls = _calls(fake, first_call, dynamodb, workers_regions)
    run.ledger_writes = sum(1 for c in slice_calls if c.operation.startswith("ledger_"))
    run.refused = sum(fake.throttle.refused.values()) if fake.throttle else 0
    run.deregister_calls.update(
        str(c.params["ImageId"]) for c in slice_calls if c.operation == "deregister_image"
    )
    run.deregistered = len(due_ids & set(fake.deregistered))
    run.remaining = len(fake.images)
    run.notifications = sum(len(sent) for sent in queues.published.values())
    run.wall = time.perf_counter() - started
    return run
