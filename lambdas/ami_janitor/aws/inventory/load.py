"""The recipe: one region's inventory read source by source, each step's outputs feeding the next."""

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from ami_janitor.aws.inventory import (
    aliases,
    auto_scaling_groups,
    batch,
    emr,
    fleets,
    instances,
    launch_configurations,
    launch_templates,
    parameters,
    template_uses,
)
from ami_janitor.aws.inventory.aliases import resolve_aliases
from ami_janitor.aws.inventory.auto_scaling_groups import read_auto_scaling_groups
from ami_janitor.aws.inventory.batch import read_batch_compute_environments
from ami_janitor.aws.inventory.block_public_access import read_block_public_access
from ami_janitor.aws.inventory.claims import Claims, named_aliases, references_of
from ami_janitor.aws.inventory.copy_sources import read_copy_sources
from ami_janitor.aws.inventory.emr import read_emr_clusters
from ami_janitor.aws.inventory.fleets import read_ec2_fleets, read_spot_fleets
from ami_janitor.aws.inventory.image_references import read_image_references, sort_references
from ami_janitor.aws.inventory.images import read_images
from ami_janitor.aws.inventory.instances import Instances, read_instances
from ami_janitor.aws.inventory.launch_configurations import (
    launch_configuration_claims,
    read_launch_configurations,
)
from ami_janitor.aws.inventory.launch_permissions import load_launch_permissions
from ami_janitor.aws.inventory.launch_templates import read_launch_templates
from ami_janitor.aws.inventory.ledger_items import read_ledger
from ami_janitor.aws.inventory.parameters import parameter_claims, read_parameters
from ami_janitor.aws.inventory.pointers import Pointers, read_pointer_values
from ami_janitor.aws.inventory.reading import SourceFailed
from ami_janitor.aws.inventory.recycle_bin import read_recycle_bin_rules
from ami_janitor.aws.inventory.snapshots import read_retired_snapshots
from ami_janitor.aws.inventory.template_uses import read_missing_versions, template_claims
from ami_janitor.aws.usage import load_usage
from ami_janitor.core.model import (
    Image,
    LedgerView,
    Reference,
    RegionInventory,
    RetiredSnapshot,
    with_ledger,
)
from ami_janitor.core.policy import Policy

if TYPE_CHECKING:
    from ami_janitor.aws.clients import RegionClients

T = TypeVar("T")

# What read_reference_sources calls (a slice reads them too: beside DescribeImageReferences, or all of
# them where that API is not offered).
REFERENCE_SOURCE_PERMISSIONS: list[str] = sorted(
    set().union(
        aliases.PERMISSIONS,
        auto_scaling_groups.PERMISSIONS,
        batch.PERMISSIONS,
        emr.PERMISSIONS,
        fleets.PERMISSIONS,
        instances.PERMISSIONS,
        launch_configurations.PERMISSIONS,
        launch_templates.PERMISSIONS,
        parameters.PERMISSIONS,
        template_uses.PERMISSIONS,
    )
)


def load_inventory(clients: "RegionClients", policy: Policy) -> RegionInventory:
    """Everything the planner needs about one region, or an inventory with only `error` set."""
    try:
        return _read_inventory(clients, policy)
    except SourceFailed as failure:
        return RegionInventory(region=clients.region, error=str(failure))


@contextmanager
def _ahead(clients: "RegionClients", read: Callable[[], T]) -> Iterator[Callable[[], T]]:
    """`read` started now, on a thread of its own, while the caller reads its other sources: their calls
    wait on the network side by side. Its answer (or its SourceFailed) comes where the caller asks for
    it, so the first source to fail in the recipe's order still names the region's error. With one read
    worker (a Stubber expects its calls in order) `read` runs where it is asked for."""
    if clients.read_workers <= 1:
        yield read
        return
    with ThreadPoolExecutor(max_workers=1) as pool:  # waited for, even when another source fails
        yield pool.submit(read).result


def _read_inventory(clients: "RegionClients", policy: Policy) -> RegionInventory:
    # The sources are read in this order, so the first to fail names the region's error; the claims
    # keep it too, so that notes come out in the order of the resources they are about. What the plan
    # reports beside its decisions depends on no other source: it is read ahead, beside them.
    with (
        _ahead(clients, lambda: read_retired_snapshots(clients.ec2)) as retired_snapshots,
        _ahead(clients, lambda: read_ledger(clients, policy.ledger.table)) as ledger,
    ):
        images = read_images(clients.ec2, clients.region)
        # Image block public access is about the region's AMIs: where it has none, there is nothing to
        # make public, and the state is not asked (most regions of most accounts hold no AMI).
        public_access_read = (
            _ahead(clients, lambda: read_block_public_access(clients.ec2, clients.region))
            if images
            else nullcontext(list[str])
        )
        with public_access_read as public_access:
            return _read_sources(
                clients,
                policy,
                images,
                lambda images: _read_beside(clients, images, retired_snapshots(), public_access(), ledger()),
            )


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


class ReferenceSources(NamedTuple):
    """What the reference sources (every one but DescribeImageReferences) found in a region."""

    references: list[Reference]
    instances: Instances
    parameter_values: dict[str, str]
    notes: list[str]


_NO_INSTANCES = Instances(ids=frozenset(), claims=[], builds=())


def read_reference_sources(
    clients: "RegionClients",
    policy: Policy,
    pointers: Pointers,
    *,
    beside_image_references: datetime | None = None,
) -> ReferenceSources:
    """Every reference source of the region, read in full (the parameters `pointers` owns are no
    references). Raises SourceFailed naming the first source that cannot be read.

    `beside_image_references` (a slice's plan time): what DescribeImageReferences may not find, beside
    it. Not the instances (it finds them); the plain-text SSM parameters changed since then only (it
    may look only at parameters of the `aws:ec2:image` data type, where the plan reads every value);
    the other sources in full (it looks at no launch configuration, Auto Scaling group, fleet, Batch
    or EMR; launch templates are read too, as the policy counts their versions and as those name them)."""
    ec2, ssm = clients.ec2, clients.ssm
    versions = policy.references.launch_template_versions
    since = beside_image_references

    def instance_source() -> Instances:
        return _NO_INSTANCES if since is not None else read_instances(ec2, policy)

    def parameter_source() -> dict[str, str]:
        return read_parameters(ssm, changed_since=since)

    # The reference sources depend on no other: all read side by side, their answers taken in order.
    with (
        _ahead(clients, instance_source) as instances_read,
        _ahead(clients, parameter_source) as parameters_read,
        _ahead(clients, lambda: read_launch_templates(ec2, versions)) as templates_read,
        _ahead(clients, lambda: _read_auto_scaling(clients)) as auto_scaling_read,
        _ahead(clients, lambda: read_spot_fleets(ec2)) as spot_fleets_read,
        _ahead(clients, lambda: read_ec2_fleets(ec2)) as ec2_fleets_read,
        _ahead(clients, lambda: read_batch_compute_environments(clients.batch)) as batch_read,
        _ahead(clients, lambda: read_emr_clusters(clients.emr)) as emr_read,
    ):
        instances = instances_read()
        parameter_values = parameters_read()
        templates, version_claims = templates_read()
        configurations, groups = auto_scaling_read()
        spot_fleets = spot_fleets_read()
        ec2_fleets = ec2_fleets_read()
        batch_environments = batch_read()
        emr_claims = emr_read()

    # What launches from a launch template keeps the image of the version it names.
    uses = [*groups.uses, *spot_fleets.uses, *ec2_fleets.uses, *batch_environments.uses]
    templates = read_missing_versions(ec2, templates, uses)
    use_claims, template_notes = template_claims(templates, uses)

    claims = [
        *instances.claims,
        *parameter_claims(parameter_values, pointers),
        *version_claims,
        *launch_configuration_claims(configurations),
        *groups.claims,
        *spot_fleets.claims,
        *ec2_fleets.claims,
        *batch_environments.claims,
        *emr_claims,
        *use_claims,
    ]
    resolved = resolve_aliases(ssm, named_aliases(claims), parameter_values)
    references, alias_notes = references_of(claims, resolved)
    return ReferenceSources(references, instances, parameter_values, [*template_notes, *alias_notes])


def _with_copy_sources(
    clients: "RegionClients", policy: Policy, inventory: RegionInventory
) -> RegionInventory:
    """The inventory's copies counted from their sources' creation (copy_sources)."""
    images, notes = read_copy_sources(inventory.images, inventory.region, policy, clients.ec2_in)
    if not notes and images is inventory.images:
        return inventory
    return inventory._replace(images=images, notes=tuple(dict.fromkeys([*inventory.notes, *notes])))


def _read_auto_scaling(clients: "RegionClients") -> tuple[dict[str, str], Claims]:
    """The launch configurations, then the groups (which launch from them)."""
    configurations = read_launch_configurations(clients.autoscaling)
    return configurations, read_auto_scaling_groups(clients.autoscaling, configurations)


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
    baking = any(family.bake is not None for family in policy.families)
    instances = read_instances(clients.ec2, policy) if baking else None
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
    unread = [i.image_id for i in inventory.images if i.image_id in wanted and i.launch_permissions is None]
    if not unread:
        return inventory
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
        i.image_id for i in described_inventory.images if i.image_id in wanted and i.state == "available"
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
