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


def with_named(autoscaling: AutoScalingClient, configurations: dict[str, str], name: str) -> str:
    """The image of launch configuration `name`: from the listing, else read by its name (made since the
    listing: CloudFormation makes a group right after its configuration). One no read finds is a
    malformed answer (a configuration in use cannot be deleted): the region is not decided on."""
    if name not in configurations:
        with source("autoscaling:DescribeLaunchConfigurations"):
            for raw in items(
                autoscaling,
                "describe_launch_configurations",
                "LaunchConfigurations",
                100,
                LaunchConfigurationNames=[name],
            ):
                configurations[str(raw["LaunchConfigurationName"])] = str(raw.get("ImageId") or "")
            if name not in configurations:
                raise ValueError(
                    f"an Auto Scaling group names launch configuration {name}, which is not found"
                )
    return configurations[name]


def launch_configuration_claims(configurations: Mapping[str, str]) -> list[Claim]:
    return [
        each
        for name, image_id in configurations.items()
        for each in claim(image_id, "launch-configuration", name, f"launch configuration {name}")
    ]
