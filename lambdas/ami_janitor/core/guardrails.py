"""Warnings about a policy that trusts more than it needs to.

A family's tags are the user's own selection, but anyone who may tag an AMI can write them: a family
matched by tags alone is only as safe as who may tag. A name glob as well closes that (a name is
set when the AMI is made and never changes).
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
