"""One region's inventory: the AMIs, what references them, and what the plan reports beside them.

Each source is a module that reads one thing, with its own PERMISSIONS beside its calls; `load_inventory`
composes them, each step's outputs feeding the next. When any reference source fails the whole
inventory becomes an error (the planner then skips the region): no decision is ever taken on a
partial inventory. The sources a region with no AMI does not read are imported where they are read
(load.py); `ami_janitor.roles` gathers every source's PERMISSIONS for the roles.
"""

from __future__ import annotations

from ami_janitor.aws.inventory import copy_sources, images, ledger_items, pointers
from ami_janitor.aws.inventory.images import describe_image, describe_own_image
from ami_janitor.aws.inventory.launch_permissions import load_launch_permissions, read_launch_permissions
from ami_janitor.aws.inventory.ledger_items import read_ledger_items
from ami_janitor.aws.inventory.load import load_details, load_images, load_inventory
from ami_janitor.aws.inventory.reading import count_calls

__all__ = [
    "IMAGE_PERMISSIONS",
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

# What load_images and describe_image call (the event-driven rotation reads only these).
IMAGE_PERMISSIONS: list[str] = sorted(
    set(images.PERMISSIONS)
    | set(copy_sources.PERMISSIONS)
    | set(pointers.PERMISSIONS)
    | set(ledger_items.PERMISSIONS)
)
