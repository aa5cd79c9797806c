"""EC2 AMI State Change events: rotate the Latest pointer of the group the AMI belongs to.

EventBridge puts the region's events on a FIFO queue, one message group, so the function takes them
one batch at a time and in order: two rotations never race on a Latest tag. (A reserved concurrency of 1
did that before; a new account's Lambda quota of 10 refuses any reservation, and it would throttle the
queue's poller into the dead-letter queue.) A record that fails fails the records after it: SQS delivers
them again, in order, and parks a record that failed 3 times in the dead-letter queue, which alarms.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from ami_janitor.handlers import collector_paused

with collector_paused():
    from aws_lambda_powertools.metrics import MetricUnit
    from aws_lambda_powertools.utilities.batch import SqsFifoPartialProcessor, process_partial_response
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
    from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
    from aws_lambda_powertools.utilities.typing import LambdaContext
    from pydantic import BaseModel, ConfigDict, Field

    from ami_janitor import engine
    from ami_janitor.aws import copier
    from ami_janitor.aws.clients import ClientFactory
    from ami_janitor.aws.rotator import AmiEventOutcome
    from ami_janitor.core.model import AMI_ID_PATTERN, AmiState
    from ami_janitor.core.policy import Policy
    from ami_janitor.handlers.events import BadEvent, Environment, configured, parse_event
    from ami_janitor.handlers.observe import logger, metrics

PERMISSIONS: list[str] = engine.EVENT_PERMISSIONS
# No queued event is started with less than this left of the invocation (an event that reads a large
# region takes tens of seconds): the rest of the batch comes again, where a timeout would deliver the
# records already handled again too, and a batch that never fits would end in the dead-letter queue.
RESERVE_MILLIS = 90_000


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
    source: Literal["aws.ec2"]
    detail_type: Literal["EC2 AMI State Change"] = Field(alias="detail-type")
    detail: AmiStateDetail


def parse_ami_event(raw: object) -> AmiStateChangeEvent:
    return parse_event(AmiStateChangeEvent, raw, "EC2 AMI State Change event")


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """The records of the region's AMI event queue, in order; or one event, invoked by hand."""
    env, policy = configured()
    if isinstance(event, dict) and "Records" in event:
        return dict(
            process_partial_response(
                event=event,
                record_handler=lambda record: handle_record(record, env, policy, context),
                processor=SqsFifoPartialProcessor(),
                context=context,
            )
        )
    return handle_state_change(parse_ami_event(event), env, policy)


def handle_record(
    record: SQSRecord, env: Environment, policy: Policy, context: LambdaContext
) -> dict[str, Any]:
    """One queued event; what fails is logged with the message (the record is delivered again)."""
    if context.get_remaining_time_in_millis() < RESERVE_MILLIS:
        # Not an error of the event: it and those after it come again, in order, in a fresh invocation.
        logger.info("AMI event left for the next invocation", extra={"message_id": record.message_id})
        raise OutOfTime(f"{record.message_id} left for the next invocation")
    try:
        return handle_state_change(parse_ami_event(json.loads(record.body)), env, policy)
    except Exception:
        receives = record.attributes.approximate_receive_count
        logger.exception(
            "AMI event failed", extra={"message_id": record.message_id, "receive_count": receives}
        )
        metrics.add_metric(name="AmiEventsFailed", unit=MetricUnit.Count, value=1)
        raise


def handle_state_change(ami_event: AmiStateChangeEvent, env: Environment, policy: Policy) -> dict[str, Any]:
    detail = ami_event.detail
    # Each region's stack handles its own region's AMIs (EventBridge delivers no other): an event
    # naming another region, invoked by hand, is refused rather than acted on there.
    if ami_event.region != env.region:
        raise BadEvent(f"the event is of region {ami_event.region}; this function handles {env.region}")
    clients = ClientFactory()(env.region)
    queue = env.replication_queue_url
    outcome = engine.handle_ami_event(
        detail.ImageId,
        detail.State,
        clients,
        policy,
        datetime.now(UTC).replace(microsecond=0),
        enqueue=(lambda copies: copier.enqueue_copies(clients.sqs, queue, copies)) if queue else None,
    )
    metrics.add_metric(name="AmiStateChanges", unit=MetricUnit.Count, value=1)
    if detail.State == "failed":
        metrics.add_metric(name="AmiFailedEvents", unit=MetricUnit.Count, value=1)
        logger.warning("AMI failed", extra={"image_id": detail.ImageId, "error": detail.ErrorMessage})
    answer = outcome.model_dump(mode="json")
    log = logger.debug if outcome.outcome == "ignored" else logger.info
    log("AMI state change handled", extra=answer)
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
