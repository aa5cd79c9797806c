"""Two AMIs that share a snapshot, deregistered side by side in one slice (the slice worker runs
several AMIs at once): each records the shared snapshot, so a snapshot is deleted only where the ledger
recorded it, and a run stopped after both deregistrations leaves it to the next run, not to none. (Each
saw the other still there when it recorded its own snapshots: the shared one was recorded for neither,
deleted unrecorded, or, the run stopped, left for good.)"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ami_janitor.aws import executor, slicer
from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.executor import ActionResult, apply_plan
from ami_janitor.core.model import LedgerItem, LedgerStage
from ami_janitor.core.policy import Policy, parse_policy
from ami_janitor.core.run_plan import plan_run
from fake_ec2 import Crash, FakeEC2, FakeImage
from sessions import botocore_session

REGION = "us-east-1"
BASE = datetime(2026, 11, 25, 3, tzinfo=UTC)
SESSION = botocore_session(REGION, "x", "x")
PAIR = [("ami-0000000a", ("deregister",), None), ("ami-0000000b", ("deregister",), None)]


def rules(**defaults: Any) -> Policy:
    base: dict[str, Any] = {
        "keep_latest": 1,
        "min_age_days": 0,
        "limits": {"max_fraction_per_family": 1.0, "max_actions_per_run": 1000},
        "lifecycle": {"deprecate_after_days": 0, "disable_after_days": 0, "deregister_after_days": 0},
    }
    base.update(defaults)
    return parse_policy(
        {
            "mode": "enforce",
            "regions": [REGION],
            "defaults": base,
            "families": [
                {
                    "name": "app",
                    "match": {"tags": {"Project": "App"}, "name": "app-*"},
                }
            ],
        }
    )


def img(image_id: str, days: int, snaps: tuple[str, ...], **kw: Any) -> FakeImage:
    return FakeImage(
        image_id,
        f"app-{image_id}",
        BASE - timedelta(days=days),
        tags={"Project": "App"},
        snapshot_ids=snaps,
        **kw,
    )


def staged_item(image_id: str, *stages: str) -> LedgerItem:
    since = BASE - timedelta(days=30)
    return LedgerItem(
        image_id=image_id,
        first_candidate=since,
        stages={s: LedgerStage(at=since, confirmed=since) for s in stages},  # type: ignore[misc]
    )


def recorded_for(fake: FakeEC2) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for item in fake.ledger.items.values():
        for s in item.snapshots:
            out.setdefault(s.snapshot_id, set()).add(item.image_id)
    return out


def _shared_pair(results_rate: float) -> FakeEC2:
    fake = FakeEC2(REGION, results_rate=results_rate, latency=0.1)
    fake.clock = BASE
    fake.add_image(img("ami-0000000e", 1, ("snap-new",)))
    for image_id, own in (("ami-0000000a", "snap-a"), ("ami-0000000b", "snap-b")):
        fake.add_image(img(image_id, 100, (own, "snap-s"), state="disabled"))
        fake.ledger.items[image_id] = staged_item(image_id, "deprecate", "disable")
        fake.images[image_id].deprecation_time = BASE - timedelta(days=29)
    return fake


def _slice(fake: FakeEC2) -> list[ActionResult]:
    """The pair's deregistrations in one slice, side by side as the worker runs its AMIs."""
    return executor.apply_stages(
        REGION,
        fake,
        fake.ledger,
        fake.describe(),
        PAIR,
        BASE,
        side_by_side=fake.side_by_side(slicer.SLICE_WORKERS),
    )


def _side_by_side(results_rate: float) -> FakeEC2:
    fake = _shared_pair(results_rate)
    results = _slice(fake)
    assert [r.status for r in results] == ["ok", "ok"], results
    recorded = recorded_for(fake)
    for snapshot_id in fake.deleted_snapshots:
        assert snapshot_id in recorded, (
            f"{snapshot_id} deleted but the ledger recorded it for no AMI",
            {i: [s.snapshot_id for s in it.snapshots] for i, it in fake.ledger.items.items()},
            fake.deleted_snapshots,
        )
    return fake


@pytest.mark.parametrize("results_rate", [0.0, 1.0], ids=["snapshots deleted one by one", "EC2 deletes them"])
def test_a_snapshot_two_amis_share_is_recorded_before_it_is_deleted(results_rate: float) -> None:
    fake = _side_by_side(results_rate)
    assert {"snap-a", "snap-b", "snap-s"} <= set(fake.deleted_snapshots)
    assert recorded_for(fake)["snap-s"] == {"ami-0000000a", "ami-0000000b"}


def test_a_run_stopped_after_both_deregistrations_leaves_the_shared_snapshot_to_the_next() -> None:
    """The same slice, stopped after both DeregisterImage calls took effect and before any snapshot was
    deleted: the next run deletes the shared snapshot."""
    fake = _shared_pair(0.0)
    real = fake.delete_snapshot

    def die(**params: Any) -> Any:
        if not fake.images.get("ami-0000000a") and not fake.images.get("ami-0000000b"):
            raise Crash("killed")
        return real(**params)

    fake.delete_snapshot = die  # type: ignore[method-assign]
    with contextlib.suppress(Crash):
        _slice(fake)
    fake.delete_snapshot = real  # type: ignore[method-assign]
    later = BASE + timedelta(days=1)
    fake.clock = later
    inv = fake.describe(permissions=True)
    apply_plan(
        plan_run([inv], rules(), later),
        {REGION: inv},
        lambda _: RegionClients(REGION, SESSION, ec2=fake),
        later,
        ledger_for=lambda _: fake.ledger,
    )
    assert "snap-s" not in fake.snapshots, (
        "snap-s left behind, unrecorded",
        recorded_for(fake),
        fake.snapshots,
    )
