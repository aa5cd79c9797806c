"""Warnings about a policy that trusts more than it needs to.

A family's tags are the user's own selection, but anyone who may tag an AMI can write them: a family
matched by tags alone is only as safe as who may tag. A name glob as well closes that to the AMIs it
names (a name is set when the AMI is made and never changes); where the account has AMIs of those
names that the family's tags leave out, a tagger can enroll them, and the plan names them.

An S3 bucket name is global: the usage inbox named by name alone is whatever bucket holds that name,
so a mistyped name, or one deleted and taken by an outsider, lets the outsider forge the reports an
owner reads and receive those members write. `usage_reports.inbox_account` makes S3 check the owner.
"""

from __future__ import annotations

from collections.abc import Collection

from ami_janitor.core.model import RegionInventory
from ami_janitor.core.policy import Family, Policy

_LISTED = 5


def family_warnings(policy: Policy) -> list[str]:
    """One plan note per family matched by tags alone, in the policy's order."""
    return [
        f"family {family.name} is matched by tags alone: anyone who may tag an AMI can enroll it "
        "(add a name glob)"
        for family in policy.families
        if family.match.by_tags_alone
    ]


def families_by_tags_and_name(policy: Policy) -> list[Family]:
    return [f for f in policy.families if f.match.tags and not f.match.by_tags_alone]


def enrollable_warnings(inventory: RegionInventory, policy: Policy, members: Collection[str]) -> list[str]:
    """One plan note per family matched by tags and a name glob, where AMIs of the region that the glob
    names and no family selects (not among `members`, the ids of those the families grouped) lack its
    tags: a tag-writer can enroll them (they then count among its newest, may become its Latest, and
    are shared where it shares)."""
    mixed = families_by_tags_and_name(policy)
    if not mixed:
        return []
    loose = [image for image in inventory.images if image.image_id not in members]
    notes: list[str] = []
    for family in mixed:
        names = family.match.names
        outside = sorted(image.image_id for image in loose if names(image.name))
        if not outside:
            continue
        shown = ", ".join(outside[:_LISTED]) + (
            f" and {len(outside) - _LISTED} more" if len(outside) > _LISTED else ""
        )
        notes.append(
            f"{inventory.region}: family {family.name}: {len(outside)} AMI(s) its name glob {family.match.name} "
            f"names lack its tags ({shown}): anyone who may tag them can enroll them "
            f"{'and have them shared ' if family.share_with.grants() or family.public else ''}(narrow the name glob)"
        )
    return notes


def inbox_warnings(policy: Policy) -> list[str]:
    """A plan note where usage reports are configured without the inbox's owner account."""
    settings = policy.usage_reports
    if settings is None or settings.inbox_account is not None:
        return []
    return [
        f"the usage inbox's owner is not checked: whoever owns the bucket {settings.bucket} can forge "
        "the usage reports read and receives those written (set usage_reports.inbox_account)"
    ]
