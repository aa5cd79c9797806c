"""Records of an SQS batch made visible again sooner than the queue's visibility timeout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from ami_janitor.aws.errors import AWS_ERRORS, error_text
from ami_janitor.handlers.observe import logger

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

# The grant to call it comes with the function's own queue (infra.queues.consume_statement).


def change_visibility(
    sqs: SQSClient, queue_url: str, timeouts: Sequence[tuple[SQSRecord, int]], *, what: str
) -> None:
    """ChangeMessageVisibilityBatch: each record visible again after its seconds (a batch of these
    functions' event source mappings is at most ten records, as is this call). Where it fails, the
    queue's visibility timeout applies (logged, naming `what`)."""
    if not timeouts:
        return
    entries = [
        {"Id": str(n), "ReceiptHandle": record.receipt_handle, "VisibilityTimeout": seconds}
        for n, (record, seconds) in enumerate(timeouts)
    ]
    try:
        answer = sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)  # type: ignore[arg-type]
    except AWS_ERRORS as error:
        logger.warning(f"{what} not made visible again", extra={"error": error_text(error)})
        return
    if answer.get("Failed"):
        logger.warning(f"{what} not made visible again", extra={"failed": answer["Failed"]})
