"""Upgrading from tag records: the first enforce run with a ledger adopts an older janitor's tags in the
safe direction only, once; until then `tampered` stays quiet. Played through the CLI on the emulator."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from ami_janitor import cli
from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.ledger import Ledger
from ami_janitor.core.model import iso
from ami_janitor.core.policy import (
    CANDIDATE_TAG,
    DEFAULT_LEDGER_TABLE,
    PRIOR_DEPRECATION_TAG,
    PRIOR_PERMISSIONS_TAG,
    RETIRED_FROM_TAG,
    SHARED_BY_JANITOR_TAG,
)
from server import POLICY, ec2, make_ledger, now, seed_fleet, snapshot_ids

PARTNER, STRANGER = "111122223333", "999988887777"
WEEKLY = (
    POLICY.format(mode="enforce").replace(
        "{deprecate_after_days: 0, disable_after_days: 0, deregister_after_days: 0}",
        "{deprecate_after_days: 0, disable_after_days: 7, deregister_after_days: 14}",
    )
    + f"    share_with: {{accounts: ['{PARTNER}']}}\n"
)


def run(tmp_path: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "janitor.yaml"
    path.write_text(WEEKLY)
    out = io.StringIO()
    code = cli.main([*argv, "--config", str(path), "--format", "json"], out=out)
    return code, json.loads(out.getvalue())


def test_the_first_enforce_run_adopts_old_tags_safely_and_once(endpoint: str, tmp_path: Path) -> None:
    fleet = seed_fleet(now())
    client = ec2()
    disabled, waiting = fleet.images[0], fleet.images[1]
    long_ago = iso(now() - timedelta(days=300)) or ""
    # What an older janitor (or anyone who may tag) left: a disabled AMI with its records, a candidate
    # whose clock started long ago, grants inside and outside share_with, a snapshot mark.
    client.create_tags(
        Resources=[disabled],
        Tags=[
            {"Key": CANDIDATE_TAG, "Value": long_ago},
            {"Key": PRIOR_DEPRECATION_TAG, "Value": "none"},
            {"Key": PRIOR_PERMISSIONS_TAG, "Value": f"user:{PARTNER},user:{STRANGER}"},
        ],
    )
    client.enable_image_deprecation(ImageId=disabled, DeprecateAt=now() + timedelta(minutes=5))
    client.disable_image(ImageId=disabled)
    client.create_tags(
        Resources=[waiting],
        Tags=[
            {"Key": CANDIDATE_TAG, "Value": long_ago},
            {"Key": SHARED_BY_JANITOR_TAG, "Value": f"user:{PARTNER},user:{STRANGER}"},
        ],
    )
    marked = fleet.snapshots[fleet.images[4]]
    client.create_tags(Resources=[marked], Tags=[{"Key": RETIRED_FROM_TAG, "Value": "ami-0123456789abcdef0"}])
    make_ledger()

    # Before the first enforce run: what it would adopt and refuse, and nothing reported as tampered.
    code, plan = run(tmp_path, "plan")
    assert code == 0 and plan["tampered"] == []
    notes = " | ".join(plan["notes"])
    assert "adopting the janitor tags of 2 AMI(s)" in notes
    assert f"{disabled} prior launch permission user:{STRANGER} (outside share_with)" in notes
    assert f"{waiting} grant user:{STRANGER} (outside share_with)" in notes
    assert f"{waiting} grant user:{PARTNER} (in share_with: a tag's record, never revoked)" in notes
    assert "snapshots marked ami-janitor:retired-from: 1, for a person to check" in notes
    decisions = {d["image_id"]: d for d in plan["decisions"]}
    # Clocks restart at this run: the disabled AMI waits its full deregistration delay again.
    assert decisions[disabled]["action"] == "wait" and decisions[disabled]["next_action"] == "deregister"
    assert decisions[disabled]["candidate_since"] == plan["generated_at"]

    code, report = run(tmp_path, "apply", "--yes")
    assert code == 0, report
    adopted = {r["image_id"] for r in report["results"] if r["action"] == "adopt"}
    assert adopted == {disabled, waiting}
    assert disabled in {i["ImageId"] for i in client.describe_images(Owners=["self"])["Images"]}
    assert marked in snapshot_ids()
    view = Ledger(RegionClients("us-east-1"), DEFAULT_LEDGER_TABLE).read_all()
    assert view.adopted is not None
    item = view.items[disabled]
    assert set(item.stages) == {"deprecate", "disable"}
    assert item.stages["disable"].prior_launch_permissions == (f"user:{PARTNER}",)
    assert view.items[waiting].grants == ()  # a tag's record of a grant: no grant of the janitor's
    # The mirror now says what the ledger says.
    tags = {t["Key"]: t["Value"] for t in client.describe_images(ImageIds=[disabled])["Images"][0]["Tags"]}
    assert tags[CANDIDATE_TAG] == iso(item.first_candidate)

    # Once: the next run adopts nothing, and a mark the ledger does not back is now tampered.
    code, again = run(tmp_path, "apply", "--yes")
    assert code == 0 and not [r for r in again["results"] if r["action"] == "adopt"]
    assert any(t["image_id"] == marked and t["tag"] == RETIRED_FROM_TAG for t in again["tampered"])
    assert not any("adopting" in note for note in again["notes"])
