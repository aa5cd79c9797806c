"""One region's inventory: the AMIs, what references them, and what the plan reports beside them.

Each source is a module that reads one thing, with its own PERMISSIONS beside its calls; `load_inventory`
composes them, each step's outputs feeding the next. When any reference source fails the whole
inventory becomes an error (the planner then skips the region): no decision is ever taken on a
partial inventory.
"""

from __future__ import annotations

from ami_janitor.aws.inventory import (
    aliases,
    auto_scaling_groups,
    batch,
    block_public_access,
    copy_sources,
    emr,
    fleets,
    get_parameters,
    image_references,
    images,
    instances,
    launch_configurations,
    launch_permissions,
    launch_templates,
    ledger_items,
    parameters,
    pointers,
    recycle_bin,
    snapshots,
    template_uses,
)
from ami_janitor.aws.inventory.images import describe_image, describe_own_image
from ami_janitor.aws.inventory.launch_permissions import load_launch_permissions, read_launch_permissions
from ami_janitor.aws.inventory.ledger_items import read_ledger_items
from ami_janitor.aws.inventory.load import load_details, load_images, load_inventory
from ami_janitor.aws.inventory.reading import count_calls

__all__ = [
    "CALLED",
    "IMAGE_PERMISSIONS",
    "IMAGE_REFERENCES_DEPENDENCIES",
    "PERMISSIONS",
    "count_calls",
    "describe_image",
    "describe_own_image",
    "load_details",
    "load_images",
    "load_inventory",
    "load_launch_permissions",
    "read_launch_permissions",
    "read_ledger_items",
]

# Every action the sources call: the union of their lists.
CALLED: list[str] = sorted(
    set().union(
        aliases.PERMISSIONS,
        auto_scaling_groups.PERMISSIONS,
        batch.PERMISSIONS,
        block_public_access.PERMISSIONS,
        copy_sources.PERMISSIONS,
        emr.PERMISSIONS,
        fleets.PERMISSIONS,
        get_parameters.PERMISSIONS,
        image_references.PERMISSIONS,
        images.PERMISSIONS,
        instances.PERMISSIONS,
        launch_configurations.PERMISSIONS,
        ledger_items.PERMISSIONS,
        launch_permissions.PERMISSIONS,
        launch_templates.PERMISSIONS,
        parameters.PERMISSIONS,
        pointers.PERMISSIONS,
        recycle_bin.PERMISSIONS,
        snapshots.PERMISSIONS,
        template_uses.PERMISSIONS,
    )
)
IMAGE_REFERENCES_DEPENDENCIES: list[str] = image_references.DEPENDENCIES
PERMISSIONS: list[str] = sorted(set(CALLED) | set(IMAGE_REFERENCES_DEPENDENCIES))
# What load_images and describe_image call (the event-driven rotation reads only these).
IMAGE_PERMISSIONS: list[str] = sorted(
    set(images.PERMISSIONS)
    | set(copy_sources.PERMISSIONS)
    | set(pointers.PERMISSIONS)
    | set(ledger_items.PERMISSIONS)
)
