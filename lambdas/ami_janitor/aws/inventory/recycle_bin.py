"""Recycle Bin retention rules for AMIs and snapshots: where one covers them, deregistering frees
nothing yet, and the plan says so.

Optional: a partition without Recycle Bin (no endpoint, or the operation not offered) gives a note.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ami_janitor.aws.inventory.reading import items, optional

if TYPE_CHECKING:
    from mypy_boto3_rbin import RecycleBinClient

PERMISSIONS: list[str] = ["rbin:ListRules"]

_RESOURCE_TYPES = ("EC2_IMAGE", "EBS_SNAPSHOT")


def read_recycle_bin_rules(rbin: RecycleBinClient, region: str) -> tuple[tuple[str, ...], list[str]]:
    """One line per rule, sorted, and a note when Recycle Bin is not available here."""
    rules = optional("rbin:ListRules", lambda: _rules(rbin), endpoint_may_lack=True)
    if rules is None:
        return (), [f"Recycle Bin is not available in {region}; freed storage assumes no retention rule"]
    return tuple(rules), []


def _rules(rbin: RecycleBinClient) -> list[str]:
    lines: list[str] = []
    for resource_type in _RESOURCE_TYPES:
        for rule in items(rbin, "list_rules", "Rules", 1000, ResourceType=resource_type):
            period = rule.get("RetentionPeriod") or {}
            unit = str(period.get("RetentionPeriodUnit") or "DAYS").lower()
            line = f"Recycle Bin rule {rule.get('Identifier')} retains {resource_type} for "
            line += f"{period.get('RetentionPeriodValue')} {unit}"
            lines.append(line + (" (locked)" if rule.get("LockState") == "locked" else ""))
    return sorted(lines)
