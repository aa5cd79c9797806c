"""A Latest pointer's value is read without the whitespace around it (`aws ssm put-parameter --value
file://ami.txt` writes a trailing newline): the claims leave a pointer naming one of the region's own
AMIs to the planner as Latest, so the planner keeps that AMI as the pointer's (design.md, what keeps an
AMI, rule 2), here where the run does not rotate the pointer (a policy error leaves it as it is)."""

from datetime import UTC, datetime

import boto3
import pytest

from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.inventory import load_inventory
from ami_janitor.core.planner import plan
from ami_janitor.demo import emulator
from builders import policy
from sessions import botocore_session

REGION = "us-east-1"
NOW = datetime(2026, 6, 1, tzinfo=UTC)
OLD = datetime(2025, 1, 1, tzinfo=UTC)


def make_ami(name: str, created: datetime, arch: str = "x86_64") -> str:
    ec2 = boto3.client("ec2", region_name=REGION)
    image_id = str(ec2.register_image(Name=name)["ImageId"])
    ec2.create_tags(Resources=[image_id], Tags=[{"Key": "Project", "Value": "App"}])
    emulator.set_image_fields(REGION, image_id, creation_date=created, architecture=arch)
    return image_id


@pytest.mark.parametrize("around", ["", "\n", " \n"], ids=["plain", "newline", "space-and-newline"])
def test_a_pointer_the_run_does_not_rotate_keeps_the_ami_it_names(moto_aws: None, around: str) -> None:
    # One pointer without {arch} for members of two architectures: a policy error, not rotated.
    pinned = make_ami("app-1", OLD)
    make_ami("app-2", OLD.replace(month=3))
    make_ami("app-3", OLD.replace(month=3))
    make_ami("app-arm-1", OLD, arch="arm64")
    boto3.client("ssm", region_name=REGION).put_parameter(
        Name="/ami/app/latest", Value=pinned + around, Type="String"
    )
    rules = policy({"latest": {"ssm_parameter": "/ami/app/latest"}})

    inventory = load_inventory(RegionClients(REGION, botocore_session(REGION, "testing", "testing")), rules)
    assert inventory.error is None and inventory.parameters == {"/ami/app/latest": pinned}
    result = plan([inventory], rules, NOW)

    assert any("must contain {arch}" in error for error in result.policy_errors), result.policy_errors
    decision = next(d for d in result.decisions if d.image_id == pinned)
    assert decision.action == "keep", decision.reasons
    assert "value of SSM parameter /ami/app/latest" in decision.reasons
