"""The in-memory EC2 throttles like EC2 (tests/fake_throttle.py): unpaced, a burst past a bucket's size
is refused; paced by aws/pacing.py on the fake's simulated clock, nothing is refused and the calls go at
the bucket's refill rate. Without a throttle, latency or pacer the fake behaves as it always did."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import ClientError

from ami_janitor.aws.errors import error_code
from fake_ec2 import FakeEC2, FakeImage
from fake_throttle import AccountBuckets

START = datetime(2026, 11, 25, 3, tzinfo=UTC)


def fleet(count: int, *, throttle: AccountBuckets | None = None, latency: float = 0.0) -> FakeEC2:
    fake = FakeEC2(throttle=throttle, latency=latency)
    fake.clock = START
    for n in range(count):
        fake.add_image(FakeImage(f"ami-{n:08x}", f"app-{n}", START - timedelta(days=100)))
    return fake


def deregister_all(fake: FakeEC2) -> list[str]:
    """Deregisters every AMI of the fake, one call each; returns the error code of each call ("": done)."""
    codes = []
    for image_id in sorted(fake.images):
        try:
            fake.deregister_image(ImageId=image_id)
            codes.append("")
        except ClientError as error:
            codes.append(error_code(error))
    return codes


def test_an_unpaced_burst_is_refused_past_the_bucket_size() -> None:
    fake = fleet(150, throttle=AccountBuckets())
    codes = deregister_all(fake)
    assert codes == [""] * 100 + ["RequestLimitExceeded"] * 50
    assert len(fake.images) == 50  # refused before taking effect
    assert len(fake.deregistered) == 100
    assert fake.throttle is not None and fake.throttle.refused["DeregisterImage"] == 50
    assert fake.elapsed == 0.0  # no latency: no simulated time passed


def test_a_paced_run_is_never_throttled_and_goes_at_the_refill_rate() -> None:
    fake = fleet(1000, throttle=AccountBuckets())
    fake.pacer()
    assert set(deregister_all(fake)) == {""}
    assert not fake.images
    # 100 at once, then 5 a second: 180 s for 1,000
    assert fake.elapsed == pytest.approx(180.0)
    assert 1000 / fake.elapsed >= 0.9 * 5
    assert fake.clock == START + timedelta(seconds=fake.elapsed)


def test_latency_moves_the_clock_and_refills_the_buckets() -> None:
    slow = fleet(300, throttle=AccountBuckets(), latency=0.2)  # one call per 0.2 s: 5/s, the refill
    assert set(deregister_all(slow)) == {""}
    assert slow.elapsed == pytest.approx(60.0)
    assert slow.calls[-1].clock == START + timedelta(seconds=299 * 0.2)
    fast = fleet(300, throttle=AccountBuckets(), latency=0.1)  # 10/s against 5/s: the bucket empties
    codes = deregister_all(fast)
    assert codes[:150] == [""] * 150
    assert "RequestLimitExceeded" in codes


def test_paced_with_latency_goes_at_the_slower_of_the_two() -> None:
    fake = fleet(400, throttle=AccountBuckets(), latency=0.05)
    fake.pacer()
    assert set(deregister_all(fake)) == {""}
    # 20 calls a second drain the bucket by 15 a second: 133 calls; the rest wait for the refill,
    # which gives 5 a second from the start: (400 - 100) / 5 s, and the last call's latency
    assert fake.elapsed == pytest.approx(60.0 + 0.05)


def test_describe_calls_draw_on_the_non_mutating_bucket() -> None:
    fake = fleet(2, throttle=AccountBuckets())
    for _ in range(100):
        fake.describe_images(ImageIds=["ami-00000000"])
    with pytest.raises(ClientError) as refused:
        fake.describe_snapshots(Filters=[{"Name": "tag:k", "Values": ["v"]}])
    assert error_code(refused.value) == "RequestLimitExceeded"
    fake.deregister_image(ImageId="ami-00000000")  # another bucket
    fake.advance(0.05)  # one token back at 20/s
    fake.describe_image_attribute(ImageId="ami-00000001", Attribute="launchPermission")


def test_workers_sharing_the_account_are_never_throttled() -> None:
    """Two workers, each paced with half of every bucket, their calls interleaved on one account."""
    fake = fleet(600, throttle=AccountBuckets())
    workers = [fake.pacer(0.5, attach=False), fake.pacer(0.5, attach=False)]
    for n, image_id in enumerate(sorted(fake.images)):
        fake.before_call = workers[n % 2].acquire
        fake.deregister_image(ImageId=image_id)
    assert not fake.images
    assert fake.elapsed >= (600 - 100) / 5 - 1e-6


def test_the_pacer_is_asked_once_per_call_not_on_the_sdks_retry() -> None:
    fake = fleet(1, throttle=AccountBuckets())
    asked: list[str] = []
    fake.before_call = asked.append
    fake.next_call_faults["CreateTags"] = "retried"
    fake.create_tags(Resources=["ami-00000000"], Tags=[{"Key": "k", "Value": "v"}])
    assert asked == ["CreateTags"]
    assert fake.throttle is not None and fake.throttle.taken["CreateTags"] == 2  # both requests


def test_without_throttle_latency_or_pacer_nothing_changes() -> None:
    fake = fleet(150)
    assert set(deregister_all(fake)) == {""}
    assert fake.elapsed == 0.0 and fake.clock == START
    assert {call.clock for call in fake.calls} == {START}
