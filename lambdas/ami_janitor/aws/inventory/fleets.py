"""Spot Fleet requests and EC2 Fleets that still hold capacity, and Spot Instance requests that may still
launch: the images their launch specifications, launch templates and overrides name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ami_janitor.aws.inventory.claims import Claims
from ami_janitor.aws.inventory.reading import Raw, items, source

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

PERMISSIONS: list[str] = [
    "ec2:DescribeFleets",
    "ec2:DescribeSpotFleetRequests",
    "ec2:DescribeSpotInstanceRequests",
]

# Fleet states that still hold capacity (cancelled_running and deleted_running keep their instances).
_SPOT_FLEET_STATES = frozenset({"submitted", "active", "modifying", "cancelled_running"})
_EC2_FLEET_STATES = frozenset({"submitted", "active", "modifying", "deleted_running"})
# Spot Instance request states that may still launch from the request's image: open (not fulfilled yet,
# or a persistent request reopened after its instance was interrupted: nothing else names the image
# then, no instance and no template), active (a persistent one launches again after an interruption)
# and disabled (a persistent one whose instance was stopped).
_SPOT_REQUEST_STATES = frozenset({"open", "active", "disabled"})


def read_spot_fleets(ec2: EC2Client) -> Claims:
    found = Claims()
    with source("ec2:DescribeSpotFleetRequests"):
        requests = items(ec2, "describe_spot_fleet_requests", "SpotFleetRequestConfigs", 1000)
        for request in _holding_capacity(requests, "SpotFleetRequestState", _SPOT_FLEET_STATES):
            request_id = str(request["SpotFleetRequestId"])
            config = request.get("SpotFleetRequestConfig") or {}
            subject = f"Spot Fleet request {request_id}"
            for spec in config.get("LaunchSpecifications") or []:
                found.claim(spec.get("ImageId"), "spot-fleet", request_id, subject)
            _launch_template_configs(found, "spot-fleet", request_id, subject, config)
    return found


def read_spot_instance_requests(ec2: EC2Client) -> Claims:
    found = Claims()
    with source("ec2:DescribeSpotInstanceRequests"):
        requests = items(ec2, "describe_spot_instance_requests", "SpotInstanceRequests", 1000)
        for request in _holding_capacity(requests, "State", _SPOT_REQUEST_STATES):
            request_id = str(request["SpotInstanceRequestId"])
            spec = request.get("LaunchSpecification") or {}
            found.claim(
                spec.get("ImageId"), "spot-request", request_id, f"Spot Instance request {request_id}"
            )
    return found


def read_ec2_fleets(ec2: EC2Client) -> Claims:
    found = Claims()
    with source("ec2:DescribeFleets"):
        for fleet in _holding_capacity(
            items(ec2, "describe_fleets", "Fleets", 1000), "FleetState", _EC2_FLEET_STATES
        ):
            fleet_id = str(fleet["FleetId"])
            _launch_template_configs(found, "ec2-fleet", fleet_id, f"EC2 Fleet {fleet_id}", fleet)
    return found


def _holding_capacity(fleets: Iterator[Raw], state_key: str, states: frozenset[str]) -> Iterator[Raw]:
    return (fleet for fleet in fleets if fleet.get(state_key) in states)


def _launch_template_configs(found: Claims, kind: str, resource_id: str, subject: str, config: Raw) -> None:
    for template_config in config.get("LaunchTemplateConfigs") or []:
        found.use_template(kind, resource_id, subject, template_config.get("LaunchTemplateSpecification"))
        for override in template_config.get("Overrides") or []:
            found.claim(override.get("ImageId"), kind, resource_id, f"{subject} (override)")
