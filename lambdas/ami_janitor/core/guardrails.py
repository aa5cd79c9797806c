"""Warnings about a policy that trusts more than it needs to.

A family's tags are the user's own selection, but anyone who may tag an AMI can write them: a family
matched by tags alone is only as safe as who may tag. A name glob as well closes that to the AMIs it
names (a name is set when the AMI is made and never changes); where the account has AMIs of those
names that the family's tags leave out, a tagger can enroll them, and the plan names them.

A build instance named by `bake.instance_tag` alone is whichever live instance carries the tag: anyone
who may tag instances can move it to one of their own, and the plan says so where the family hands on
what it bakes. `bake.instance_id` pins it (with the tag, the pinned instance must carry it too).

An S3 bucket name is global: the usage inbox named by name alone is whatever bucket holds that name,
so a mistyped name, or one deleted and taken by an outsider, lets the outsider forge the reports an
owner reads and receive those members write. `usage_reports.inbox_account` makes S3 check the owner.

A usage report is not dated against the share it is read for: one written just before an account was
granted an AMI does not name it, yet stays fresh for `max_age_hours`. The disable stage's brownout is
what covers that window, where it lasts at least that long before deregistration.
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


def bake_warnings(policy: Policy) -> list[str]:
    """One plan note per family that bakes the instance its `bake.instance_tag` names, not a pinned one,
    and hands on what it bakes (shares it, makes it public, or moves Latest to it): whoever may tag
    instances can take the tag off the build instance and put it on one of their own, the only tagged
    one then, which the bake images under the family's name and tags."""
    notes: list[str] = []
    for family in policy.families:
        bake = family.bake
        if bake is None or bake.instance_id is not None or not bake.instance_tag:
            continue
        handed = [
            what
            for what, done in (
                ("shares", bool(family.share_with.grants())),
                ("makes public", family.public),
                ("makes Latest", family.latest is not None),
            )
            if done
        ]
        if not handed:
            continue
        tags = ", ".join(f"{key}={value}" for key, value in sorted(bake.instance_tag.items()))
        notes.append(
            f"family {family.name} bakes the only live instance tagged {tags} and {', '.join(handed)} what "
            "it bakes: anyone who may tag instances can choose that instance (pin bake.instance_id)"
        )
    return notes


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


def brownout_warnings(policy: Policy) -> list[str]:
    """One plan note, with usage reports, naming the sharing families (by share_with, or allow_shared)
    that deregister sooner after the disable stage (or without one) than a report stays fresh."""
    settings = policy.usage_reports
    if settings is None:
        return []
    short: list[str] = []
    for family in policy.families:
        rules = policy.rules_for(family)
        deregister, disable = rules.lifecycle.deregister_after_days, rules.lifecycle.disable_after_days
        # Shared by the policy, or by hand where allow_shared lets shared AMIs retire.
        if not (family.share_with.grants() or rules.allow_shared) or deregister is None:
            continue
        hours = 0 if disable is None else (deregister - disable) * 24
        if hours < settings.max_age_hours:
            short.append(f"{family.name} ({'no disable stage' if disable is None else f'{hours} hours'})")
    if not short:
        return []
    days = -(-settings.max_age_hours // 24)
    return [
        f"families that deregister sooner after the disable stage than usage_reports.max_age_hours "
        f"({settings.max_age_hours}): {', '.join(short)}. A usage report written before an account was "
        "granted an AMI does not name it, yet counts while fresh: keep disable_after_days at least "
        f"{days} day(s) before deregister_after_days where shares change"
    ]


def inbox_warnings(policy: Policy) -> list[str]:
    """A plan note where usage reports are configured without the inbox's owner account."""
    settings = policy.usage_reports
    if settings is None or settings.inbox_account is not None:
        return []
    return [
        f"the usage inbox's owner is not checked: whoever owns the bucket {settings.bucket} can forge "
        "the usage reports read and receives those written (set usage_reports.inbox_account)"
    ]
