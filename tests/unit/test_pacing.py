"""The client-side token buckets of aws/pacing.py, on a clock the test moves: a burst of a bucket's size
goes at once, then calls are spaced by its refill; APIs of one bucket share it; a share is that part of
each bucket; and over any sequence of calls no window sees more calls than the bucket allows."""

from __future__ import annotations

import threading
from collections import defaultdict

import boto3
import pytest
from botocore.stub import Stubber
from hypothesis import given
from hypothesis import strategies as st

from ami_janitor.aws.pacing import BUCKETS, Pacer, bucket_name, bucket_of, pace


class FakeClock:
    """Time that passes only when the pacer sleeps, or the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def pacer(share: float = 1.0) -> tuple[Pacer, FakeClock]:
    clock = FakeClock()
    return Pacer(share, clock=clock, sleep=clock.sleep), clock


# ---- the table ------------------------------------------------------------------------------------------


def test_buckets_are_aws_facts_table() -> None:
    assert BUCKETS["DescribeImages"] == (100, 20.0)
    assert BUCKETS["DeregisterImage"] == (100, 5.0)
    assert BUCKETS["DeleteSnapshot"] == (100, 5.0)
    assert BUCKETS["ModifyImageAttribute"] == (100, 5.0)
    assert BUCKETS["CreateTags"] == BUCKETS["DeleteTags"] == (100, 10.0)
    assert BUCKETS["CopyImage"] == (100, 1.0)
    for api in ("EnableImageDeprecation", "DisableImageDeprecation", "DisableImage", "EnableImage"):
        assert BUCKETS[api] == (50, 5.0)
    assert BUCKETS["CreateImage"] == (50, 5.0)


def test_unknown_calls_fall_to_their_kind() -> None:
    assert bucket_of("DescribeVpcs") == bucket_of("GetConsoleOutput") == (100, 20.0)
    assert bucket_name("DescribeVpcs") == bucket_name("DescribeImages")
    assert bucket_of("AttachVolume") == (50, 5.0)
    assert bucket_name("AttachVolume") == bucket_name("EnableImage")


def test_share_must_be_a_fraction() -> None:
    for share in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError):
            Pacer(share)


# ---- pacing ---------------------------------------------------------------------------------------------


def test_a_burst_of_the_bucket_size_then_one_call_per_refill() -> None:
    paced, clock = pacer()
    assert [paced.acquire("DeregisterImage") for _ in range(100)] == [0.0] * 100
    assert clock.now == 1000.0
    waits = [paced.acquire("DeregisterImage") for _ in range(10)]
    assert waits == pytest.approx([0.2] * 10)
    assert clock.now == pytest.approx(1002.0)


def test_a_bucket_refills_while_idle_up_to_its_size() -> None:
    paced, clock = pacer()
    for _ in range(100):
        paced.acquire("CopyImage")
    clock.now += 10  # 10 tokens back
    assert [paced.acquire("CopyImage") for _ in range(10)] == [0.0] * 10
    assert paced.acquire("CopyImage") == pytest.approx(1.0)
    clock.now += 10_000  # full again, not fuller
    assert [paced.acquire("CopyImage") for _ in range(100)] == [0.0] * 100
    assert paced.acquire("CopyImage") == pytest.approx(1.0)


def test_apis_of_one_bucket_share_its_tokens() -> None:
    paced, _ = pacer()
    for n in range(100):
        paced.acquire("CreateTags" if n % 2 else "DeleteTags")
    assert paced.acquire("DeleteTags") == pytest.approx(0.1)
    # every Describe* is one bucket; the other mutating calls another (50 tokens)
    for n in range(100):
        paced.acquire("DescribeImages" if n % 2 else "DescribeSnapshots")
    assert paced.acquire("DescribeImageAttribute") == pytest.approx(0.05)
    for n in range(50):
        paced.acquire("EnableImageDeprecation" if n % 2 else "DisableImage")
    assert paced.acquire("EnableImage") == pytest.approx(0.2)


def test_buckets_are_separate() -> None:
    paced, _ = pacer()
    for _ in range(100):
        paced.acquire("DeregisterImage")
    assert paced.acquire("DeleteSnapshot") == 0.0
    assert paced.acquire("CreateTags") == 0.0
    assert paced.acquire("DescribeImages") == 0.0


def test_a_share_of_each_bucket() -> None:
    paced, _ = pacer(share=0.25)
    assert [paced.acquire("DeregisterImage") for _ in range(25)] == [0.0] * 25
    assert paced.acquire("DeregisterImage") == pytest.approx(1 / 1.25)
    assert [paced.acquire("EnableImage") for _ in range(12)] == [0.0] * 12  # 50 * 0.25 = 12.5
    assert paced.acquire("EnableImage") == pytest.approx(0.5 / 1.25)


def test_a_tiny_share_still_holds_one_token() -> None:
    paced, _ = pacer(share=0.001)
    assert paced.acquire("CopyImage") == 0.0
    assert paced.acquire("CopyImage") == pytest.approx(1000.0)


def test_waiting_callers_queue_in_order_without_holding_the_lock() -> None:
    """Threads on a real pacer: while one sleeps another bucket is served at once."""
    clock = FakeClock()
    slept = threading.Event()
    release = threading.Event()

    def sleep(seconds: float) -> None:
        if not slept.is_set():  # the first sleeper waits for the test; the others go on
            slept.set()
            release.wait(5)

    paced = Pacer(0.01, clock=clock, sleep=sleep)
    paced.acquire("DeregisterImage")
    waiter = threading.Thread(target=paced.acquire, args=("DeregisterImage",))
    waiter.start()
    assert slept.wait(5)
    assert paced.acquire("CreateTags") == 0.0  # not blocked by the sleeper
    assert paced.acquire("DeregisterImage") == pytest.approx(2 / 0.05)  # behind the sleeper
    release.set()
    waiter.join(5)


APIS = ["DeregisterImage", "DeleteSnapshot", "CreateTags", "DeleteTags", "CopyImage", "EnableImage"]


@given(
    share=st.floats(min_value=0.02, max_value=1.0),
    calls=st.lists(
        st.tuples(st.sampled_from(APIS), st.floats(min_value=0.0, max_value=3.0) | st.just(0.0)),
        max_size=300,
    ),
)
def test_no_window_sees_more_calls_than_its_bucket_allows(
    share: float, calls: list[tuple[str, float]]
) -> None:
    """A call is made when acquire returns: in any window [a, b] of one bucket's calls, at most
    size + refill * (b - a) of them."""
    paced, clock = pacer(share)
    made: dict[str, list[float]] = defaultdict(list)
    for api, idle in calls:
        clock.now += idle
        paced.acquire(api)
        made[bucket_name(api)].append(clock.now)
    for name, times in made.items():
        size, refill = paced.limits(next(api for api in APIS if bucket_name(api) == name))
        for first in range(len(times)):
            for last in range(first, len(times)):
                window = times[last] - times[first]
                assert last - first + 1 <= size + refill * window + 1e-6, (name, first, last, window)


# ---- pace(): a boto3 client's calls take their tokens ---------------------------------------------------


class RecordingPacer(Pacer):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def acquire(self, api: str) -> float:
        self.asked.append(api)
        return super().acquire(api)


def test_pace_takes_a_token_for_every_call_of_a_boto3_client() -> None:
    session = boto3.Session(region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    ec2 = session.client("ec2")
    recording = RecordingPacer()
    assert pace(ec2, recording) is ec2
    pace(ec2, recording)  # the same pacer twice: once
    with Stubber(ec2) as stub:
        stub.add_response("deregister_image", {"Return": True}, {"ImageId": "ami-12345678"})
        stub.add_response("create_tags", {}, {"Resources": ["snap-1"], "Tags": [{"Key": "k", "Value": "v"}]})
        stub.add_response("describe_images", {"Images": []}, {"ImageIds": ["ami-12345678"]})
        stub.add_response("delete_snapshot", {}, {"SnapshotId": "snap-1"})
        ec2.deregister_image(ImageId="ami-12345678")
        ec2.create_tags(Resources=["snap-1"], Tags=[{"Key": "k", "Value": "v"}])
        ec2.describe_images(ImageIds=["ami-12345678"])
        ec2.delete_snapshot(SnapshotId="snap-1")
        stub.assert_no_pending_responses()
    assert recording.asked == ["DeregisterImage", "CreateTags", "DescribeImages", "DeleteSnapshot"]


def test_pace_leaves_other_services_alone() -> None:
    session = boto3.Session(region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    ssm = session.client("ssm")
    recording = RecordingPacer()
    pace(ssm, recording)
    with Stubber(ssm) as stub:
        stub.add_response("get_parameter", {"Parameter": {"Name": "p", "Value": "v"}}, {"Name": "p"})
        ssm.get_parameter(Name="p")
    assert recording.asked == []
