"""SQS queues as every queue of the stack is made (SQS-managed encryption, TLS only), and their consumers."""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from infra.permissions import Statement


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


# What a Lambda event source mapping does on its queue with the function's role.
CONSUME_ACTIONS = ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes")


def consume_statement(sid: str, queue: sqs.IQueue, *more: str) -> Statement:
    """The function's grant to consume `queue` (and `more` actions of its own on it)."""
    return Statement(sid, (*CONSUME_ACTIONS, *more), (queue.queue_arn,))


def consume(
    scope: Construct,
    id: str,
    *,
    function: lambda_.IFunction,
    queue: sqs.IQueue,
    batch_size: int,
    max_concurrency: int,
) -> lambda_.EventSourceMapping:
    """`function` consumes `queue`, reporting the records that failed (the others are deleted)."""
    return lambda_.EventSourceMapping(
        scope,
        id,
        target=function,
        event_source_arn=queue.queue_arn,
        batch_size=batch_size,
        max_concurrency=max_concurrency,
        report_batch_item_failures=True,
    )
