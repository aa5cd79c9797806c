"""Instances in any state but terminated (DescribeInstances): each uses its AMI, and a bake may image one."""

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from ami_janitor.aws.inventory.claims import Claim, claim
from ami_janitor.aws.inventory.reading import Raw, items, source, tag
from ami_janitor.core import build_instance
from ami_janitor.core.model import BuildInstance
from ami_janitor.core.policy import Family, Policy

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

PERMISSIONS: list[str] = ["ec2:DescribeInstances"]

_LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]


class Instances(NamedTuple):
    """The live instances: their ids, the AMIs they use, and those some family's bake names."""

    ids: frozenset[str]
    claims: list[Claim]
    builds: tuple[BuildInstance, ...]


def read_instances(ec2: "EC2Client", policy: Policy) -> Instances:
    """Every instance not terminated; the policy says which of them its bakes name."""
    baked = [family for family in policy.families if family.bake is not None]
    state_filter = [{"Name": "instance-state-name", "Values": _LIVE_STATES}]
    ids: set[str] = set()
    claims: list[Claim] = []
    builds: list[BuildInstance] = []
    with source("ec2:DescribeInstances"):
        for reservation in items(ec2, "describe_instances", "Reservations", 1000, Filters=state_filter):
            for instance in reservation.get("Instances") or []:
                instance_id = str(instance["InstanceId"])
                state = str((instance.get("State") or {}).get("Name") or "unknown")
                if state == "terminated":
                    continue
                ids.add(instance_id)
                builds += _build_instance(instance_id, instance, baked)
                name = tag(instance, "Name")
                subject = f"instance {instance_id} ({f'{name}, {state}' if name else state})"
                claims += claim(instance.get("ImageId"), "instance", instance_id, subject, "used by")
    return Instances(frozenset(ids), claims, tuple(sorted(builds, key=lambda i: i.instance_id)))


def _build_instance(instance_id: str, instance: Raw, baked: Sequence[Family]) -> list[BuildInstance]:
    """The instance if some family's bake names it, so the plan can say what a bake would image."""
    tags = {str(t.get("Key")): str(t.get("Value") or "") for t in instance.get("Tags") or []}
    if any(build_instance.is_named_by(family, instance_id, tags) for family in baked):
        return [BuildInstance.from_api(dict(instance))]
    return []
