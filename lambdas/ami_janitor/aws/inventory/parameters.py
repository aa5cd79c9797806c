"""The String and StringList SSM parameters of the region (DescribeParameters, then GetParameters):
a parameter whose value holds an AMI id keeps that AMI."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ami_janitor.aws.inventory.claims import Claim, claim
from ami_janitor.aws.inventory.get_parameters import get_parameters
from ami_janitor.aws.inventory.pointers import Pointers
from ami_janitor.aws.inventory.reading import items, source

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

PERMISSIONS: list[str] = ["ssm:DescribeParameters", "ssm:GetParameters"]

_PLAIN_TYPES = ("String", "StringList")
# SSM's clock and the janitor's may disagree a little: a parameter changed this long before counts too.
_CLOCK_MARGIN = timedelta(minutes=15)


def _changed(raw: Mapping[str, Any], since: datetime | None) -> bool:
    """Changed since `since` (None: any parameter); one whose date is missing or unreadable counts."""
    modified = raw.get("LastModifiedDate")
    if since is None or not isinstance(modified, datetime) or modified.tzinfo is None:
        return True
    return modified >= since - _CLOCK_MARGIN


def read_parameters(ssm: SSMClient, *, changed_since: datetime | None = None) -> dict[str, str]:
    """Name -> value of every plain-text parameter, by name (SecureStrings are never listed); with
    `changed_since`, of those changed since then only (the listing says when each last changed)."""
    type_filter = [{"Key": "Type", "Option": "Equals", "Values": list(_PLAIN_TYPES)}]
    with source("ssm:DescribeParameters"):
        names = [
            str(raw["Name"])
            for raw in items(ssm, "describe_parameters", "Parameters", 50, ParameterFilters=type_filter)
            if raw.get("Type") in _PLAIN_TYPES and _changed(raw, changed_since)
        ]
    with source("ssm:GetParameters"):
        found = get_parameters(ssm, names)
        return {name: str(parameter.get("Value") or "") for name, parameter in sorted(found.items())}


def parameter_claims(values: Mapping[str, str], pointers: Pointers) -> list[Claim]:
    """Any AMI id in a value counts (a StringList element, or an id inside a config blob); a Latest
    pointer naming one of the region's own AMIs is not a reference. One naming another account's AMI
    is: the policy is every account's (a StackSet deploys it), and a consumer's parameter of a pointer's
    name that names the owner's shared AMI is a use its usage report must carry."""
    return [
        each
        for name, value in values.items()
        if not (pointers.owns(name) and value.strip() in pointers.own_images)
        for each in claim(value, "ssm-parameter", name, f"SSM parameter {name}", "value of")
    ]
