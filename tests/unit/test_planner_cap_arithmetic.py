"""Caps: floor(max_fraction_per_family x members) per group, and every snapshot a deregistration deletes
counted toward max_actions_per_run."""

from __future__ import annotations

from ami_janitor.core.planner import plan
from builders import NOW, image, inventory, policy

ALL_ZERO = {"lifecycle": {"deprecate_after_days": 0, "disable_after_days": 0, "deregister_after_days": 0}}


def test_fraction_cap_is_the_floor_of_the_written_fraction_times_members() -> None:
    # floor(0.29 x 100) = 29 (0.29 * 100 in binary floating point is 28.999999999999996).
    images = [image(days_old=100 + i) for i in range(100)]
    limits = {"max_actions_per_run": 1000, "max_fraction_per_family": 0.29}
    result = plan([inventory(*images)], policy({"keep_latest": 1}, defaults={"limits": limits}), NOW)
    moved = sum(d.action == "deprecate" for d in result.decisions)
    held = {r for d in result.decisions for r in d.reasons if r.startswith("held back by")}
    assert held == {"held back by max_fraction_per_family (0.29 of 100 members = 29 per run)"}
    assert moved == 29


def test_a_snapshot_mapped_twice_in_one_ami_is_paid_for_by_its_deregistration() -> None:
    # One AMI whose two block device mappings name the same snapshot: its deregistration deletes that
    # snapshot (no other AMI uses it), so it costs 2 actions and does not fit in a budget of 1 (it was
    # counted as a snapshot two AMIs use, charged 1, and the run took 2 actions).
    kept = image(days_old=1)
    old = image(days_old=300, snapshots=("snap-twice", "snap-twice"))
    for budget, action, deleted in ((1, "keep", 0), (2, "deregister", 1)):
        limits = {"max_actions_per_run": budget, "max_fraction_per_family": 1}
        result = plan(
            [inventory(kept, old)], policy({"keep_latest": 1, **ALL_ZERO}, defaults={"limits": limits}), NOW
        )
        decision = next(d for d in result.decisions if d.image_id == old.image_id)
        assert (decision.action, result.summary.snapshots_deleted) == (action, deleted), decision.reasons


def test_a_snapshot_mapped_twice_is_released_once_by_its_deregistration() -> None:
    # Three AMIs use snap-x: `oldest` maps it on two devices, `old` once, `young` (kept) once. Neither
    # deregistration deletes snap-x (the kept AMI still uses it), so each costs one action and both fit
    # in a budget of 2. The caps took `oldest`'s two mappings for two users gone, so `old` was taken for
    # the snapshot's last user, charged 2 and held back, with a reason that was false.
    young = image(days_old=1, snapshots=("snap-x",))
    oldest = image(days_old=300, snapshots=("snap-x", "snap-x"))
    old = image(days_old=200, snapshots=("snap-x",))
    limits = {"max_actions_per_run": 2, "max_fraction_per_family": 1}
    result = plan(
        [inventory(young, oldest, old)],
        policy({"keep_latest": 1, **ALL_ZERO}, defaults={"limits": limits}),
        NOW,
    )
    actions = {d.image_id: (d.action, d.reasons[-1]) for d in result.decisions}
    assert actions[oldest.image_id][0] == "deregister"
    assert actions[old.image_id][0] == "deregister", actions[old.image_id]
    assert result.summary.snapshots_deleted == 0
