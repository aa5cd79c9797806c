"""What Lambda hands a handler in the tests: a context and the events of its sources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Context:
    function_name: str = "ami-janitor-test"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:ami-janitor-test"
    aws_request_id: str = "c6af9ac6-7b61-11e6-9a41-93e812345678"
    remaining_millis: int = 900_000

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_millis


def sqs_record(
    body: str,
    *,
    message_id: str,
    queue_arn: str,
    region: str = "us-east-1",
    group: str | None = None,
    receive_count: int = 1,
) -> dict[str, Any]:
    """One record of an SQS event source mapping's event (a FIFO queue's when `group`), delivered for
    the `receive_count`th time."""
    fifo = (
        {"MessageGroupId": group, "MessageDeduplicationId": "dedup", "SequenceNumber": "1"} if group else {}
    )
    return {
        "messageId": message_id,
        "receiptHandle": f"handle-{message_id}",
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": str(receive_count),
            "SentTimestamp": "1764039600000",
            "SenderId": "AIDAEXAMPLE",
            "ApproximateFirstReceiveTimestamp": "1764039600001",
            **fifo,
        },
        "messageAttributes": {},
        "md5OfBody": "0" * 32,
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    }


def sqs_event(
    *bodies: str, queue_arn: str, region: str = "us-east-1", group: str | None = None, receive_count: int = 1
) -> dict[str, Any]:
    """An SQS event source mapping's event with these message bodies."""
    return {
        "Records": [
            sqs_record(
                body,
                message_id=f"message-{n}",
                queue_arn=queue_arn,
                region=region,
                group=group,
                receive_count=receive_count,
            )
            for n, body in enumerate(bodies)
        ]
    }
