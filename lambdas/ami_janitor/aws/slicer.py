"""The edge of a run's slices: queued to the work queue, and each run where its worker is.

A slice reads its AMIs again when it starts (a few calls: DescribeImages by id and by the snapshots
they use, their ledger items, DescribeImageReferences and what it may not find: the reference sources
it does not look at and the SSM parameters changed since the plan; or every reference source where
that API is not offered), holds back any AMI a fresh fact puts in doubt
(core.slices.hold_reason), and takes the others' stages through the executor, on the view of its own
AMIs and of every other AMI that shares their snapshots (a snapshot another AMI uses is never
deleted). Deleting nothing it did not read is what keeps a partial view safe here. The launch
permissions a stage reads are judged again too (core.slices.share_hold): a share made since the plan
that rule 5 keeps holds the AMI back there.
"""

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from datetime import datetime
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict

from ami_janitor.aws import executor, runs, usage
from ami_janitor.aws.errors import error_text
from ami_janitor.aws.executor import ActionResult
from ami_janitor.aws.inventory import image_references, ledger_items
from ami_janitor.aws.inventory.image_references import read_image_references
from ami_janitor.aws.inventory.images import images_where
from ami_janitor.aws.inventory.pointers import Pointers
from ami_janitor.aws.inventory.reading import SourceFailed, chunks, items, source
from ami_janitor.aws.inventory.reference_sources import REFERENCE_SOURCE_PERMISSIONS, read_reference_sources
from ami_janitor.aws.ledger import Ledger
from ami_janitor.core.model import (
    Image,
    LedgerView,
    ReceivedReport,
    Reference,
    RegionInventory,
    Stage,
    with_ledger,
)
from ami_janitor.core.policy import Policy
from ami_janitor.core.slices import (
    SliceItem,
    WorkSlice,
    done_before,
    hold_reason,
    share_hold,
    slice_digest,
)
from ami_janitor.core.usage import account_reason

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_sqs import SQSClient

    from ami_janitor.aws.clients import RegionClients

# What a slice reads before it acts, then what the executor calls.
READ_PERMISSIONS: list[str] = sorted(
    {"ec2:DescribeImages", "ec2:DescribeInstances"}
    | set(image_references.PERMISSIONS)
    | set(image_references.DEPENDENCIES)
    | set(REFERENCE_SOURCE_PERMISSIONS)
    | set(ledger_items.ITEM_PERMISSIONS)
)
PERMISSIONS: list[str] = sorted(
    set(READ_PERMISSIONS)
    | set(usage.READ_PERMISSIONS)
    | set(executor.STAGE_PERMISSIONS)
    | set(runs.PERMISSIONS)
)
# queue_run: the run's record, then the slices (SendMessageBatch is authorized as sqs:SendMessage,
# which comes with the queue).
QUEUE_PERMISSIONS: list[str] = list(runs.PERMISSIONS)

# AMIs in flight at once in the slice worker: each AMI's calls go one after another, so with one in
# flight a slice runs at one call's latency; a few keep its paced client at the token buckets' rate.
SLICE_WORKERS = 4
FILTER_VALUES_MAX = 200  # filter values per DescribeInstances call, all filters together
SEND_BATCH_MAX = 10  # SendMessageBatch entries
SEND_BATCH_BYTES = 1_048_576  # SendMessageBatch: the bodies of its messages together
_LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]


class SliceResult(BaseModel):
    """What one slice did: a result per stage (held-back AMIs' stages are skipped, with the reason)."""

    # Off the scheduled run's path: its validator is built when first used, not at each cold start.
    model_config = ConfigDict(defer_build=True)

    results: list[ActionResult] = []
    held: dict[str, str] = {}
    # The AMIs of a slice dropped whole (nothing read, nothing done), or that it had no time for.
    not_run: frozenset[str] = frozenset()

    def counts(self) -> dict[str, int]:
        return {
            "snapshots_deleted": sum(len(r.snapshots_deleted) for r in self.results),
            "actions_failed": sum(1 for r in self.results if r.status == "failed"),
            "held_back": len(self.held),
            "not_run": len(self.not_run),
        }


def _live(ec2: "EC2Client", instance_ids: Iterable[str]) -> set[str]:
    live: set[str] = set()
    # EC2's 200 filter values are a call's, the states' included.
    for batch in chunks(sorted(set(instance_ids)), FILTER_VALUES_MAX - len(_LIVE_STATES)):
        raws = items(
            ec2,
            "describe_instances",
            "Reservations",
            1000,
            Filters=[
                {"Name": "instance-id", "Values": list(batch)},
                {"Name": "instance-state-name", "Values": _LIVE_STATES},
            ],
        )
        live |= {str(i["InstanceId"]) for r in raws for i in r.get("Instances", [])}
    return live


class _Everyone:
    """Every instance counts as live until DescribeInstances says which are (see _references)."""

    def __contains__(self, item: object) -> bool:
        return True


def _references(
    clients: "RegionClients", policy: Policy, images: Sequence[Image], planned_at: datetime
) -> list[Reference]:
    """DescribeImageReferences about the slice's AMIs (an instance counts only while it is not
    terminated), and what it may not find, read again: a launch configuration, an Auto Scaling
    group's pinned template version, a fleet, a Batch compute environment, an EMR cluster or a
    plain-text SSM parameter made since the plan holds its AMI back. A family's Latest parameter
    counts too: the run's rotation pointed it at an AMI the plan keeps, so one it names now was
    pointed at since the plan (rule 2 keeps it). Where the API is not offered (some partitions, the
    emulator), every reference source is read again in full."""
    ids = [i.image_id for i in images]
    wanted = set(ids)
    none_owned = Pointers(names=frozenset(), owned=frozenset())
    found, not_offered = read_image_references(
        clients.ec2,
        clients.region,
        ids,
        known=(),
        pointers=none_owned,
        live_instances=_Everyone(),  # type: ignore[arg-type]
        parameter_names=frozenset(),
    )
    if not_offered:
        return [
            r for r in read_reference_sources(clients, policy, none_owned).references if r.image_id in wanted
        ]
    beside = read_reference_sources(
        clients, policy, none_owned, beside_image_references=planned_at
    ).references
    instance_ids = [r.resource_id for r in found if r.kind == "instance"]
    if instance_ids:
        with source("ec2:DescribeInstances"):
            live = _live(clients.ec2, instance_ids)
        found = [r for r in found if r.kind != "instance" or r.resource_id in live]
    seen = {(r.image_id, r.kind, r.resource_id) for r in found}
    return [
        *found,
        *(r for r in beside if r.image_id in wanted and (r.image_id, r.kind, r.resource_id) not in seen),
    ]


def read_slice(clients: "RegionClients", policy: Policy, work: WorkSlice) -> RegionInventory:
    """The slice's AMIs as they are now, with their ledger items and the other AMIs that share their
    snapshots. Raises SourceFailed (the slice is delivered again) when anything cannot be read."""
    ids = [item.image_id for item in work.items]
    with source("ec2:DescribeImages"):
        own = images_where(clients.ec2, clients.region, "image-id", ids)
        snapshots = [s for image in own for s in image.snapshot_ids]
        sharing = images_where(clients.ec2, clients.region, "block-device-mapping.snapshot-id", snapshots)
    with source("dynamodb:BatchGetItem"):
        view = ledger_items.read_ledger_items(clients, policy.ledger.table, ids)
    with source("ec2:DescribeImageReferences"):
        references = _references(clients, policy, own, work.planned_at)
    images = {i.image_id: i for i in [*sharing, *own]}
    # No copy's source is read: what holds an AMI back here is EC2's state and the ledger's clock, never
    # an AMI's age or order (the plan judged those).
    return with_ledger(
        RegionInventory(
            region=clients.region,
            images=tuple(sorted(images.values(), key=lambda i: i.image_id)),
            references=tuple(references),
            ledger=view or LedgerView(table=policy.ledger.table),
        )
    )


def run_slice(
    clients: "RegionClients",
    ledger: Ledger,
    policy: Policy,
    work: WorkSlice,
    now: datetime,
    *,
    out_of_time: Callable[[], bool] | None = None,
    workers: int = 1,
    side_by_side: executor.SideBySide | None = None,
) -> SliceResult:
    """Read the slice's AMIs again, hold back those a fresh fact puts in doubt, take the others'
    stages (until `out_of_time()`). Raises SourceFailed when its AMIs cannot be read (nothing was
    changed then)."""
    inventory = read_slice(clients, policy, work)
    images = {i.image_id: i for i in inventory.images}
    referenced: dict[str, list[str]] = {}
    for reference in inventory.references:
        referenced.setdefault(reference.image_id, []).append(reference.detail)
    reports = _consumer_reports(clients, policy, work)
    held: dict[str, str] = {}
    todo: list[tuple[str, Sequence[Stage], str | None]] = []
    recorded = inventory.ledger.items if inventory.ledger is not None else {}
    for item in work.items:
        image = images.get(item.image_id)
        done = done_before(item, recorded.get(item.image_id), work.planned_at) if image is None else None
        if done is not None:
            todo.append((item.image_id, item.stages, done))  # retired, not held back
            continue
        why = hold_reason(
            item, image, referenced.get(item.image_id, []), work.planned_at, policy, now
        ) or _usage_hold(item, work.region, reports, policy, now)
        if why is not None:
            held[item.image_id] = why
        todo.append((item.image_id, item.stages, f"{executor.HELD_BACK}{why}" if why else None))
    by_image = {item.image_id: item for item in work.items}

    def shares_keep(image: Image) -> str | None:
        return share_hold(by_image[image.image_id], image, policy)

    results = executor.apply_stages(
        clients.region,
        clients.ec2,
        ledger,
        inventory,
        todo,
        now,
        out_of_time=out_of_time,
        workers=workers,
        side_by_side=side_by_side,
        shares_keep=shares_keep,
    )
    # The stages that read launch permissions hold back what a share made since the plan keeps; the
    # AMIs the invocation had no time for are not run (the run's summary counts them).
    not_run: set[str] = set()
    for result in results:
        detail = result.detail or ""
        if result.status == "skipped" and detail.startswith(executor.HELD_BACK):
            held.setdefault(result.image_id, detail.removeprefix(executor.HELD_BACK))
        elif result.status == "skipped" and detail == executor.OUT_OF_TIME:
            not_run.add(result.image_id)
    return SliceResult(results=results, held=held, not_run=frozenset(not_run))


def _consumer_reports(
    clients: "RegionClients", policy: Policy, work: WorkSlice
) -> dict[str, ReceivedReport | None]:
    """The usage reports, read now, of the accounts the slice's shared AMIs are shared with."""
    settings = policy.usage_reports
    accounts = sorted({a for item in work.items for a in item.consumers})
    if settings is None or not accounts:
        return {}
    about = {item.image_id for item in work.items}
    return {a: usage.read_report(clients.s3, settings, a, work.region, about) for a in accounts}


def _usage_hold(
    item: SliceItem, region: str, reports: Mapping[str, ReceivedReport | None], policy: Policy, now: datetime
) -> str | None:
    """A shared AMI is held back when a consumer's report, read now, is missing, stale or unreadable, or
    says it is used: the disable stage's brownout never comes before every consumer's fresh word."""
    settings = policy.usage_reports
    if settings is None:
        return None
    for account in item.consumers:
        reason = account_reason(item.image_id, region, account, reports.get(account), settings, now)
        if reason is not None:
            return f"{reason}, since the plan"
    return None


def deduplication_id(work: WorkSlice) -> str:
    return hashlib.sha256(work.key.encode()).hexdigest()


def _send_batches(slices: Sequence[WorkSlice]) -> Iterator[list[tuple[WorkSlice, str]]]:
    """The slices with their message bodies, in order, in batches SendMessageBatch takes: at most ten
    messages, and at most 1 MiB of bodies together (a slice of 1,000 AMIs is about 130 KB)."""
    batch: list[tuple[WorkSlice, str]] = []
    size = 0
    for work in slices:
        body = work.model_dump_json()
        length = len(body.encode())
        if batch and (len(batch) == SEND_BATCH_MAX or size + length > SEND_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append((work, body))
        size += length
    if batch:
        yield batch


class SlicesNotQueued(RuntimeError):
    """SQS refused some of a run's slices; `queued`: the indexes of those it took (they will run)."""

    def __init__(self, message: str, queued: frozenset[int]) -> None:
        super().__init__(message)
        self.queued = queued


def enqueue_slices(sqs: "SQSClient", queue_url: str, slices: Sequence[WorkSlice]) -> int:
    """Queue the slices (a FIFO queue: one message group per region, so a region's slices run one
    after the other; deduplicated by slice, so queueing again within SQS's window adds nothing).
    Raises SlicesNotQueued when SQS refuses any, naming those it took: the run reports the others, and
    the next run plans them again."""
    queued: set[int] = set()
    for batch in _send_batches(slices):
        work = batch[0][0]
        try:
            answer = sqs.send_message_batch(
                QueueUrl=queue_url,
                Entries=[
                    {
                        "Id": str(part.index),
                        "MessageBody": body,
                        "MessageGroupId": part.region,
                        "MessageDeduplicationId": deduplication_id(part),
                    }
                    for part, body in batch
                ],
            )
        except (BotoCoreError, ClientError) as error:
            raise SlicesNotQueued(
                f"SQS refused slices of run {work.run} in {work.region}: {error_text(error)}",
                frozenset(queued),
            ) from error
        queued.update(int(entry["Id"]) for entry in answer.get("Successful") or [])
        failed = answer.get("Failed") or []
        if failed:
            first = failed[0]
            raise SlicesNotQueued(
                f"SQS refused {len(failed)} slice(s) of run {work.run} in {work.region}: "
                f"{first.get('Code')}: {first.get('Message')}",
                frozenset(queued),
            )
    return len(slices)


def queue_run(
    clients: "RegionClients",
    policy: Policy,
    queue_url: str,
    work: Sequence[WorkSlice],
    *,
    plan_summary: Mapping[str, int],
    counts: Mapping[str, int],
    now: datetime,
    event_id: str | None = None,
    invocation: str | None = None,
) -> int:
    """Record the run's slices in the ledger table (its summary waits for the last), then queue them.
    With `event_id` (a scheduled event's), once per event: RunRecordedBefore where a run of the same
    event claimed it first (`invocation`: Lambda's request id, runs.RunRecords.claim_event)."""
    if not work:
        return 0
    records = runs.RunRecords(
        clients.dynamodb, policy.ledger.table, retention_days=policy.ledger.retention_days
    )
    if event_id is not None:
        claimed = records.claim_event(clients.region, event_id, work[0].run, now, invocation)
        if claimed is not None:
            raise RunRecordedBefore(
                f"the scheduled event {event_id} was run before in {clients.region} (run {claimed}: Lambda "
                "runs a failed invocation again, or EventBridge delivered the event twice): that run "
                "records its slices and the caps hold per event, so none is queued again; the next "
                "scheduled run plans these AMIs again"
            )
    try:
        written = records.start(
            clients.region,
            work[0].run,
            slices=len(work),
            plan_summary=plan_summary,
            counts=counts,
            digests={part.index: slice_digest(part) for part in work},
            at=now,
        )
        if written != "recorded":
            raise RunRecordedBefore(
                f"run {work[0].run} in {clients.region} was recorded by another invocation started the "
                "same second (the schedule delivered twice): its slices do this run's work, so none is "
                "queued again"
            )
        return enqueue_slices(clients.sqs, queue_url, work)
    except Exception as error:
        # Nothing of this event queued: the claim is given back, for a retry of the event to queue (a
        # claim left by a run killed before it recorded its slices is taken over: claim_event).
        if event_id is not None and not getattr(error, "queued", None):
            with suppress(BotoCoreError, ClientError):  # the error that stopped the run is the one to report
                records.release_event(clients.region, event_id, work[0].run)
        raise


class RunRecordedBefore(RuntimeError):
    """Another invocation recorded a run of the same key (the same region and second), or of the same
    scheduled event, first."""


class SliceOutcome(BaseModel):
    """What the slice worker did with one slice, and the run's record after it."""

    # Off the scheduled run's path: its validator is built when first used, not at each cold start.
    model_config = ConfigDict(defer_build=True)

    region: str
    run: str
    index: int
    count: int
    results: list[ActionResult] = []
    held: dict[str, str] = {}
    dropped: str | None = None  # why the whole slice was not run
    progress: runs.RunProgress | None = None
    # This worker sends the run's summary: the run's last slice is done, and nobody sent it before.
    last: bool = False


def run_here(
    clients: "RegionClients", ledger: Ledger, policy: Policy, work: WorkSlice, now: datetime
) -> SliceResult:
    """A slice run in this process (the CLI's apply): a slice that cannot read its AMIs fails its
    stages, with the reason, and changes nothing."""
    try:
        return run_slice(clients, ledger, policy, work, now)
    except SourceFailed as failure:
        return SliceResult(
            results=[
                ActionResult(
                    region=work.region,
                    image_id=item.image_id,
                    action=stage,
                    status="failed",
                    error=str(failure),
                )
                for item in work.items
                for stage in item.stages
            ]
        )
