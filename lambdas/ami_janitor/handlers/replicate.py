"""The replication worker: copy requests from the SQS queue, each started with CopyImage in its
destination region.

One failed record does not fail the batch: it is reported as a batch item failure, SQS delivers it
again and, after the queue's maxReceiveCount, parks it in the dead-letter queue (which alarms).
A request is rebuilt from the policy before it runs (engine.start_requested_copy): one the policy
would not make, or a body that is no copy request at all, is refused the same way, with the reason in
the log and the CopyRequestsRefused metric. A request that fails (CopyImage, or a read before it) is
logged with its error at each delivery and counted in CopiesFailed.
Records are handled one after the other: CopyImage refills at one request per second per region, and
the event source mapping's bounded concurrency paces the rest. No record is started with less than
RESERVE_MILLIS of the invocation left, where a timeout would lose the batch's answer and deliver its
records again, those done too, each delivery counting toward the dead-letter queue. The records left
are sent again to the queue as new messages and acknowledged: every receive of a message counts toward
the dead-letter queue, and a request left untried delivery after delivery (behind slow copies, under
throttling) would be parked there never tried; a new message's count starts afresh. A copy request is
safe to repeat (a duplicate makes no second copy). A record not sent again is made visible again at
once, a batch item failure as before.
"""

from typing import TYPE_CHECKING, Any

from ami_janitor.handlers import SQS_WORKER_MODULES, loading

with loading(*SQS_WORKER_MODULES):
    from aws_lambda_powertools.metrics import MetricUnit
    from aws_lambda_powertools.utilities.batch import (
        BatchProcessor,
        EventType,
        ExceptionInfo,
        FailureResponse,
        process_partial_response,
    )
    from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
    from aws_lambda_powertools.utilities.parser.models import SqsRecordModel
    from aws_lambda_powertools.utilities.typing import LambdaContext
    from pydantic import Json, ValidationError

    from ami_janitor import engine
    from ami_janitor.aws.clients import ClientFactory
    from ami_janitor.aws.errors import error_text
    from ami_janitor.aws.ledger import LedgerMissing
    from ami_janitor.core import replication
    from ami_janitor.core.policy import Policy
    from ami_janitor.core.validation import describe_validation_error
    from ami_janitor.handlers.events import check_sqs_batch, configured
    from ami_janitor.handlers.observe import logger, metrics
    from ami_janitor.handlers.visibility import change_visibility

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

# A refused message's body is logged up to this many characters (the reason says what was wrong).
MESSAGE_LOGGED_MAX = 2048
# No record is started with less than this left of the invocation: one request's calls, a throttled
# CopyImage backing off through the SDK's adaptive retries (up to 111 s over its 10 attempts), then its
# ledger writes.
RESERVE_MILLIS = 120_000
# A request sent again for want of time is delivered after this many seconds: CopyImage's bucket, which
# slowed the batch, refills meanwhile (one request per second).
SEND_AGAIN_DELAY_SECONDS = 10


class OutOfTime(RuntimeError):
    """Too little of the invocation is left to start the next copy request."""


class CopyFailed(RuntimeError):
    """A copy that could not be started: the record is redriven."""


class CopyRequestRecord(SqsRecordModel):
    """A record of the replication queue: its body is a copy request's JSON."""

    body: Json[replication.CopyRequest]


def report_refused(message_id: str, receive_count: str, reason: str, request: dict[str, Any]) -> None:
    """Say why a request is refused, on every delivery (the last one is the message the DLQ keeps)."""
    logger.error(
        "copy request refused",
        extra={
            "reason": reason,
            "request": request,
            "message_id": message_id,
            "receive_count": receive_count,
        },
    )
    metrics.add_metric(name="CopyRequestsRefused", unit=MetricUnit.Count, value=1)


class CopyRequestBatch(BatchProcessor):
    """The queue's batches. A record that is no copy request fails validation before the record handler
    sees it: Powertools reports it failed as the plain SQS record; here it is refused, with the reason."""

    def failure_handler(self, record: Any, exception: ExceptionInfo) -> FailureResponse:
        error = exception[1]
        if isinstance(error, ValidationError) and isinstance(record, SQSRecord):
            report_refused(
                record.message_id,
                record.attributes.approximate_receive_count,
                f"bad copy request: {describe_validation_error(error)}",
                {"body": record.body[:MESSAGE_LOGGED_MAX]},
            )
        return super().failure_handler(record, exception)


def copy_record(record: CopyRequestRecord, policy: Policy, clients_for: ClientFactory) -> dict[str, Any]:
    """One queued copy request, started (or refused: RefusedCopy; or failed: CopyFailed)."""
    try:
        result = engine.start_requested_copy(record.body, policy, clients_for)
    except replication.RefusedCopy as error:
        report_refused(
            record.messageId,
            record.attributes.ApproximateReceiveCount,
            error.reason,
            error.request.model_dump(mode="json"),
        )
        # Raised, the record is a batch item failure: redriven, it ends in the dead-letter queue.
        raise
    except LedgerMissing as error:
        # No copy the ledgers cannot record: redriven until the table exists (or parked in the DLQ).
        metrics.add_metric(name="CopiesFailed", unit=MetricUnit.Count, value=1)
        logger.error("copy refused: no ledger table", extra={"reason": str(error), "regions": error.regions})
        raise CopyFailed(str(error)) from None
    except Exception as error:
        # Anything else before CopyImage (the source, its ledger item or its copies unreadable now:
        # throttled past the retries, a 5xx, an answer or an item that cannot be read): a failed copy,
        # tried again with the message. Said here, at each delivery: the batch processor marks the
        # record failed and logs nothing, so the dead letter would come with no reason anywhere.
        metrics.add_metric(name="CopiesFailed", unit=MetricUnit.Count, value=1)
        logger.warning(
            "copy failed",
            extra={
                "message_id": record.messageId,
                "receive_count": record.attributes.ApproximateReceiveCount,
                "request": record.body.model_dump(mode="json"),
                "error": f"{type(error).__name__}: {error_text(error)}",
            },
        )
        raise CopyFailed(
            f"copy of {record.body.source_image_id} ({record.body.source_region}) to {record.body.region} "
            f"failed: {error_text(error)}"
        ) from error
    outcome = result.model_dump(mode="json")
    if result.status == "failed":
        metrics.add_metric(name="CopiesFailed", unit=MetricUnit.Count, value=1)
        logger.warning("copy failed", extra=outcome)
        raise CopyFailed(
            f"copy of {result.source_image_id} ({result.source_region}) to {result.region} failed: {result.error}"
        )
    metrics.add_metric(
        name="CopiesStarted" if result.started else "CopiesSkipped", unit=MetricUnit.Count, value=1
    )
    logger.info("copy handled", extra=outcome)
    return outcome


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    check_sqs_batch(event, "replication queue")
    env, policy = configured()
    if policy.mode != "enforce":
        # The kill switch (paused) or a dry-run policy: nothing is copied. The messages are consumed;
        # the next reconcile in enforce mode plans whatever is still missing.
        dropped = len(event["Records"])
        logger.warning(
            "policy mode is not enforce: copy requests dropped",
            extra={"mode": policy.mode, "dropped": dropped},
        )
        metrics.add_metric(name="CopyRequestsDropped", unit=MetricUnit.Count, value=dropped)
        return {"batchItemFailures": []}
    factory = ClientFactory()
    deferred: set[str] = set()

    def record_handler(record: CopyRequestRecord) -> dict[str, Any]:
        if context.get_remaining_time_in_millis() < RESERVE_MILLIS:
            # Not a failure of the request: it comes again at once, in a fresh invocation.
            deferred.add(record.messageId)
            raise OutOfTime(f"{record.messageId} left for the next invocation")
        return copy_record(record, policy, factory)

    # A batch whose every record failed is answered like any other (each record a batch item failure),
    # not raised: a batch of one refused request is common, and SQS redrives either way (after the
    # visibility timeout, which paces the retries).
    processor = CopyRequestBatch(
        event_type=EventType.SQS, model=CopyRequestRecord, raise_on_entire_batch_failure=False
    )
    answer = process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
    if deferred:
        logger.info("copy requests left for the next invocation", extra={"message_ids": sorted(deferred)})
        if env.replication_queue_url:
            left = [SQSRecord(raw) for raw in event["Records"] if raw["messageId"] in deferred]
            sent = send_again(factory(env.region).sqs, env.replication_queue_url, left)
            answer = {
                "batchItemFailures": [
                    f for f in answer["batchItemFailures"] if f["itemIdentifier"] not in sent
                ]
            }
    return answer


def send_again(sqs: "SQSClient", queue_url: str, left: list[SQSRecord]) -> set[str]:
    """The records left for the next invocation, sent again to the queue as new messages with the same
    bodies; returns the message ids of those sent (acknowledged, the originals are deleted). Those not
    sent are made visible again at once (delivered again, that delivery counted)."""
    from ami_janitor.aws import copier

    taken = copier.send_again(sqs, queue_url, [r.body for r in left], delay_seconds=SEND_AGAIN_DELAY_SECONDS)
    sent = {left[n].message_id for n in taken}
    kept = [r for r in left if r.message_id not in sent]
    if kept:
        logger.warning(
            "copy requests not sent again: made visible again",
            extra={"message_ids": sorted(r.message_id for r in kept)},
        )
        change_visibility(sqs, queue_url, [(r, 0) for r in kept], what="copy requests")
    return sent
