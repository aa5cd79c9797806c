"""The reference sources of a region, every one but DescribeImageReferences, read side by side: what
launches from an AMI or names it (instances, parameters, launch templates and configurations, Auto
Scaling groups, fleets, Batch, EMR). Read where a region has AMIs in a family, and by a slice: a region
with none never imports them."""

from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

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
from ami_janitor.aws.inventory.claims import Claims, named_aliases, references_of
from ami_janitor.aws.inventory.emr import read_emr_clusters
from ami_janitor.aws.inventory.fleets import read_ec2_fleets, read_spot_fleets, read_spot_instance_requests
from ami_janitor.aws.inventory.instances import Instances, read_instances
from ami_janitor.aws.inventory.launch_configurations import (
    launch_configuration_claims,
    read_launch_configurations,
    with_named,
)
from ami_janitor.aws.inventory.launch_templates import read_launch_templates
from ami_janitor.aws.inventory.parameters import parameter_claims, read_parameters
from ami_janitor.aws.inventory.pointers import Pointers
from ami_janitor.aws.inventory.reading import ahead, clients_first
from ami_janitor.aws.inventory.template_uses import (
    batch_version_claims,
    read_missing_versions,
    template_claims,
)
from ami_janitor.core.model import Reference
from ami_janitor.core.policy import Policy

if TYPE_CHECKING:
    from ami_janitor.aws.clients import RegionClients

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
    the other sources in full (it looks at no launch configuration, Auto Scaling group, fleet, Spot request, Batch
    or EMR; launch templates are read too, as the policy counts their versions and as those name them)."""
    clients_first(clients, "ec2", "ssm", "autoscaling", "batch", "emr")
    ec2, ssm = clients.ec2, clients.ssm
    versions = policy.references.launch_template_versions
    since = beside_image_references

    def instance_source() -> Instances:
        return _NO_INSTANCES if since is not None else read_instances(ec2, policy)

    def parameter_source() -> dict[str, str]:
        return read_parameters(ssm, changed_since=since)

    # The reference sources depend on no other: all read side by side, their answers taken in order.
    with (
        ahead(clients, instance_source) as instances_read,
        ahead(clients, parameter_source) as parameters_read,
        ahead(clients, lambda: read_launch_templates(ec2, versions)) as templates_read,
        ahead(clients, lambda: _read_auto_scaling(clients)) as auto_scaling_read,
        ahead(clients, lambda: read_spot_fleets(ec2)) as spot_fleets_read,
        ahead(clients, lambda: read_spot_instance_requests(ec2)) as spot_requests_read,
        ahead(clients, lambda: read_ec2_fleets(ec2)) as ec2_fleets_read,
        ahead(clients, lambda: read_batch_compute_environments(clients.batch)) as batch_read,
        ahead(clients, lambda: read_emr_clusters(clients.emr)) as emr_read,
    ):
        instances = instances_read()
        parameter_values = parameters_read()
        templates, version_claims = templates_read()
        configurations, groups = auto_scaling_read()
        spot_fleets = spot_fleets_read()
        spot_requests = spot_requests_read()
        ec2_fleets = ec2_fleets_read()
        batch_environments = batch_read()
        emr_claims = emr_read()

    # What launches from a launch template keeps the image of the version it names.
    uses = [*groups.uses, *spot_fleets.uses, *ec2_fleets.uses, *batch_environments.uses]
    templates = read_missing_versions(ec2, templates, uses)
    use_claims, template_notes = template_claims(templates, uses)
    use_claims += batch_version_claims(ec2, versions, batch_environments.uses)

    claims = [
        *instances.claims,
        *parameter_claims(parameter_values, pointers),
        *version_claims,
        *launch_configuration_claims(configurations),
        *groups.claims,
        *spot_fleets.claims,
        *spot_requests.claims,
        *ec2_fleets.claims,
        *batch_environments.claims,
        *emr_claims,
        *use_claims,
    ]
    resolved = resolve_aliases(ssm, named_aliases(claims), parameter_values)
    references, alias_notes = references_of(claims, resolved)
    return ReferenceSources(references, instances, parameter_values, [*template_notes, *alias_notes])


def _read_auto_scaling(clients: "RegionClients") -> tuple[dict[str, str], Claims]:
    """The launch configurations, then the groups (which launch from them)."""
    configurations = read_launch_configurations(clients.autoscaling)
    groups = read_auto_scaling_groups(
        clients.autoscaling, lambda name: with_named(clients.autoscaling, configurations, name)
    )
    return configurations, groups
