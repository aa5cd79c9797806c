"""SQS queues as every queue of the stack is made: SQS-managed encryption, TLS only."""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_sqs as sqs
from constructs import Construct


def secure_queue(
    scope: Construct,
    id: str,
    *,
    visibility_timeout: Duration | None = None,
    dead_letter_queue: sqs.DeadLetterQueue | None = None,
    fifo: bool | None = None,
    content_based_deduplication: bool | None = None,
    queue_name: str | None = None,
) -> sqs.Queue:
    return sqs.Queue(
        scope,
        id,
        fifo=fifo,
        content_based_deduplication=content_based_deduplication,
        queue_name=queue_name,
        encryption=sqs.QueueEncryption.SQS_MANAGED,
        enforce_ssl=True,
        # Dead letters wait for a person: keep them as long as SQS allows.
        retention_period=Duration.days(14),
        visibility_timeout=visibility_timeout,
        dead_letter_queue=dead_letter_queue,
    )
