"""A slice delivered again (its first delivery deprecated the AMI, then the worker stopped before the
run's record counted the slice) is idempotent through the ledger: a stage EC2 shows is not done again,
so its record keeps what the first delivery changed, and a later rescue still cancels the deprecation
the janitor made (design.md: a rescue restores the deprecation "to what the ledger recorded (or
cancelled)"). In-memory EC2 and ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ami_janitor.aws import executor, slicer
from ami_janitor.aws.clients import RegionClients
from ami_janitor.core.policy import parse_policy
from ami_janitor.core.slices import SliceItem, WorkSlice, policy_digest
from fake_aws import region_clients
from fake_ec2 import FakeEC2, FakeImage

REGION = "us-east-1"
ACCOUNT = "123456789012"
# The wall clock: deprecate_at never deprecates in the past, so the run's `now` is taken as today.
START = datetime.now(UTC).replace(second=0, microsecond=0)
POLICY = parse_policy(
    {
        "mode": "enforce",
        "regions": [REGION],
        "defaults": {
            "lifecycle": {"deprecate_after_days": 0, "disable_after_days": 7, "deregister_after_days": 14}
        },
        "families": [{"name": "app", "match": {"name": "app-*"}}],
    }
)
AMI = "ami-00000001"


def test_a_redelivered_slice_keeps_the_rescue_able_to_cancel_the_deprecation() -> None:
    fake = FakeEC2(REGION)
    fake.clock = START
    fake.add_image(FakeImage(AMI, "app-1", START - timedelta(days=100), snapshot_ids=("snap-1",)))
    fake.ledger.record_candidate(AMI, START)  # the run started its clock before queueing the slice
    part = WorkSlice(
        run=START.isoformat().replace("+00:00", "Z"),
        region=REGION,
        index=0,
        count=1,
        planned_at=START,
        policy=policy_digest(POLICY),
        items=(SliceItem(image_id=AMI, family="app", stages=("deprecate",)),),
    )
    clients = region_clients(fake, account=ACCOUNT)

    first = slicer.run_slice(clients, fake.ledger, POLICY, part, START)
    assert [r.status for r in first.results] == ["ok"], first.results
    assert fake.images[AMI].deprecation_time is not None
    assert fake.ledger.items[AMI].stages["deprecate"].prior_deprecation is None  # nothing before

    # The worker stopped before finish_slice counted it (a timeout, S3 or DynamoDB failing): SQS delivers
    # the same slice again once its visibility timeout is over.
    again_at = START + timedelta(minutes=20)
    fake.clock = again_at
    calls = fake.mutating_calls
    again = slicer.run_slice(clients, fake.ledger, POLICY, part, again_at)
    assert [(r.status, r.detail) for r in again.results] == [("ok", "done already: EC2 shows it")]
    assert fake.mutating_calls == calls  # no EC2 change
    assert fake.ledger.items[AMI].stages["deprecate"].prior_deprecation is None

    # The AMI comes back into use two days later: the rescue undoes the janitor's deprecation.
    later = START + timedelta(days=2)
    fake.clock = later
    image = next(i for i in fake.describe().images if i.image_id == AMI)
    (rescued,) = executor.rescue_image(RegionClients(REGION, ec2=fake), fake.ledger, image, later)
    assert rescued.status == "ok", rescued
    assert fake.images[AMI].deprecation_time is None, (
        f"rescue left the janitor's own deprecation in place: {rescued.detail}; "
        f"ledger prior_deprecation={fake.ledger.items[AMI].stages['deprecate'].prior_deprecation}"
    )
