"""Launch permissions from `share_with`: grant what the family lists, revoke only what the janitor granted.

What the janitor granted is recorded in its ledger (the AMI's item, `grants`) before it grants it, and
marked (`granting`) until ModifyImageAttribute answers: a marked grant the family still lists is granted
again (a run died in between; adding a permission twice is harmless). The tag `ami-janitor:shared`
(then `:2`, `:3`, ...) mirrors that record for people and is never read here.
Planning compares the ledger's record with the policy, so the steady state costs no call per AMI
(DescribeImageAttribute is one call per AMI); `Public` comes with DescribeImages, so a public AMI whose
family does not say `public: true` is always seen. Grants somebody else made are left alone (the
planner reports them, and they keep the AMI unless `allow_shared`), whatever a tag says. So is one the
family lists that was in place before the janitor came to grant it (shared by hand first): the sharer
reads the AMI's launch permissions before it grants, makes and records as its own only what EC2 does not
show, and records the rest apart (`grants_found`), so that a later run neither plans them again nor revokes
them when the family stops listing them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime

from ami_janitor.core import trust
from ami_janitor.core.model import Image, RegionInventory, Share
from ami_janitor.core.planner import Grouped, build_groups
from ami_janitor.core.policy import Family, Policy

PUBLIC = "group:all"
# Launch permission reads per region and run that check the organizations' and OUs' grants (organization_checks).
ORGANIZATION_CHECKS_PER_RUN = 100


def _is_grant(key: str) -> bool:
    kind, _, value = key.partition(":")
    return key == PUBLIC or (kind in ("user", "org", "ou") and value != "")


def recorded_grants(image: Image) -> set[str]:
    """The grants the ledger records the janitor made on the AMI ("kind:value" keys); unreadable entries
    are ignored. No ledger item: none."""
    if image.ledger is None:
        return set()
    return {key for key in image.ledger.grants if _is_grant(key)}


def unconfirmed_grants(image: Image) -> set[str]:
    """The recorded grants whose ModifyImageAttribute never answered (the run died first)."""
    if image.ledger is None:
        return set()
    return recorded_grants(image) & set(image.ledger.granting)


def found_grants(image: Image) -> set[str]:
    """The grants the family lists that EC2 showed before the janitor granted them (somebody else's)."""
    if image.ledger is None:
        return set()
    return {key for key in image.ledger.grants_found if _is_grant(key)}


def desired_grants(family: Family) -> set[str]:
    """What the family shares: its share_with, plus the public group where it says public: true."""
    grants = set(family.share_with.grants())
    if family.public:
        grants.add(PUBLIC)
    return grants


def rescue_grants(policy: Policy, image: Image) -> frozenset[str]:
    """What a rescue of the AMI may grant again: what every family it matches shares now (none: nothing).
    An AMI a tag enrolled in a second family gets only what both share, never the other's grants."""
    families = [f for f in policy.families if f.match.matches(image.name, image.tags)]
    if not families:
        return frozenset()
    return frozenset.intersection(*(frozenset(desired_grants(f)) for f in families))


def _shareable(image: Image) -> bool:
    """An available AMI the janitor runs no clock on: a disabled AMI has no launch permissions, and a
    candidate's belong to the retirement stages."""
    return image.state == "available" and trust.open_item(image) is None


def _made_grants(image: Image) -> set[str]:
    """The grants the ledger records the janitor made (ModifyImageAttribute answered), where EC2 should
    show them (a shareable AMI); none elsewhere."""
    if not _shareable(image):
        return set()
    return recorded_grants(image) - unconfirmed_grants(image)


def grants_checked(policy: Policy, images: Iterable[Image]) -> dict[str, set[str]]:
    """By AMI id, the grants EC2 should show and whose loss the janitor would mend (share_for grants them
    again), so worth checking: those the ledger records it made, and those of its family's share_with it
    found already in place (somebody else's, which a disable and enable removes all the same). Only AMIs
    in exactly one family, not one matched by tags alone (share_for changes no launch permission of the
    others)."""
    checked: dict[str, set[str]] = {}
    for image in images:
        if not _shareable(image) or image.ledger is None:
            continue
        made, found = _made_grants(image), found_grants(image)
        if not (made or found):
            continue
        families = [f for f in policy.families if f.match.matches(image.name, image.tags)]
        if len(families) == 1 and not families[0].match.by_tags_alone:
            # A found grant the family no longer lists would not be made again: not looked for.
            grants = made | (found & desired_grants(families[0]))
            if grants:
                checked[image.image_id] = grants
    return checked


def accounts_in(grants: Iterable[str]) -> set[str]:
    """The accounts of the grants ('user:ID' keys)."""
    return {key.removeprefix("user:") for key in grants if key.startswith("user:")}


def organizations_in(grants: Iterable[str]) -> set[str]:
    """The organizations' and OUs' grants ('org:ARN', 'ou:ARN' keys)."""
    return {key for key in grants if key.startswith(("org:", "ou:"))}


def organization_checks(
    granted: Mapping[str, Collection[str]], day: int, limit: int = ORGANIZATION_CHECKS_PER_RUN
) -> list[str]:
    """Of `granted` (AMI id -> the grants EC2 should show, grants_checked), the AMIs whose launch
    permissions a scheduled run reads to see that their organizations' and OUs' grants are still in
    place: a disable and enable removes them, as it removes an account's, but EC2 can be asked which
    AMIs an account may launch (one call per account), not an organization. Every such AMI where they
    are at most `limit`; else every n-th of them by id (n = ceil(count / limit)), from `day` modulo n,
    so that over n days (`day`: the run's date) each is read once, and no run reads more than `limit`."""
    ids = sorted(image_id for image_id, grants in granted.items() if organizations_in(grants))
    if len(ids) <= limit:
        return ids
    every = -(-len(ids) // limit)
    return ids[day % every :: every]


def share_for(image: Image, family: Family) -> Share | None:
    """The change one member of `family` needs, or None.

    Only available AMIs that are not candidates: a disabled AMI has no launch permissions, and a
    candidate's permissions belong to the retirement stages (the disable stage records and removes them,
    a rescue restores them). Nor the members of a family matched by tags alone: anyone who may tag an
    AMI can enroll it there, and a tag must neither widen a launch permission (the policy refuses
    `share_with` and `public` there) nor revoke one (a public AMI, or grants recorded while it was in a
    family that shared): they stay, and keep the AMI as any share it does not list."""
    if not _shareable(image) or family.match.by_tags_alone:
        return None
    desired = desired_grants(family)
    recorded = recorded_grants(image)
    add = desired - (recorded - unconfirmed_grants(image)) - found_grants(image)
    if image.launch_permissions is not None:
        # Loaded for this AMI anyway: a grant removed by hand is granted again.
        add |= desired - {p.key for p in image.launch_permissions}
    if PUBLIC in desired and not image.public:
        add.add(PUBLIC)
    remove = recorded - desired  # never a grant found in place: somebody else's
    if image.public and PUBLIC not in desired:
        remove.add(PUBLIC)  # whoever made it public: only `public: true` allows it
    if not add and not remove:
        return None
    return Share(image_id=image.image_id, region=image.region, add=sorted(add), remove=sorted(remove))


def plan_shares(
    inventories: Sequence[RegionInventory], policy: Policy, now: datetime, grouped: Grouped | None = None
) -> list[Share]:
    """The launch permission changes of every managed AMI (sources and replicas) in every region with a
    usable inventory. Order: region, family, architecture, newest first. AMIs of several families are
    left alone (a policy error the planner reports). `now` is unused: shares do not depend on age."""
    del now
    shares: list[Share] = []
    for inventory in sorted(inventories, key=lambda inv: inv.region):
        if inventory.error is not None:
            continue
        groups, conflicts = grouped[inventory.region] if grouped else build_groups(inventory, policy)
        for group in groups:
            for image in group.members:
                share = None if image.image_id in conflicts else share_for(image, group.family)
                if share is not None:
                    shares.append(share)
    return shares


def public_apart(grants: Iterable[str]) -> list[list[str]]:
    """The grants in the calls that make them: the accounts, organizations and OUs, then the public group
    alone (image block public access refuses only that one)."""
    grants = list(grants)
    calls = [[g for g in grants if g != PUBLIC], [g for g in grants if g == PUBLIC]]
    return [call for call in calls if call]
