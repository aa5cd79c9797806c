"""The replication worker: copy requests from the SQS queue, each started with CopyImage in its
destination region.

One failed record does not fail the batch: it is reported as a batch item failure, SQS delivers it
again and, after the queue's maxReceiveCount, parks it in the dead-letter queue (which alarms).
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

from ami_janitor import adapter, replication
from ami_janitor.clients import ClientFactory, RegionClients
from ami_janitor.events import Environment
from ami_janitor.policy import Policy, load_policy

# adapter.describe_image reads the source (ec2:DescribeImages, already in replication.PERMISSIONS);
# the KMS actions are what EC2 does with a target's key on this role's behalf.
PERMISSIONS: list[str] = sorted(set(replication.PERMISSIONS) | set(replication.KMS_PERMISSIONS))

logger = Logger()
metrics = Metrics()


class CopyFailed(RuntimeError):
    """A copy that could not be started: the record is redriven."""


def copy_record(
    record: SQSRecord, policy: Policy, clients_for: Callable[[str], RegionClients]
) -> dict[str, Any]:
    """One queued copy request: read the source as EC2 describes it now, then start the copy."""
    copy = replication.copy_from_message(record.body)
    source = adapter.describe_image(clients_for(copy.source_region), copy.source_image_id)
    if source is None:
        # Deregistered since the request was queued: retrying cannot help.
        logger.info("source gone: nothing to copy", extra=copy.model_dump(mode="json"))
        metrics.add_metric(name="CopiesSkipped", unit=MetricUnit.Count, value=1)
        return {"status": "skipped", "detail": "source gone", **copy.model_dump(mode="json")}
    result = replication.start_copy(clients_for, copy, source, policy)
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
    processor = BatchProcessor(event_type=EventType.SQS)

    def handle(record: SQSRecord) -> dict[str, Any]:
        return copy_record(record, policy, factory)

    return dict(
        process_partial_response(event=event, record_handler=handle, processor=processor, context=context)
    )
