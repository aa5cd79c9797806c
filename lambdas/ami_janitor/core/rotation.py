"""Latest rotation: the changes a region needs now (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from ami_janitor.core.model import LatestChange, RegionInventory
from ami_janitor.core.planner import build_groups, pointer_errors, rotation
from ami_janitor.core.policy import Policy


def changes_for(
    inventory: RegionInventory,
    policy: Policy,
    now: datetime,
    *,
    families: Iterable[str] | None = None,
    architectures: Iterable[tuple[str, str]] | None = None,
) -> list[LatestChange]:
    """The Latest changes a region needs now, optionally only for some families or (family, arch)."""
    wanted_families = set(families) if families is not None else None
    wanted_groups = set(architectures) if architectures is not None else None
    groups, _ = build_groups(inventory, policy)
    errors = pointer_errors(groups, policy)
    changes = []
    for group in groups:
        if wanted_families is not None and group.family.name not in wanted_families:
            continue
        if wanted_groups is not None and (group.family.name, group.architecture) not in wanted_groups:
            continue
        change = rotation(group, inventory, now, errors.get(group.family.name))
        if change is not None:
            changes.append(change)
    return changes
