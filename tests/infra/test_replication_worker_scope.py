"""The replication worker of a region that is only a replicate target never copies: its role has none of
the copy's grants (no CopyImage, no replica key, no other region's ledger)."""

from __future__ import annotations

from typing import Any

import pytest
from synth_support import Synth, as_list, flatten, functions_by_handler, ref_id

pytestmark = pytest.mark.slow  # reads the synthesized templates


def _statements(template: dict[str, Any], role_id: str) -> list[dict[str, Any]]:
    role = template["Resources"][role_id]["Properties"]
    return [s for policy in role.get("Policies", []) for s in policy["PolicyDocument"]["Statement"]]


def test_a_target_only_region_s_replication_worker_may_not_copy_or_use_replica_keys(
    synth: Synth, infra_policy: Any
) -> None:
    """Copies start only from the policy's `regions` (replication.allowed_target refuses any other source;
    plan_replication and the AMI event plan none elsewhere; a failed replica is retried by the source
    region's run). The worker of a region that is only a replicate target therefore never calls CopyImage,
    and its role must not be able to copy into the other targets, create grants on their KMS keys or write
    their ledger tables."""
    targets_only = sorted(set(infra_policy.managed_regions) - set(infra_policy.regions))
    assert targets_only == ["eu-west-1", "us-west-2"]
    for region in targets_only:
        template = synth.template(f"AmiJanitor-{region}")
        _, props = functions_by_handler(template)["replicate"]
        role_id = str(ref_id(props["Role"]))
        too_much = []
        for statement in _statements(template, role_id):
            actions = as_list(statement["Action"])
            resources = [flatten(r) for r in as_list(statement["Resource"])]
            copies = "ec2:CopyImage" in actions or any(a.startswith("kms:") for a in actions)
            other_ledgers = any(a.startswith("dynamodb:") for a in actions) and any(
                f":dynamodb:{region}:" not in r for r in resources
            )
            if copies or other_ledgers:
                too_much.append((statement.get("Sid"), actions, resources))
        assert not too_much, (
            f"{region} is only a replicate target (no source there): its replication worker never copies, "
            f"yet its role may: {too_much}"
        )
