"""Batch compute environments: the images their compute resources, EC2 configurations and launch
templates name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ami_janitor.aws.inventory.claims import Claims
from ami_janitor.aws.inventory.reading import Raw, items, source

if TYPE_CHECKING:
    from mypy_boto3_batch import BatchClient

PERMISSIONS: list[str] = ["batch:DescribeComputeEnvironments"]

KIND = "batch-compute-environment"


def read_batch_compute_environments(batch: BatchClient) -> Claims:
    found = Claims()
    with source("batch:DescribeComputeEnvironments"):
        for environment in items(batch, "describe_compute_environments", "computeEnvironments", 100):
            _environment(found, environment)
    return found


def _environment(found: Claims, environment: Raw) -> None:
    name = str(environment["computeEnvironmentName"])
    kind, subject = KIND, f"Batch compute environment {name}"
    resources = environment.get("computeResources") or {}
    found.claim(resources.get("imageId"), kind, name, f"{subject} (imageId)")
    for configuration in resources.get("ec2Configuration") or []:
        image_type = configuration.get("imageType") or "ec2Configuration"
        found.claim(
            configuration.get("imageIdOverride"), kind, name, f"{subject} ({image_type} imageIdOverride)"
        )
    template = resources.get("launchTemplate") or {}
    found.use_template(kind, name, subject, template)
    for override in template.get("overrides") or []:
        found.use_template(kind, name, subject, override)
