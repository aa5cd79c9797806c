"""`resolve:ssm:` aliases: a launch template may name its AMI as an SSM parameter, resolved at launch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ami_janitor.aws.inventory.claims import ALIAS_PREFIX
from ami_janitor.aws.inventory.get_parameters import get_parameters
from ami_janitor.aws.inventory.reading import source

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

PERMISSIONS: list[str] = ["ssm:GetParameters"]


def resolve_aliases(ssm: SSMClient, aliases: Iterable[str], scanned: Mapping[str, str]) -> dict[str, str]:
    """Alias -> its parameter's value: from the parameter scan (`scanned`) where it saw the parameter,
    else read by name (a version or label selector, say); an alias to no readable parameter is left out."""
    resolved: dict[str, str] = {}
    to_read: list[str] = []
    for alias in sorted(aliases):
        name = alias.removeprefix(ALIAS_PREFIX)
        if name in scanned:
            resolved[alias] = scanned[name]
        else:
            to_read.append(name)
    with source("ssm:GetParameters"):
        for name, parameter in get_parameters(ssm, to_read).items():
            resolved[ALIAS_PREFIX + name] = str(parameter.get("Value") or "")
    return resolved
