"""Launch configurations (DescribeLaunchConfigurations): any of them keeps its AMI, used or not."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ami_janitor.aws.inventory.claims import Claim, claim
from ami_janitor.aws.inventory.reading import items, source

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient

PERMISSIONS: list[str] = ["autoscaling:DescribeLaunchConfigurations"]


def read_launch_configurations(autoscaling: AutoScalingClient) -> dict[str, str]:
    """Launch configuration name -> its ImageId ("" when it names none)."""
    with source("autoscaling:DescribeLaunchConfigurations"):
        return {
            str(raw["LaunchConfigurationName"]): str(raw.get("ImageId") or "")
            for raw in items(autoscaling, "describe_launch_configurations", "LaunchConfigurations", 100)
        }


def launch_configuration_claims(configurations: Mapping[str, str]) -> list[Claim]:
    return [
        each
        for name, image_id in configurations.items()
        for each in claim(image_id, "launch-configuration", name, f"launch configuration {name}")
    ]
