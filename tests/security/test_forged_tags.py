"""Attacks by a principal who can only tag: a forged janitor tag must do no harm.

Each test plays the attack through the CLI, on the emulator, with an enforce policy and `apply --yes`.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ami_janitor import cli
from ami_janitor.core.model import parse_time
from ami_janitor.core.policy import (
    CANDIDATE_TAG,
    PRIOR_DEPRECATION_TAG,
    PRIOR_PERMISSIONS_TAG,
    RETIRED_FROM_TAG,
)
from server import POLICY, ec2, make_ledger, now, seed_fleet, snapshot_ids

OUTSIDE_ACCOUNT = "999988887777"
SHARED_ACCOUNT = "111122223333"


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(list(argv), out=out)
    return code, out.getvalue()


def write_policy(tmp_path: Path, text: str) -> str:
    path = tmp_path / "janitor.yaml"
    path.write_text(text)
    return str(path)


def permissions(image_id: str) -> list[dict[str, str]]:
    answer = ec2().describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    return list(answer["LaunchPermissions"])


def backup_snapshot() -> str:
    """A data volume's backup: no AMI ever used it."""
    client = ec2()
    volume = client.create_volume(AvailabilityZone="us-east-1a", Size=8)["VolumeId"]
    return str(client.create_snapshot(VolumeId=volume, Description="nightly backup")["SnapshotId"])


def test_a_forged_retired_from_tag_deletes_no_snapshot(endpoint: str, tmp_path: Path) -> None:
    seed_fleet(now())
    backup = backup_snapshot()
    ec2().create_tags(Resources=[backup], Tags=[{"Key": RETIRED_FROM_TAG, "Value": "ami-0123456789abcdef0"}])
    text = POLICY.format(mode="enforce").replace("max_actions_per_run: 100", "max_actions_per_run: 1")
    config = write_policy(tmp_path, text)

    code, output = run("plan", "--config", config, "--format", "json")
    plan = json.loads(output)
    assert code == 0 and plan["unfinished_snapshots"] == []
    note = "us-east-1: snapshots marked ami-janitor:retired-from: 1, for a person to check"
    assert any(n.startswith(note) for n in plan["notes"]), plan["notes"]

    make_ledger()
    code, output = run("apply", "--config", config, "--yes", "--format", "json")
    report = json.loads(output)
    assert code == 0, output
    assert backup in snapshot_ids()
    assert backup not in {s for r in report["results"] for s in r["snapshots_deleted"]}
    # The cap holds: one action (a deprecation; a deregistration with its snapshot would be two).
    acting = [d for d in report["decisions"] if d["action"] in ("deprecate", "disable", "deregister")]
    assert len(acting) <= 1 and report["summary"]["snapshots_deleted"] == 0

    # Once the tags were adopted, the mark the ledger does not back is reported as tampered.
    code, output = run("plan", "--config", config, "--format", "json")
    plan = json.loads(output)
    assert {
        "region": "us-east-1",
        "image_id": backup,
        "tag": RETIRED_FROM_TAG,
        "value": "ami-0123456789abcdef0",
        "ledger": None,
    } in plan["tampered"]
    assert plan["unfinished_snapshots"] == [] and backup in snapshot_ids()


def test_a_forged_permission_record_makes_no_rescue_public(endpoint: str, tmp_path: Path) -> None:
    fleet = seed_fleet(now())
    newest = fleet.images[-1]  # kept (keep-N): the forged record makes it look janitor-touched
    forged = f"group:all,user:{OUTSIDE_ACCOUNT},user:{SHARED_ACCOUNT}"
    ec2().create_tags(Resources=[newest], Tags=[{"Key": PRIOR_PERMISSIONS_TAG, "Value": forged}])
    text = POLICY.format(mode="enforce") + f"    share_with: {{accounts: ['{SHARED_ACCOUNT}']}}\n"
    config = write_policy(tmp_path, text)

    make_ledger()
    code, output = run("apply", "--config", config, "--yes", "--format", "json")

    assert code == 0, output
    report = json.loads(output)
    # Adopted in the safe direction: the recorded permissions outside share_with are refused (and
    # reported), so the rescue that closes the adopted clock restores nothing.
    refused = f"{newest} prior launch permission user:{OUTSIDE_ACCOUNT} (outside share_with)"
    assert any(refused in note for note in report["notes"]) or not any(
        r["action"] == "rescue" and "restored" in (r.get("detail") or "") for r in report["results"]
    )
    assert not any("launch permissions restored" in (r.get("detail") or "") for r in report["results"])
    assert not _is_public(newest)
    assert {"UserId": OUTSIDE_ACCOUNT} not in permissions(newest)
    assert {p.get("UserId") for p in permissions(newest)} <= {SHARED_ACCOUNT}


def test_a_forged_permission_record_makes_no_rescue_by_hand_public(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = seed_fleet(now())
    target = fleet.images[-1]
    forged = f"group:all,user:{OUTSIDE_ACCOUNT}"
    ec2().create_tags(Resources=[target], Tags=[{"Key": PRIOR_PERMISSIONS_TAG, "Value": forged}])
    ec2().disable_image(ImageId=target)  # as if the disable stage had run
    config = write_policy(tmp_path, POLICY.format(mode="enforce"))

    code, output = run("rescue", target, "--config", config)
    assert code == 2 and "ledger create" in capsys.readouterr().err  # nothing to go by without it

    make_ledger()
    code, output = run("rescue", target, "--config", config)
    assert code == 0, output
    # The ledger records no stage on it (the record is a tag): nothing enabled, nothing granted.
    assert "enabled" not in output and "restored" not in output
    assert permissions(target) == [] and not _is_public(target)
    assert ec2().describe_images(ImageIds=[target])["Images"][0]["State"] == "disabled"


def test_a_forged_clock_makes_no_rescue_enable_or_share_an_ami_its_owner_disabled(
    endpoint: str, tmp_path: Path
) -> None:
    fleet = seed_fleet(now())
    target = fleet.images[-1]  # kept (keep-N): the adopted clock is rescued at once
    ec2().disable_image(ImageId=target)  # its owner pulls a bad build by hand
    # Tags alone make it look like the janitor's work, with a permission share_with would allow.
    forged = [
        {"Key": CANDIDATE_TAG, "Value": "2020-01-01T00:00:00Z"},
        {"Key": PRIOR_PERMISSIONS_TAG, "Value": f"user:{SHARED_ACCOUNT}"},
    ]
    ec2().create_tags(Resources=[target], Tags=forged)
    text = POLICY.format(mode="enforce") + f"    share_with: {{accounts: ['{SHARED_ACCOUNT}']}}\n"
    config = write_policy(tmp_path, text)

    make_ledger()
    code, output = run("apply", "--config", config, "--yes", "--format", "json")

    assert code == 0, output
    rescue = [r for r in json.loads(output)["results"] if r["image_id"] == target and r["action"] == "rescue"]
    assert len(rescue) == 1 and rescue[0]["status"] == "ok", rescue
    # The adopted disable is not the janitor's to undo: left disabled, nothing granted, and said so.
    state = ec2().describe_images(ImageIds=[target], IncludeDisabled=True)["Images"][0]["State"]
    assert state == "disabled", rescue
    assert permissions(target) == []
    done = rescue[0]["detail"].split("; ")
    assert "enabled" not in done and not any(d.startswith("launch permissions restored") for d in done)
    assert "left disabled (adopted from tags" in rescue[0]["detail"]


def test_a_forged_prior_deprecation_makes_no_rescue_cancel_the_owners_deprecation(
    endpoint: str, tmp_path: Path
) -> None:
    fleet = seed_fleet(now())
    target = fleet.images[-1]  # kept (keep-N): the adopted clock is rescued at once
    owners = now().replace(second=0) + timedelta(days=30)
    ec2().enable_image_deprecation(ImageId=target, DeprecateAt=owners)
    forged = [
        {"Key": CANDIDATE_TAG, "Value": "2020-01-01T00:00:00Z"},
        {"Key": PRIOR_DEPRECATION_TAG, "Value": "none"},  # "the janitor deprecated it, undo that"
    ]
    ec2().create_tags(Resources=[target], Tags=forged)
    config = write_policy(tmp_path, POLICY.format(mode="enforce"))

    make_ledger()
    code, output = run("apply", "--config", config, "--yes", "--format", "json")

    assert code == 0, output
    rescue = [r for r in json.loads(output)["results"] if r["image_id"] == target and r["action"] == "rescue"]
    assert len(rescue) == 1, rescue
    shown = ec2().describe_images(ImageIds=[target])["Images"][0].get("DeprecationTime")
    assert parse_time(shown) == owners, rescue
    assert "deprecation cancelled" not in rescue[0]["detail"]
    assert "left deprecated (adopted from tags" in rescue[0]["detail"]


def _is_public(image_id: str) -> bool:
    raw: dict[str, Any] = ec2().describe_images(ImageIds=[image_id])["Images"][0]
    return bool(raw.get("Public"))
