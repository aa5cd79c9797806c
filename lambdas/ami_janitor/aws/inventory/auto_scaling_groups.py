"""Auto Scaling groups (DescribeAutoScalingGroups): the images their launch template, mixed-instances
overrides or launch configuration name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ami_janitor.aws.inventory.claims import Claims
from ami_janitor.aws.inventory.reading import Raw, items, source

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient

PERMISSIONS: list[str] = ["autoscaling:DescribeAutoScalingGroups"]


def read_auto_scaling_groups(autoscaling: AutoScalingClient, image_of: Callable[[str], str]) -> Claims:
    """What every group names; `image_of` (a launch configuration's name -> its ImageId) gives a launch
    configuration's image."""
    found = Claims()
    with source("autoscaling:DescribeAutoScalingGroups"):
        groups = list(items(autoscaling, "describe_auto_scaling_groups", "AutoScalingGroups", 100))
    for group in groups:
        _group(found, group, image_of)
    return found


def _group(found: Claims, group: Raw, image_of: Callable[[str], str]) -> None:
    name = str(group["AutoScalingGroupName"])
    kind, subject = "auto-scaling-group", f"Auto Scaling group {name}"
    found.use_template(kind, name, subject, group.get("LaunchTemplate"))
    mixed = (group.get("MixedInstancesPolicy") or {}).get("LaunchTemplate") or {}
    found.use_template(kind, name, subject, mixed.get("LaunchTemplateSpecification"))
    for override in mixed.get("Overrides") or []:
        found.use_template(kind, name, subject, override.get("LaunchTemplateSpecification"))
        found.claim(override.get("ImageId"), kind, name, f"{subject} (mixed instances override)")
    configuration = group.get("LaunchConfigurationName")
    if configuration:
        image = image_of(str(configuration))
        found.claim(image, kind, name, f"{subject} (launch configuration {configuration})")
