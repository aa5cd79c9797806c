"""The recipe: one region's inventory read source by source, each step's outputs feeding the next.

The sources only some regions need are imported where they are read: the reference sources
(reference_sources) where AMIs are in a family, the per-AMI reads (DescribeImageReferences, launch
permissions, usage reports) for the AMIs a plan chose, Recycle Bin and image block public access where
there is something they concern. A region with no AMI (most regions of most accounts) never imports
them: a cold start of its scheduled run reads only its AMIs, retired snapshots and ledger."""

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

from ami_janitor.aws.inventory.copy_sources import read_copy_sources
from ami_janitor.aws.inventory.images import read_images
from ami_janitor.aws.inventory.ledger_items import read_ledger
from ami_janitor.aws.inventory.pointers import Pointers, read_pointer_values
from ami_janitor.aws.inventory.reading import SourceFailed, ahead, clients_first
from ami_janitor.aws.inventory.snapshots import read_retired_snapshots
from ami_janitor.core.model import (
    Image,
    LedgerView,
    RegionInventory,
    RetiredSnapshot,
    with_ledger,
)
from ami_janitor.core.policy import Policy

if TYPE_CHECKING:
    from ami_janitor.aws.clients import RegionClients


def load_inventory(clients: "RegionClients", policy: Policy, now: datetime | None = None) -> RegionInventory:
    """Everything the planner needs about one region, or an inventory with only `error` set. `now`, the
    run's time, says which AMIs granted an organization this run checks (load_lost_grants)."""
    try:
        loaded = _read_inventory(clients, policy)
    except SourceFailed as failure:
        return RegionInventory(region=clients.region, error=str(failure))
    if not any(
        image.ledger is not None and (image.ledger.grants or image.ledger.grants_found)
        for image in loaded.images
    ):
        return loaded
    # Grants the janitor made (or found in place) that EC2 no longer shows (the AMI disabled and enabled
    # again since).
    from ami_janitor.aws.inventory.launch_permissions import load_lost_grants

    return load_lost_grants(clients, loaded, policy, day=now.toordinal() if now is not None else 0)


def _read_inventory(clients: "RegionClients", policy: Policy) -> RegionInventory:
    # The sources are read in this order, so the first to fail names the region's error; the claims
    # keep it too, so that notes come out in the order of the resources they are about. What the plan
    # reports beside its decisions depends on no other source: it is read ahead, beside them.
    clients_first(clients, "ec2", "dynamodb")
    with (
        ahead(clients, lambda: read_retired_snapshots(clients.ec2)) as retired_snapshots,
        ahead(clients, lambda: read_ledger(clients, policy.ledger.table)) as ledger,
    ):
        images = read_images(clients.ec2, clients.region)
        # Image block public access is about the region's AMIs: where it has none, there is nothing to
        # make public, and the state is not asked (most regions of most accounts hold no AMI).
        with _public_access_read(clients) if images else nullcontext(list[str]) as public_access:
            return _read_sources(
                clients,
                policy,
                images,
                lambda images: _read_beside(clients, images, retired_snapshots(), public_access(), ledger()),
            )


def _public_access_read(clients: "RegionClients") -> AbstractContextManager[Callable[[], list[str]]]:
    """The image block public access state, read ahead (a region with AMIs)."""
    from ami_janitor.aws.inventory.block_public_access import read_block_public_access

    return ahead(clients, lambda: read_block_public_access(clients.ec2, clients.region))


def _read_sources(
    clients: "RegionClients",
    policy: Policy,
    images: tuple[Image, ...],
    read_beside: "Callable[[tuple[Image, ...]], _Beside]",
) -> RegionInventory:
    region = clients.region
    # An account that reports its use of other accounts' AMIs reads its references everywhere.
    if policy.usage_reports is None and not any(_in_a_family(policy, image) for image in images):
        return _without_references(clients, policy, images, read_beside)
    from ami_janitor.aws.inventory.image_references import sort_references
    from ami_janitor.aws.inventory.reference_sources import read_reference_sources

    pointers = Pointers.of(policy, images)
    found = read_reference_sources(clients, policy, pointers)
    latest = read_pointer_values(clients.ssm, pointers, found.parameter_values)
    beside = read_beside(images)
    inventory = RegionInventory(
        region=region,
        images=images,
        references=sort_references(found.references),
        build_instances=found.instances.builds,
        parameters=latest,
        retired_snapshots=beside.retired_snapshots,
        recycle_bin_rules=beside.recycle_bin_rules,
        ledger=beside.ledger,
        instance_ids=found.instances.ids,
        parameter_names=frozenset(found.parameter_values),
        notes=tuple(dict.fromkeys([*found.notes, *beside.notes])),
    )
    return _with_copy_sources(clients, policy, with_ledger(inventory))


def _with_copy_sources(
    clients: "RegionClients", policy: Policy, inventory: RegionInventory
) -> RegionInventory:
    """The inventory's copies counted from their sources' creation (copy_sources)."""
    images, notes = read_copy_sources(inventory.images, inventory.region, policy, clients.ec2_in)
    if not notes and images is inventory.images:
        return inventory
    return inventory._replace(images=images, notes=tuple(dict.fromkeys([*inventory.notes, *notes])))


class _Beside(NamedTuple):
    """What the plan reports beside its decisions, read in every region (Recycle Bin and image block
    public access only where there is something they concern)."""

    retired_snapshots: tuple[RetiredSnapshot, ...]
    recycle_bin_rules: tuple[str, ...]
    notes: list[str]
    ledger: LedgerView | None


def _read_beside(
    clients: "RegionClients",
    images: tuple[Image, ...],
    retired_snapshots: tuple[RetiredSnapshot, ...],
    block_public_access_notes: list[str],
    ledger: LedgerView | None,
) -> _Beside:
    recycle_bin_rules: tuple[str, ...] = ()
    recycle_bin_notes: list[str] = []
    # Recycle Bin only matters where a snapshot may be deleted: not in a region with no AMI, no retired
    # snapshot and nothing in the ledger (an empty region's run makes no rbin client).
    if images or retired_snapshots or (ledger is not None and ledger.items):
        from ami_janitor.aws.inventory.recycle_bin import read_recycle_bin_rules

        recycle_bin_rules, recycle_bin_notes = read_recycle_bin_rules(clients.rbin, clients.region)
    return _Beside(
        retired_snapshots, recycle_bin_rules, [*recycle_bin_notes, *block_public_access_notes], ledger
    )


def _in_a_family(policy: Policy, image: Image) -> bool:
    return any(family.match.matches(image.name, image.tags) for family in policy.families)


def _without_references(
    clients: "RegionClients",
    policy: Policy,
    images: tuple[Image, ...],
    read_beside: Callable[[tuple[Image, ...]], _Beside],
) -> RegionInventory:
    """A region where no AMI matches a family: the plan decides nothing there, so nothing a reference
    could keep and no Latest to rotate; the reference sources and the pointers are not read (nor their
    clients made). What the plan says beside its decisions is read as always: the instances a bake
    names, the retired snapshots, Recycle Bin, image block public access (the region has AMIs) and
    the ledger."""
    instances = None
    if any(family.bake is not None for family in policy.families):
        from ami_janitor.aws.inventory.instances import read_instances

        instances = read_instances(clients.ec2, policy)
    beside = read_beside(images)
    inventory = RegionInventory(
        region=clients.region,
        images=images,
        build_instances=instances.builds if instances is not None else (),
        retired_snapshots=beside.retired_snapshots,
        recycle_bin_rules=beside.recycle_bin_rules,
        ledger=beside.ledger,
        instance_ids=instances.ids if instances is not None else frozenset(),
        notes=tuple(dict.fromkeys(beside.notes)),
    )
    return with_ledger(inventory)


def load_details(
    clients: "RegionClients", policy: Policy, inventory: RegionInventory, image_ids: Iterable[str]
) -> RegionInventory:
    """The per-AMI reads, after the plan chose the AMIs that need them (those it acts on or runs a clock
    on): DescribeImageReferences (what the other sources cannot see, Image Builder recipes mostly), then
    their launch permissions. Any failure but "not offered here" makes the region an error."""
    if inventory.error is not None:
        return inventory
    wanted = set(image_ids)
    # Those whose launch permissions were read already (a lost grant's check) are described all the same.
    unread = [i.image_id for i in inventory.images if i.image_id in wanted]
    if not unread:
        return inventory
    from ami_janitor.aws.inventory.image_references import read_image_references, sort_references
    from ami_janitor.aws.inventory.launch_permissions import load_launch_permissions

    try:
        described, notes = read_image_references(
            clients.ec2,
            clients.region,
            unread,
            known=inventory.references,
            pointers=Pointers.of(policy, inventory.images),
            live_instances=inventory.instance_ids,
            parameter_names=inventory.parameter_names,
        )
    except SourceFailed as failure:
        return RegionInventory(region=inventory.region, notes=inventory.notes, error=str(failure))
    described_inventory = inventory._replace(
        references=sort_references([*inventory.references, *described]),
        notes=tuple(dict.fromkeys([*inventory.notes, *notes])),
    )
    # A disabled AMI has no launch permissions (disabling makes it private): nothing to ask.
    shareable = [
        i.image_id
        for i in described_inventory.images
        if i.image_id in wanted and i.state == "available" and i.launch_permissions is None
    ]
    loaded = load_launch_permissions(clients, described_inventory, shareable)
    if loaded.error is not None:
        return loaded
    images = tuple(
        i.model_copy(update={"launch_permissions": ()})
        if i.image_id in wanted and i.launch_permissions is None
        else i
        for i in loaded.images
    )
    loaded = loaded._replace(images=images)
    if policy.usage_reports is None:
        return loaded
    from ami_janitor.aws.usage import load_usage

    return load_usage(clients, policy.usage_reports, loaded, wanted)


def load_images(clients: "RegionClients", policy: Policy) -> RegionInventory:
    """Only the AMIs and the Latest pointer values: enough for rotation, cheap enough for every event."""
    try:
        images = read_images(clients.ec2, clients.region)
        latest = read_pointer_values(clients.ssm, Pointers.of(policy, images), scanned={})
        ledger = read_ledger(clients, policy.ledger.table)
        inventory = with_ledger(
            RegionInventory(region=clients.region, images=images, parameters=latest, ledger=ledger)
        )
        return _with_copy_sources(clients, policy, inventory)
    except SourceFailed as failure:
        return RegionInventory(region=clients.region, error=str(failure))
