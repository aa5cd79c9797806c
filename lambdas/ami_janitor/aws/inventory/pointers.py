"""The policy's Latest pointers: the SSM parameters whose value names a family's Latest AMI.

Their values go to the inventory's `parameters` and are never references: the planner decides Latest
from them after this run's rotation, not from the old value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from ami_janitor.aws.inventory.get_parameters import get_parameters
from ami_janitor.aws.inventory.reading import source
from ami_janitor.core.model import Image
from ami_janitor.core.policy import Policy

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

PERMISSIONS: list[str] = ["ssm:GetParameters"]


class Pointers(NamedTuple):
    """The pointer names in this region ({arch} filled in from the families' images), and the patterns
    that recognise any pointer of the policy."""

    names: frozenset[str]
    patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def of(cls, policy: Policy, images: Iterable[Image]) -> Pointers:
        names: set[str] = set()
        patterns: list[re.Pattern[str]] = []
        for family in policy.families:
            template = family.latest.ssm_parameter if family.latest else None
            if template is None:
                continue
            patterns.append(re.compile(re.escape(template).replace(re.escape("{arch}"), "[^/]+")))
            if "{arch}" not in template:
                names.add(template)
                continue
            names.update(
                template.replace("{arch}", image.architecture)
                for image in images
                if family.match.matches(image.name, image.tags)
            )
        return cls(frozenset(names), tuple(patterns))

    def owns(self, name: str) -> bool:
        return any(pattern.fullmatch(name) for pattern in self.patterns)


def read_pointer_values(ssm: SSMClient, pointers: Pointers, scanned: Mapping[str, str]) -> dict[str, str]:
    """Pointer name -> value, sorted: from the parameter scan where it saw them (`scanned`), else read
    (a SecureString pointer is left out)."""
    values = {name: scanned[name] for name in pointers.names if name in scanned}
    missing = sorted(pointers.names - values.keys())
    with source("ssm:GetParameters"):
        for name, parameter in get_parameters(ssm, missing).items():
            if parameter.get("Type") != "SecureString":
                values[name] = str(parameter.get("Value") or "")
    return dict(sorted(values.items()))
