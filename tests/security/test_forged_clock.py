"""Attacks on the stage clock and on unfinished deregistrations by a principal who can only tag.

Played through the CLI on the emulator, with an enforce policy whose stages are a week apart: a
backdated `ami-janitor:candidate-since` must not make one run skip the reversible stages, and a
`retired-from` mark must never make the janitor delete a snapshot its ledger did not record.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from ami_janitor import cli
from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.ledger import Ledger, Prior
from ami_janitor.core.model import iso
from ami_janitor.core.policy import (
    CANDIDATE_TAG,
    DEFAULT_LEDGER_TABLE,
    PRIOR_DEPRECATION_TAG,
    RETIRED_FROM_TAG,
)
from server import POLICY, ec2, image_ids, make_ledger, now, seed_fleet, snapshot_ids

WEEKLY = POLICY.format(mode="enforce").replace(
    "{deprecate_after_days: 0, disable_after_days: 0, deregister_after_days: 0}",
    "{deprecate_after_days: 0, disable_after_days: 7, deregister_after_days: 14}",
)


def run(*argv: str) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    code = cli.main([*argv, "--format", "json"], out=out)
    return code, json.loads(out.getvalue())


def config(tmp_path: Path, text: str = WEEKLY) -> str:
    path = tmp_path / "janitor.yaml"
    path.write_text(text)
    return str(path)


def forge_old_clock(image_id: str) -> None:
    long_ago = iso(now() - timedelta(days=400)) or ""
    ec2().create_tags(
        Resources=[image_id],
        Tags=[{"Key": CANDIDATE_TAG, "Value": long_ago}, {"Key": PRIOR_DEPRECATION_TAG, "Value": "none"}],
    )


def stages_applied(report: dict[str, Any], image_id: str) -> list[str]:
    return [r["action"] for r in report["results"] if r["image_id"] == image_id and r["status"] == "ok"]


def test_a_backdated_clock_on_a_new_candidate_skips_no_stage(endpoint: str, tmp_path: Path) -> None:
    fleet = seed_fleet(now())
    oldest = fleet.images[0]
    forge_old_clock(oldest)  # before the janitor ever saw it: adopted, and its clock restarts
    make_ledger()

    code, report = run("apply", "--config", config(tmp_path), "--yes")

    assert code == 0, report
    assert "deprecate" in stages_applied(report, oldest)
    assert not {"disable", "deregister"} & set(stages_applied(report, oldest))
    assert oldest in image_ids()
    state = ec2().describe_images(ImageIds=[oldest])["Images"][0]["State"]
    assert state == "available"


def test_a_backdated_clock_on_a_waiting_candidate_skips_no_stage(endpoint: str, tmp_path: Path) -> None:
    fleet = seed_fleet(now())
    oldest = fleet.images[0]
    make_ledger()
    code, first = run("apply", "--config", config(tmp_path), "--yes")
    assert code == 0 and "deprecate" in stages_applied(first, oldest)

    forge_old_clock(oldest)  # after adoption: the ledger's clock stands, the tag is reported
    code, plan = run("plan", "--config", config(tmp_path))
    decision = next(d for d in plan["decisions"] if d["image_id"] == oldest)
    assert (decision["action"], decision["next_action"]) == ("wait", "disable")
    assert any(t["image_id"] == oldest and t["tag"] == CANDIDATE_TAG for t in plan["tampered"])
    assert plan["summary"]["tampered"] >= 1

    code, second = run("apply", "--config", config(tmp_path), "--yes")
    assert code == 0, second
    assert stages_applied(second, oldest) == []
    assert ec2().describe_images(ImageIds=[oldest])["Images"][0]["State"] == "available"


def test_only_snapshots_the_ledger_recorded_are_deleted_after_a_crash(endpoint: str, tmp_path: Path) -> None:
    """A run recorded a deregistration (with the AMI's snapshot), deregistered it and died before
    deleting the snapshot; someone then marked another AMI's snapshot and a backup as retired-from it."""
    fleet = seed_fleet(now())
    make_ledger()
    victim, other = fleet.images[0], fleet.images[1]
    victim_snapshot, other_snapshot = fleet.snapshots[victim], fleet.snapshots[other]
    client = ec2()
    volume = client.create_volume(AvailabilityZone="us-east-1a", Size=8)["VolumeId"]
    backup = client.create_snapshot(VolumeId=volume)["SnapshotId"]
    ledger = Ledger(RegionClients("us-east-1"), DEFAULT_LEDGER_TABLE)
    at = now() - timedelta(days=30)
    ledger.record_candidate(victim, at)
    for stage in ("deprecate", "disable"):
        ledger.record_stage(victim, stage, at, Prior())
    ledger.record_stage(victim, "deregister", now(), Prior(), snapshots=[victim_snapshot])
    client.deregister_image(ImageId=victim)  # the crash: its snapshot is left
    client.create_tags(
        Resources=[victim_snapshot, other_snapshot, backup], Tags=[{"Key": RETIRED_FROM_TAG, "Value": victim}]
    )

    code, plan = run("plan", "--config", config(tmp_path))
    assert plan["unfinished_snapshots"] == [victim_snapshot]
    code, report = run("apply", "--config", config(tmp_path), "--yes")

    assert code == 0, report
    finished = [r for r in report["results"] if r["action"] == "finish-deregistration"]
    assert [(r["image_id"], r["snapshots_deleted"]) for r in finished] == [(victim, [victim_snapshot])]
    remaining = snapshot_ids()
    assert victim_snapshot not in remaining
    assert {other_snapshot, backup} <= remaining
    # Done once: the ledger confirms it, the next plan has nothing to finish.
    code, again = run("plan", "--config", config(tmp_path))
    assert again["unfinished_snapshots"] == []
