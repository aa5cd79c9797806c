"""EC2 AMI State Change events: rotate the Latest pointer of the group the AMI belongs to.

EventBridge puts the region's events on a FIFO queue, one message group, so the function takes them
one batch at a time: two rotations never race on a Latest tag. (A reserved concurrency of 1 did that
before; a new account's Lambda quota of 10 refuses any reservation, and it would throttle the queue's
poller.) Every record of a batch is tried: the handler converges on EC2's state, whatever order the
events come in. A record that fails, or that the invocation has no time left for, is made visible again
soon (a failed one after a growing wait): the queue's visibility timeout would otherwise hold the one
message group, and every event after it, for half an hour. After 5 deliveries a record goes to the
dead-letter queue, which alarms.
"""

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from ami_janitor.handlers import SQS_WORKER_MODULES, loading

with loading(*SQS_WORKER_MODULES):
    from aws_lambda_powertools.metrics import MetricUnit, single_metric
    from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
    from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
    from aws_lambda_powertools.utilities.typing import LambdaContext
    from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

    from ami_janitor import engine
    from ami_janitor.aws import copier
    from ami_janitor.aws.clients import ClientFactory, RegionClients
    from ami_janitor.aws.rotator import AmiEventOutcome, NotYet
    from ami_janitor.core.model import AMI_ID_PATTERN, AmiState
    from ami_janitor.core.policy import Policy
    from ami_janitor.handlers.events import (
        METRICS_NAMESPACE,
        SERVICE,
        BadEvent,
        Environment,
        check_sqs_batch,
        configured,
        parse_event,
    )
    from ami_janitor.handlers.observe import logger, metrics
    from ami_janitor.handlers.visibility import change_visibility

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

# No queued event is started with less than this left of the invocation (an event that reads a large
# region takes tens of seconds): the records left come again at once, where a timeout would deliver the
# records already handled again too, and a batch that never fits would end in the dead-letter queue.
RESERVE_MILLIS = 90_000
# A failed record is tried again after this many seconds times its deliveries so far (1, 2, 3 minutes...).
RETRY_AFTER_SECONDS = 60
MAX_RETRY_AFTER = 900  # (SQS takes up to 12 hours; the queue's own timeout is 30 minutes)


class OutOfTime(RuntimeError):
    """Too little of the invocation is left to start the next queued event."""


# Here rather than with the other events (handlers.events): Powertools' parser models, which
# EventBridgeModel loads, would otherwise be imported by every handler's cold start.
class AmiStateDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    ImageId: str = Field(pattern=AMI_ID_PATTERN)
    State: AmiState
    RequestId: str | None = None
    ErrorMessage: str | None = None


class AmiStateChangeEvent(EventBridgeModel):
    # EventBridge's time always carries its zone (`Z`); one without is no event of EC2's, and it is
    # compared with the clock (the wait for a builder's tags, the ledger's record of a stage).
    time: AwareDatetime
    source: Literal["aws.ec2"]
    detail_type: Literal["EC2 AMI State Change"] = Field(alias="detail-type")
    detail: AmiStateDetail


def parse_ami_event(raw: object) -> AmiStateChangeEvent:
    return parse_event(AmiStateChangeEvent, raw, "EC2 AMI State Change event")


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """The records of the region's AMI event queue; or one event, invoked by hand."""
    env, policy = configured()
    clients = ClientFactory()(env.region)
    if isinstance(event, dict) and "Records" in event:
        check_sqs_batch(event, "AMI event queue")
        metrics.add_metric(name="AmiEventsReceived", unit=MetricUnit.Count, value=len(event["Records"]))
        return handle_records(event, env, policy, clients, context)
    metrics.add_metric(name="AmiEventsReceived", unit=MetricUnit.Count, value=1)
    return handle_state_change(parse_ami_event(event), env, policy, clients)


def handle_records(
    event: dict[str, Any], env: Environment, policy: Policy, clients: RegionClients, context: LambdaContext
) -> dict[str, Any]:
    """Every record of the batch, in order; those to try again are made visible again soon."""
    deferred: set[str] = set()

    def record_handler(record: SQSRecord) -> dict[str, Any]:
        if context.get_remaining_time_in_millis() < RESERVE_MILLIS:
            # Not an error of the event: it comes again at once, in a fresh invocation.
            deferred.add(record.message_id)
            raise OutOfTime(f"{record.message_id} left for the next invocation")
        return handle_record(record, env, policy, clients)

    # Not raised when every record fails: their visibility is set below all the same.
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    answer = process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
    again = {failure["itemIdentifier"] for failure in answer["batchItemFailures"]}
    if again and env.ami_events_queue_url:
        records = [SQSRecord(raw) for raw in event["Records"] if raw["messageId"] in again]
        retry_soon(clients.sqs, env.ami_events_queue_url, records, deferred)
    if deferred:
        logger.info("AMI events left for the next invocation", extra={"message_ids": sorted(deferred)})
    return dict(answer)


def handle_record(
    record: SQSRecord, env: Environment, policy: Policy, clients: RegionClients
) -> dict[str, Any]:
    """One queued event; what fails is logged with the message (the record is delivered again)."""
    try:
        return handle_state_change(parse_ami_event(json.loads(record.body)), env, policy, clients)
    except NotYet as waiting:
        # Not a failure: tried again in a minute or two (past the queue's deliveries, the dead-letter queue).
        logger.info(
            "AMI event waits for its AMI", extra={"message_id": record.message_id, "why": str(waiting)}
        )
        raise
    except Exception:
        receives = record.attributes.approximate_receive_count
        logger.exception(
            "AMI event failed", extra={"message_id": record.message_id, "receive_count": receives}
        )
        metrics.add_metric(name="AmiEventsFailed", unit=MetricUnit.Count, value=1)
        raise


def retry_soon(sqs: "SQSClient", queue_url: str, records: list[SQSRecord], deferred: set[str]) -> None:
    """A deferred record visible again at once, a failed one after RETRY_AFTER_SECONDS times its
    deliveries."""
    change_visibility(
        sqs,
        queue_url,
        [
            (
                record,
                0
                if record.message_id in deferred
                else min(
                    RETRY_AFTER_SECONDS * int(record.attributes.approximate_receive_count), MAX_RETRY_AFTER
                ),
            )
            for record in records
        ],
        what="AMI events",
    )


def handle_state_change(
    ami_event: AmiStateChangeEvent, env: Environment, policy: Policy, clients: RegionClients
) -> dict[str, Any]:
    detail = ami_event.detail
    # Each region's stack handles its own region's AMIs (EventBridge delivers no other): an event
    # naming another region, invoked by hand, is refused rather than acted on there.
    if ami_event.region != env.region:
        raise BadEvent(f"the event is of region {ami_event.region}; this function handles {env.region}")
    queue = env.replication_queue_url
    outcome = engine.handle_ami_event(
        detail.ImageId,
        detail.State,
        clients,
        policy,
        datetime.now(UTC).replace(microsecond=0),
        enqueue=(lambda copies: copier.enqueue_copies(clients.sqs, queue, copies)) if queue else None,
        sent=ami_event.time,
    )
    # One metric each, with its State dimension (a batch's metrics flush together, under one dimension set).
    names = ["AmiStateChanges", "AmiFailedEvents"] if detail.State == "failed" else ["AmiStateChanges"]
    for name in names:
        with single_metric(
            name=name,
            unit=MetricUnit.Count,
            value=1,
            namespace=METRICS_NAMESPACE,
            default_dimensions={"service": SERVICE, "State": detail.State},
        ):
            pass
    if detail.State == "failed":
        logger.warning("AMI failed", extra={"image_id": detail.ImageId, "error": detail.ErrorMessage})
    answer = outcome.model_dump(mode="json")
    log = logger.debug if outcome.outcome == "ignored" else logger.info
    log("AMI state change handled", extra=answer)
    refused = [r.error for r in outcome.rotations if r.refused]
    if refused:
        # Not tried again (it would fail the same way): counted where the scheduled run counts it, which alarms.
        logger.warning("Latest parameter refused", extra={"image_id": detail.ImageId, "refused": refused})
        metrics.add_metric(name="ActionsFailed", unit=MetricUnit.Count, value=len(refused))
    unfinished = unfinished_work(outcome)
    if unfinished:
        # Failed, the event is delivered again (each step is idempotent), then lands in the
        # queue's dead-letter queue, which alarms; the scheduled run reconciles whatever is left.
        raise RuntimeError(f"AMI {detail.ImageId}: " + "; ".join(unfinished))
    return answer


def unfinished_work(outcome: AmiEventOutcome) -> list[str]:
    """What a new source's sharing and copying left undone that trying again may finish (a rotation that
    fails raises itself). A share refused for good (no ledger table, image block public access refusing
    the public group) is in the answer and its log, and waits for its cause to be fixed: retried, it
    would only fail the same way into the dead-letter queue."""
    unfinished = [
        f"sharing failed: {s.error or s.detail or 'unknown'}"
        for s in outcome.shared
        if s.status == "failed" and s.passing
    ]
    if outcome.copies_not_queued:
        unfinished.append(f"{outcome.copies_not_queued} of its copies not queued")
    return unfinished
