"""The IAM actions of each function's role and of the CLI: the union of the PERMISSIONS lists the modules
keep beside their calls. The stack, the CLI's documentation and the tests import this module; the
functions never do: gathering the lists imports every module, and a function imports at its cold start
only what its run needs (a region with no AMI never imports the reference sources, the slicer, the
copier or the baker)."""

from ami_janitor.aws import baker, copier, executor, kms, ledger, rotator, sharer, slicer, usage
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

# Every action the inventory's sources call (load_inventory, load_details): the union of their lists.
INVENTORY_CALLED: list[str] = sorted(
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
# What DescribeImageReferences needs beside its own action.
IMAGE_REFERENCES_DEPENDENCIES: list[str] = image_references.DEPENDENCIES
INVENTORY_PERMISSIONS: list[str] = sorted(set(INVENTORY_CALLED) | set(IMAGE_REFERENCES_DEPENDENCIES))

# What a run calls (engine.run, the CLI's plan and apply): the inventory, rotation, shares and the
# executor, and the aliases of replica keys resolved to plan its copies. Its copies go through the
# replication queue (sqs:SendMessage comes with the queue).
RUN_PERMISSIONS: list[str] = sorted(
    set(INVENTORY_PERMISSIONS)
    | set(executor.PERMISSIONS)
    | set(rotator.PERMISSIONS)
    | set(sharer.PERMISSIONS)
    | set(ledger.PERMISSIONS)
    | set(kms.PERMISSIONS)
    | set(slicer.QUEUE_PERMISSIONS)
    | set(usage.PUBLISH_PERMISSIONS)
    | set(usage.RECIPE_PERMISSIONS)
    | set(usage.READ_PERMISSIONS)
    | set(usage.ORGANIZATIONS_PERMISSIONS)
)
# The deployed scheduled run (handlers.scheduled): its work queue is always configured, so every due
# stage goes to the slice worker and it never disables or deregisters an AMI itself (it still
# deprecates again in a rescue that restores an owner's deprecation, and deletes the recorded snapshots
# of unfinished deregistrations).
SCHEDULED_PERMISSIONS: list[str] = sorted(set(RUN_PERMISSIONS) - {"ec2:DeregisterImage", "ec2:DisableImage"})
# The slice worker (handlers.slices): a slice's reads (consumers' usage reports included), the
# executor's stages, and the run's record.
SLICE_PERMISSIONS: list[str] = slicer.PERMISSIONS
# The event function (handlers.ami_event): rotation, and sharing a new AMI at once (its copies are
# queued, with the aliases of their keys resolved).
EVENT_PERMISSIONS: list[str] = sorted(
    set(rotator.PERMISSIONS)
    | set(sharer.PERMISSIONS)
    | set(ledger.PERMISSIONS)
    | set(kms.PERMISSIONS)
    | {"ec2:DescribeImages"}
)
# The replication worker (handlers.replicate): inventory.describe_image reads the source
# (ec2:DescribeImages, already in copier.PERMISSIONS), the ledger checks and item reads are the
# copier's too (dynamodb:DescribeTable, BatchGetItem); the KMS actions are what EC2 does with a
# target's key on this role's behalf, and DescribeKey resolves a target's alias again before the copy.
# The requests it has no time left for are sent again to its queue (sqs:SendMessage comes with the queue).
REPLICATE_PERMISSIONS: list[str] = sorted(
    set(copier.PERMISSIONS) | set(copier.KMS_PERMISSIONS) | set(kms.PERMISSIONS)
)
# The scheduled bake (handlers.bake): the bake itself, and the check that the region's ledger table is
# there (engine.require_ledgers).
BAKE_PERMISSIONS: list[str] = sorted({*baker.SCHEDULED_PERMISSIONS, *ledger.CHECK_PERMISSIONS})

# Each function's role, by its handler module (ami_janitor.handlers.<name>).
FUNCTIONS: dict[str, list[str]] = {
    "scheduled": SCHEDULED_PERMISSIONS,
    "slices": SLICE_PERMISSIONS,
    "ami_event": EVENT_PERMISSIONS,
    "replicate": REPLICATE_PERMISSIONS,
    "bake": BAKE_PERMISSIONS,
}

# What `ami-janitor` calls with the caller's credentials: a run's actions (plan, apply, rotate,
# rescue), the copies it starts itself (`replicate`; EC2 uses the KMS key of an encrypted copy on the
# caller's behalf), `bake` with its stop and start commands, and `ledger create`.
CLI_PERMISSIONS: list[str] = sorted(
    set(RUN_PERMISSIONS)
    | set(SLICE_PERMISSIONS)
    | set(copier.PERMISSIONS)
    | set(copier.KMS_PERMISSIONS)
    | set(baker.PERMISSIONS)
    | set(ledger.CHECK_PERMISSIONS)
    | set(ledger.CREATE_PERMISSIONS)
)
# The operator role a stack makes for the CLI: all of it but `ledger create`'s table administration
# (resource policy, backups, TTL, deletion protection). In a stack's region the stack owns the table;
# a role that could rewrite the table's resource policy could open its writes to anyone.
OPERATOR_PERMISSIONS: list[str] = sorted(set(CLI_PERMISSIONS) - set(ledger.CREATE_PERMISSIONS))
