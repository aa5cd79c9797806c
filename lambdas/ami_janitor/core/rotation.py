"""Latest rotation: the changes a region needs now (pure)."""

from datetime import datetime
from typing import NamedTuple

from ami_janitor.core.model import LatestChange, RegionInventory
from ami_janitor.core.planner import Group, build_groups, rotation, rotation_errors
from ami_janitor.core.policy import Policy


class Selection(NamedTuple):
    """The groups a rotation looks at: every group, or those of some families, or some (family,
    architecture) groups (an AMI's event rotates only its own group)."""

    families: frozenset[str] | None = None
    groups: frozenset[tuple[str, str]] | None = None

    def covers(self, group: Group) -> bool:
        key = (group.family.name, group.architecture)
        return (self.families is None or key[0] in self.families) and (
            self.groups is None or key in self.groups
        )


EVERY_GROUP = Selection()


def changes_for(
    inventory: RegionInventory, policy: Policy, now: datetime, only: Selection = EVERY_GROUP
) -> list[LatestChange]:
    """The Latest changes a region needs now, for the groups `only` selects."""
    return rotation_for(inventory, policy, now, only)[0]


def rotation_for(
    inventory: RegionInventory, policy: Policy, now: datetime, only: Selection = EVERY_GROUP
) -> tuple[list[LatestChange], list[str]]:
    """The Latest changes a region needs now for the groups `only` selects, and why any of those groups
    is left as it is (a policy error, once per message)."""
    changes, blocked = rotation_by_group(inventory, policy, now, only)
    return changes, list(dict.fromkeys(blocked.values()))


def rotation_by_group(
    inventory: RegionInventory, policy: Policy, now: datetime, only: Selection = EVERY_GROUP
) -> tuple[list[LatestChange], dict[tuple[str, str], str]]:
    """rotation_for, the groups left as they are by (family, architecture): a group in neither needs
    no change (it agrees with the region)."""
    groups, conflicts = build_groups(inventory, policy)
    errors = rotation_errors(groups, conflicts, policy, now, inventory)
    changes = []
    blocked: dict[tuple[str, str], str] = {}
    for group in groups:
        if not only.covers(group):
            continue
        key = (group.family.name, group.architecture)
        error = errors.get(key)
        if error:
            blocked[key] = error
        change = rotation(group, inventory, now, error)
        if change is not None:
            changes.append(change)
    return changes, blocked
