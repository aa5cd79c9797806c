"""Attacks by a member account on the usage inbox, where it may write only its own reports.

What a member writes there may make an owner keep more, never act: a report is believed only about the
account whose prefix holds it, and one the owner cannot read keeps what is shared with that account.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import boto3
from botocore.config import Config
from botocore.response import StreamingBody
from botocore.stub import Stubber

from ami_janitor.aws import usage
from ami_janitor.core.policy import UsageReports
from ami_janitor.core.usage import account_reason

REGION = "us-east-1"
MEMBER = "222222222222"
SHARED_AMI = "ami-00000000000000001"
INBOX = UsageReports(inbox="s3://usage-inbox/org")
NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


class PaddedReport:
    """A valid report that says "I use nothing", followed by `padding` bytes of blanks (still valid
    JSON): made as it is read, counting what was read."""

    def __init__(self, padding: int) -> None:
        self.head = (
            f'{{"version": 1, "account": "{MEMBER}", "region": "{REGION}", '
            f'"generated_at": "2026-11-25T02:00:00Z", "uses": {{}}}}'
        ).encode()
        self.size = len(self.head) + padding
        self.read_so_far = 0

    def read(self, amount: int | None = None) -> bytes:
        left = self.size - self.read_so_far
        count = left if amount is None else min(amount, left)
        start, self.read_so_far = self.read_so_far, self.read_so_far + count
        head = self.head[start : start + count]
        return head + b" " * (count - len(head))

    def close(self) -> None:
        pass


def test_a_report_too_large_to_read_keeps_what_is_shared_with_its_account(fake_aws_env: None) -> None:
    # A member writes a report of twice the largest an owner reads: were it read whole, every owner
    # run (and slice) reading it would run out of memory; it is refused unread, and kept as unreadable.
    raw = PaddedReport(padding=2 * usage.MAX_REPORT_BYTES)
    s3 = boto3.client("s3", region_name=REGION, config=Config(retries={"max_attempts": 1}))
    with Stubber(s3) as stub:
        stub.add_response(
            "get_object",
            {"Body": StreamingBody(raw, raw.size), "LastModified": NOW - timedelta(hours=1)},
            {"Bucket": "usage-inbox", "Key": f"org/reports/{MEMBER}/{REGION}.json"},
        )
        received = usage.read_report(s3, INBOX, MEMBER, REGION)

    assert received is not None
    assert received.problem is not None and "larger than 33,554,432 bytes: not read" in received.problem
    assert received.uses == {}
    assert raw.read_so_far <= usage.MAX_REPORT_BYTES + 1024 * 1024  # read no further than needed
    reason = account_reason(SHARED_AMI, REGION, MEMBER, received, INBOX, NOW)
    assert reason is not None and reason.endswith("kept (fail safe)"), reason
