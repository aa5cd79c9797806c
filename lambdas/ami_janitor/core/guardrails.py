"""Warnings about a policy that trusts more than it needs to.

A family's tags are the user's own selection, but anyone who may tag an AMI can write them: a family
matched by tags alone is only as safe as who may tag. A name glob as well closes that (a name is
set when the AMI is made and never changes).

An S3 bucket name is global: the usage inbox named by name alone is whatever bucket holds that name,
so a mistyped name, or one deleted and taken by an outsider, lets the outsider forge the reports an
owner reads and receive those members write. `usage_reports.inbox_account` makes S3 check the owner.
"""

from __future__ import annotations

from ami_janitor.core.policy import Policy


def family_warnings(policy: Policy) -> list[str]:
    """One plan note per family matched by tags alone, in the policy's order."""
    return [
        f"family {family.name} is matched by tags alone: anyone who may tag an AMI can enroll it "
        "(add a name glob)"
        for family in policy.families
        if family.match.by_tags_alone
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
