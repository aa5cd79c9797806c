"""Which instance a family's bake images: the rule shared by the bake and the plan (pure, no AWS).

Anyone allowed to launch or tag an instance can make one carry a family's bake tags, so a tag alone
never chooses between instances: with `bake.instance_id` the bake images that instance only (and,
when `bake.instance_tag` is also set, only while it carries those tags); without it, exactly one live
instance (pending, running, stopping or stopped) may carry the tags, and several are refused; the one
is imaged when it is running or stopped. (Counting only running or stopped ones, a lookalike would be
the only one while the build instance starts or stops.)
"""

from collections.abc import Iterable
from typing import NamedTuple

from ami_janitor.core.model import BuildInstance
from ami_janitor.core.policy import Family

# CreateImage images a running or stopped instance; one on its way between the two is not chosen.
BAKEABLE_STATES = frozenset({"running", "stopped"})
# An instance that is, or will soon be, running or stopped: each counts among a family's tagged ones.
LIVE_STATES = BAKEABLE_STATES | {"pending", "stopping"}
PINNED = "pinned by bake.instance_id"


class Choice(NamedTuple):
    """The instance to image and why, or (instance_id None) why the bake refuses."""

    instance_id: str | None
    reason: str

    @property
    def refused(self) -> bool:
        return self.instance_id is None


def tags_text(tags: dict[str, str]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(tags.items()))


def carries(instance_tags: dict[str, str], wanted: dict[str, str]) -> bool:
    return all(instance_tags.get(key) == value for key, value in wanted.items())


def is_named_by(family: Family, instance_id: str, tags: dict[str, str]) -> bool:
    """The family's bake names this instance (its pinned id, or its tags): worth recording."""
    bake = family.bake
    if bake is None:
        return False
    if bake.instance_id is not None:
        return instance_id == bake.instance_id
    return bake.instance_tag is not None and carries(tags, bake.instance_tag)


def choose(family: Family, region: str, instances: Iterable[BuildInstance]) -> Choice:
    """The instance the family's bake images in `region`, among the live `instances` found there."""
    bake = family.bake
    if bake is None:
        return Choice(None, f"family {family.name} has no bake section")
    if bake.instance_id is not None:
        return _pinned(family, bake.instance_id, bake.instance_tag, region, instances)
    return _only_tagged(family, bake.instance_tag or {}, region, instances)


def _pinned(
    family: Family,
    instance_id: str,
    tags: dict[str, str] | None,
    region: str,
    instances: Iterable[BuildInstance],
) -> Choice:
    prefix = f"family {family.name}: bake.instance_id {instance_id}"
    found = next((i for i in instances if i.instance_id == instance_id), None)
    if found is None:
        return Choice(None, f"{prefix} does not exist in {region}")
    if found.state not in BAKEABLE_STATES:
        return Choice(None, f"{prefix} is {found.state}; only a running or stopped instance is baked")
    if tags and not carries(found.tags, tags):
        return Choice(None, f"{prefix} does not carry the tags {tags_text(tags)} (bake.instance_tag)")
    return Choice(instance_id, PINNED)


def _only_tagged(
    family: Family, tags: dict[str, str], region: str, instances: Iterable[BuildInstance]
) -> Choice:
    wanted = tags_text(tags)
    tagged = sorted(
        (i for i in instances if i.state in LIVE_STATES and carries(i.tags, tags)),
        key=lambda i: i.instance_id,
    )
    if not tagged:
        return Choice(
            None,
            f"family {family.name}: no running or stopped instance in {region} carries the tags "
            f"{wanted} (bake.instance_tag)",
        )
    if len(tagged) > 1:
        named = ", ".join(f"{i.instance_id} ({i.state})" for i in tagged)
        return Choice(
            None,
            f"family {family.name}: {len(tagged)} instances in {region} carry the tags {wanted} "
            f"(bake.instance_tag): {named}; anyone who can launch or tag an instance can add one, so none "
            "is chosen: pin the build instance with bake.instance_id or pass --instance-id",
        )
    [only] = tagged
    if only.state not in BAKEABLE_STATES:
        return Choice(
            None,
            f"family {family.name}: the only instance in {region} tagged {wanted}, {only.instance_id}, is "
            f"{only.state}; only a running or stopped instance is baked",
        )
    return Choice(only.instance_id, f"the only instance tagged {wanted}")
