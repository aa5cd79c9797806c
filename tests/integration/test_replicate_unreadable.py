"""`replicate` never says everything is in place when it could not read a region."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import boto3
from botocore.config import Config
from botocore.stub import Stubber

from ami_janitor import engine
from ami_janitor.aws.clients import RegionClients
from ami_janitor.cli import render
from builders import policy

IMAGES = {"Owners": ["self"], "IncludeDeprecated": True, "IncludeDisabled": True, "MaxResults": 1000}


def test_an_unreadable_region_is_reported_and_counts_as_failed(fake_aws_env: None) -> None:
    ec2 = boto3.client("ec2", region_name="us-east-1", config=Config(retries={"max_attempts": 1}))
    stub = Stubber(ec2)
    stub.add_client_error(
        "describe_images", "InternalError", "We encountered an internal error", 500, expected_params=IMAGES
    )
    stub.activate()
    clients = RegionClients("us-east-1", ec2=ec2)

    result = engine.replicate(
        policy(), ["us-east-1"], lambda _region: clients, datetime.now(UTC), apply=False
    )

    stub.assert_no_pending_responses()
    assert result.skipped == [
        "us-east-1: ec2:DescribeImages: InternalError: We encountered an internal error"
    ]
    assert result.failed == 1
    out = io.StringIO()
    render.print_replication(result, out, mode="dry-run", applied=False)
    assert "region us-east-1: ec2:DescribeImages: InternalError" in out.getvalue()
    assert "every copy and share is in place" not in out.getvalue()
