"""The replication worker: copy requests from the SQS queue, each started with CopyImage in its
destination region.

One failed record does not fail the batch: it is reported as a batch item failure, SQS delivers it
again and, after the queue's maxReceiveCount, parks it in the dead-letter queue (which alarms).
A request is rebuilt from the policy before it runs (replication.rebuild_copy): one the policy would
not make is refused the same way, with the reason in the log and the CopyRequestsRefused metric.
Records are handled one after the other: CopyImage refills at one request per second per region, and
the event source mapping's bounded concurrency paces the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from ami_janitor.aws import copier, inventory
from ami_janitor.aws.clients import ClientFactory, RegionClients
from ami_janitor.core import replication
from ami_janitor.core.policy import Policy, load_policy
from ami_janitor.handlers.events import Environment

# inventory.describe_image reads the source (ec2:DescribeImages, already in copier.PERMISSIONS);
# the KMS actions are what EC2 does with a target's key on this role's behalf.
PERMISSIONS: list[str] = sorted(set(copier.PERMISSIONS) | set(copier.KMS_PERMISSIONS))

# A refused message's body is logged up to this many characters (the reason says what was wrong).
MESSAGE_LOGGED_MAX = 2048

logger = Logger()
metrics = Metrics()


class CopyFailed(RuntimeError):
    """A copy that could not be started: the record is redriven."""


def copy_record(
    record: SQSRecord, policy: Policy, clients_for: Callable[[str], RegionClients]
) -> dict[str, Any]:
    """One queued copy request: rebuilt from the policy and the source as EC2 describes it now, then
    started. The request only says which copy; what is copied and with which key is the policy's."""
    request = replication.copy_from_message(record.body)
    # Checked before any AWS call: no client is made for a region the policy does not name.
    replication.allowed_target(request, policy)
    source = inventory.describe_image(clients_for(request.source_region), request.source_image_id)
    if source is None:
        # Deregistered since the request was queued: retrying cannot help.
        logger.info("source gone: nothing to copy", extra=request.model_dump(mode="json"))
        metrics.add_metric(name="CopiesSkipped", unit=MetricUnit.Count, value=1)
        return {"status": "skipped", "detail": "source gone", **request.model_dump(mode="json")}
    existing = copier.find_copies(clients_for(request.region).ec2, source.image_id, request.region)
    copy = replication.rebuild_copy(request, source, policy, existing)
    result = copier.start_copy(clients_for, copy, source, policy, existing)
    outcome = result.model_dump(mode="json")
    if result.status == "failed":
        metrics.add_metric(name="CopiesFailed", unit=MetricUnit.Count, value=1)
        logger.warning("copy failed", extra=outcome)
        raise CopyFailed(
            f"copy of {copy.source_image_id} ({copy.source_region}) to {copy.region} failed: {result.error}"
        )
    metrics.add_metric(
        name="CopiesStarted" if result.started else "CopiesSkipped", unit=MetricUnit.Count, value=1
    )
    logger.info("copy handled", extra=outcome)
    return outcome


def report_refused(record: SQSRecord, error: replication.BadCopyMessage) -> None:
    """Say why a request is refused, on every delivery (the last one is the message the DLQ keeps)."""
    if isinstance(error, replication.RefusedCopy):
        reason, request = error.reason, error.request.model_dump(mode="json")
    else:  # not even a copy request: its body is all there is to show
        reason, request = str(error), {"body": record.body[:MESSAGE_LOGGED_MAX]}
    logger.error(
        "copy request refused",
        extra={
            "reason": reason,
            "request": request,
            "message_id": record.message_id,
            "receive_count": record.attributes.approximate_receive_count,
        },
    )
    metrics.add_metric(name="CopyRequestsRefused", unit=MetricUnit.Count, value=1)


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    env = Environment.load()
    policy = load_policy(env.config)
    if policy.mode != "enforce":
        # The kill switch (paused) or a dry-run policy: nothing is copied. The messages are consumed;
        # the next reconcile in enforce mode plans whatever is still missing.
        dropped = len(event.get("Records") or [])
        logger.warning(
            "policy mode is not enforce: copy requests dropped",
            extra={"mode": policy.mode, "dropped": dropped},
        )
        metrics.add_metric(name="CopyRequestsDropped", unit=MetricUnit.Count, value=dropped)
        return {"batchItemFailures": []}
    factory = ClientFactory()
    # A batch whose every record failed is answered like any other (each record a batch item failure),
    # not raised: a batch of one refused request is common, and SQS redrives either way (after the
    # visibility timeout, which paces the retries).
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

    def handle(record: SQSRecord) -> dict[str, Any]:
        try:
            return copy_record(record, policy, factory)
        except replication.BadCopyMessage as error:
            report_refused(record, error)
            # Raised, the record is a batch item failure: redriven, it ends in the dead-letter queue.
            raise

    return dict(
        process_partial_response(event=event, record_handler=handle, processor=processor, context=context)
    )
