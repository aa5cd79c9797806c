"""A slice that finished a deregistration an earlier run recorded (and stopped before EC2 took it),
delivered again before it was counted, on the in-memory EC2."""

from __future__ import annotations

from datetime import timedelta

from ami_janitor.aws import slicer
from ami_janitor.core.model import LedgerItem, LedgerSnapshot, LedgerStage
from ami_janitor.core.slices import SliceItem
from fake_ec2 import FakeImage
from unit.test_slice_fresh_reads import POLICY, START, clients, fleet, work


def test_a_redone_deregistration_is_reported_done_on_the_slices_next_delivery() -> None:
    fake = fleet(0)
    fake.results_rate = 1.0
    fake.add_snapshot("snap-1")
    fake.add_image(
        FakeImage(
            "ami-00000001",
            "app-1",
            START - timedelta(days=100),
            state="disabled",
            snapshot_ids=("snap-1",),
            deprecation_time=START - timedelta(days=20),
        )
    )
    begun = START - timedelta(days=30)
    fake.ledger.items["ami-00000001"] = LedgerItem(
        image_id="ami-00000001",
        first_candidate=begun,
        stages={
            "deprecate": LedgerStage(at=begun, confirmed=begun),
            "disable": LedgerStage(at=begun, confirmed=begun),
            # Recorded by an earlier run, which stopped before DeregisterImage.
            "deregister": LedgerStage(at=START - timedelta(days=1)),
        },
        snapshots=(LedgerSnapshot(snapshot_id="snap-1", image_id="ami-00000001"),),
    )
    part = work("ami-00000001").model_copy(
        update={"items": (SliceItem(image_id="ami-00000001", family="app", stages=("deregister",)),)}
    )
    now = START + timedelta(minutes=1)

    first = slicer.run_slice(clients(fake), fake.ledger, POLICY, part, now)
    assert [r.status for r in first.results] == ["ok"], first.results
    assert "ami-00000001" not in fake.images and fake.ledger.items["ami-00000001"].deregistered is not None

    # The worker stopped before the run's record counted the slice: SQS delivers it again.
    again = slicer.run_slice(clients(fake), fake.ledger, POLICY, part, now + timedelta(minutes=1))
    assert again.held == {}, again.held
    assert "done by an earlier delivery" in (again.results[0].detail or ""), again.results
