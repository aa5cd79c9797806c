"""The reads a run makes side by side stay within EC2's rate: its eight launch-permission readers
against the account's non-mutating bucket (100 tokens, 20 a second; tests/fake_throttle.py) on real
time, with nothing else drawing on it. A real botocore EC2 client made as the scheduled run and the CLI
make theirs (ClientFactory), each call answered in-process (before-call) by the bucket."""

from __future__ import annotations

import threading
import time
from typing import Any

from botocore.awsrequest import AWSResponse

from ami_janitor.aws.clients import ClientFactory
from ami_janitor.aws.inventory.launch_permissions import load_launch_permissions
from ami_janitor.core.model import RegionInventory
from builders import image
from fake_throttle import AccountBuckets
from sessions import botocore_session


class AccountEC2:
    """DescribeImageAttribute answered by EC2's buckets, full from the start and refilled on real time."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.buckets = AccountBuckets(full_since=0.0)
        self.lock = threading.Lock()
        self.refused: list[str] = []

    def __call__(self, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        image_id = params["body"]["ImageId"]  # the serialized request (EC2's query protocol)
        with self.lock:
            taken = self.buckets.take("DescribeImageAttribute", time.monotonic() - self.start)
            if not taken:
                self.refused.append(image_id)
        if not taken:
            error = {"Code": "RequestLimitExceeded", "Message": "Request limit exceeded."}
            return AWSResponse("", 503, {}, None), {"Error": error}
        return AWSResponse("", 200, {}, None), {"ImageId": image_id, "LaunchPermissions": []}


def test_a_runs_launch_permission_reads_side_by_side_stay_within_the_apis_rate() -> None:
    # 110 reads, eight at a time: EC2 lets 100 through at once, then 20 a second. Unpaced, the readers
    # sent the last ten as fast as EC2 answered and EC2 refused them (the SDK's adaptive mode slows a
    # client only once it was throttled, and then every EC2 call of the run).
    account = AccountEC2()
    clients = ClientFactory(botocore_session("us-east-1", "x", "x"))("us-east-1")
    clients.ec2.meta.events.register("before-call.ec2.DescribeImageAttribute", account)
    images = tuple(image(perms=None) for _ in range(110))

    loaded = load_launch_permissions(
        clients, RegionInventory(region="us-east-1", images=images), [i.image_id for i in images]
    )

    assert loaded.error is None
    assert all(i.launch_permissions == () for i in loaded.images)
    assert account.refused == [], f"EC2 refused {len(account.refused)} of the run's reads"
    assert account.buckets.taken["DescribeImageAttribute"] == 110
