"""What a bake makes: the image's name, tags and the exact CreateImage request."""

from __future__ import annotations

import fnmatch
from datetime import UTC, datetime
from typing import Any

from ami_janitor.core.policy import JANITOR_TAG_PREFIX, Family

BAKED_FROM_TAG = f"{JANITOR_TAG_PREFIX}baked-from"

VERSION_TAG = "Version"


NO_REBOOT_WARNING = (
    "the file system may be inconsistent without a reboot; "
    "use --stop-command/--start-command to quiesce the application"
)


class BakeError(RuntimeError):
    """A bake that failed; the message says what and where. `image_id` is set once an image exists."""

    def __init__(self, message: str, *, image_id: str | None = None) -> None:
        super().__init__(message)
        self.image_id = image_id


class BakeUsageError(BakeError):
    """Bad input (options or policy) found before anything ran."""


def version(now: datetime) -> str:
    """The UTC timestamp that versions a bake (a naive time is taken as UTC)."""
    aware = now if now.tzinfo else now.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def image_name(family: Family, now: datetime) -> str:
    """`<family>-<UTC timestamp>`; refused where the family's own name glob would not select it."""
    name = f"{family.name}-{version(now)}"
    glob = family.match.name
    if glob is not None and not fnmatch.fnmatchcase(name, glob):
        raise BakeUsageError(
            f"family {family.name}: match.name {glob!r} does not match the bake name {name!r}, so the "
            f"baked image would never be managed; use a glob such as '{family.name}-*'"
        )
    return name


def image_tags(family: Family, instance_id: str, now: datetime) -> dict[str, str]:
    """The family's match tags, the version and the build instance."""
    tags = {**family.match.tags, VERSION_TAG: version(now), BAKED_FROM_TAG: instance_id}
    if not family.match.matches(image_name(family, now), tags):
        clash = sorted(key for key in (VERSION_TAG, BAKED_FROM_TAG) if key in family.match.tags)
        raise BakeUsageError(
            f"family {family.name}: match.tags select on {', '.join(clash)}, which every bake sets to "
            "its own value, so the baked image would never be managed"
        )
    return tags


def bake_request(family: Family, instance_id: str, now: datetime, no_reboot: bool) -> dict[str, Any]:
    """The exact CreateImage arguments: image and snapshots tagged at creation."""
    name = image_name(family, now)
    tags = [
        {"Key": key, "Value": value} for key, value in sorted(image_tags(family, instance_id, now).items())
    ]
    return {
        "InstanceId": instance_id,
        "Name": name,
        "Description": f"{family.name} {version(now)} baked by ami-janitor from {instance_id}",
        "NoReboot": no_reboot,
        "TagSpecifications": [
            {"ResourceType": "image", "Tags": tags},
            {"ResourceType": "snapshot", "Tags": [dict(tag) for tag in tags]},
        ],
    }


def check_options(no_reboot: bool, stop_command: str | None, start_command: str | None) -> list[str]:
    """The warnings of a valid combination; BakeUsageError for an invalid one."""
    if (stop_command is not None or start_command is not None) and not no_reboot:
        raise BakeUsageError(
            "--stop-command/--start-command quiesce the application for --no-reboot; "
            "without it EC2 reboots the instance, which needs neither"
        )
    if start_command is not None and stop_command is None:
        raise BakeUsageError("--start-command needs --stop-command (it restarts what that stopped)")
    for option, command in (("--stop-command", stop_command), ("--start-command", start_command)):
        if command is not None and not command.strip():
            raise BakeUsageError(f"{option}: the command is empty")
    if no_reboot and stop_command is None:
        return [NO_REBOOT_WARNING]
    return []
