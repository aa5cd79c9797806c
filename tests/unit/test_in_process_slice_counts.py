"""The CLI's in-process slices (`ami-janitor apply`, engine.run without a work queue) hold back what a
fresh read puts in doubt, as the slice worker does; the run's report counts those AMIs as held back, as
the worker's run record does. In-memory EC2 and ledger (tests/fake_ec2.py, tests/fake_aws.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ami_janitor import engine
from ami_janitor.core.policy import parse_policy
from fake_aws import region_clients
from fake_ec2 import FakeEC2, FakeImage

REGION = "us-east-1"
# The wall clock: deprecate_at never deprecates in the past.
START = datetime.now(UTC).replace(second=0, microsecond=0)
POLICY = parse_policy(
    {
        "mode": "enforce",
        "regions": [REGION],
        "defaults": {
            "keep_latest": 1,
            "min_age_days": 0,
            "lifecycle": {"deprecate_after_days": 0, "disable_after_days": 0, "deregister_after_days": 0},
            "limits": {"max_actions_per_run": 50, "max_fraction_per_family": 1.0},
        },
        "families": [{"name": "app", "match": {"name": "app-*"}}],
    }
)
OPTED_OUT = "ami-00000000"


def test_the_cli_apply_report_counts_the_amis_its_in_process_slices_held_back() -> None:
    fake = FakeEC2(REGION)
    fake.clock = START
    for n in range(3):
        fake.add_image(
            FakeImage(
                f"ami-{n:08x}", f"app-{n}", START - timedelta(days=100 - n), snapshot_ids=(f"snap-{n}",)
            )
        )
    clients = region_clients(fake)

    def progress(line: str) -> None:
        # Between the plan and its slice (the line `apply` prints before each slice): the owner opts
        # one of the planned AMIs out.
        if "slice 1 of 1" in line:
            fake.images[OPTED_OUT].tags["ami-janitor:keep"] = "yes"

    result = engine.run(POLICY, [REGION], lambda _region: clients, START, apply=True, progress=progress)

    held = {
        r.image_id
        for r in result.results
        if r.status == "skipped" and (r.detail or "").startswith("held back: ")
    }
    assert held == {OPTED_OUT}, result.results  # the slice held it back, as the worker's would
    assert fake.images[OPTED_OUT].state == "available"
    summary = result.report().summary
    # As the worker's report counts it for the same slice (its run record): apply's report, printed by
    # `apply --format json`, said 0 beside the plan's `retired: 2`.
    assert summary.held_back == 1, summary
