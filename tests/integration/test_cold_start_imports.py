"""A scheduled run imports only what its region needs: in a region with no AMI (most regions of most
accounts) its cold start never imports the reference sources, the slicer, the copier, the baker, the
usage reports or the roles' permission lists; a region with a family's AMIs imports the reference
sources where it reads them. Each run is a fresh interpreter on the moto server, as a cold start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server import POLICY, make_ledger, now, seed_fleet

EVENTS = Path(__file__).resolve().parents[1] / "events"
# What a region with no AMI does not need: imported where a run uses them.
NOT_IN_AN_EMPTY_REGION = {
    "ami_janitor.roles",
    "ami_janitor.aws.baker",
    "ami_janitor.aws.copier",
    "ami_janitor.aws.slicer",
    "ami_janitor.aws.runs",
    "ami_janitor.aws.usage",
    "ami_janitor.aws.inventory.reference_sources",
    "ami_janitor.aws.inventory.claims",
    "ami_janitor.aws.inventory.instances",
    "ami_janitor.aws.inventory.launch_templates",
    "ami_janitor.aws.inventory.image_references",
    "ami_janitor.aws.inventory.recycle_bin",
    "ami_janitor.aws.inventory.block_public_access",
    "ami_janitor.core.baking",
    "ami_janitor.core.build_instance",
    "ami_janitor.core.globs",
    "ami_janitor.core.usage",
}

COLD_START = """
import json, sys
from ami_janitor.handlers import scheduled
from lambda_events import Context
event = json.loads(open(sys.argv[1]).read())
answer = scheduled.handler(event, Context())
print(json.dumps({"answer": answer, "modules": sorted(m for m in sys.modules if m.startswith("ami_janitor"))}))
"""


def _cold_start(tmp_path: Path) -> dict[str, Any]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(mode="dry-run"))
    tests = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "AMI_JANITOR_CONFIG": str(policy),
        "AWS_REGION": "us-east-1",
        "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
        "POWERTOOLS_LOG_LEVEL": "WARNING",
    }
    done = subprocess.run(
        [sys.executable, "-c", COLD_START, str(EVENTS / "scheduled.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


@pytest.mark.usefixtures("endpoint")
def test_a_region_with_no_ami_imports_none_of_what_it_does_not_use(tmp_path: Path) -> None:
    make_ledger()
    ran = _cold_start(tmp_path)
    assert ran["answer"]["mode"] == "dry-run"
    modules = set(ran["modules"])
    assert "ami_janitor.aws.inventory.load" in modules
    assert not modules & NOT_IN_AN_EMPTY_REGION, sorted(modules & NOT_IN_AN_EMPTY_REGION)


@pytest.mark.usefixtures("endpoint")
def test_a_region_with_a_familys_amis_imports_the_reference_sources_it_reads(tmp_path: Path) -> None:
    make_ledger()
    seed_fleet(now())
    ran = _cold_start(tmp_path)
    assert ran["answer"]["mode"] == "dry-run"
    modules = set(ran["modules"])
    assert {
        "ami_janitor.aws.inventory.reference_sources",
        "ami_janitor.aws.inventory.instances",
        "ami_janitor.aws.inventory.launch_templates",
        "ami_janitor.aws.inventory.recycle_bin",
        "ami_janitor.aws.inventory.block_public_access",
    } <= modules
    assert "ami_janitor.roles" not in modules
