"""Deploy one region's synthesized template on the in-process emulator, and import its handlers.

The emulator's CloudFormation creates the functions, rules, queues, buckets, topic and key; it skips
alarms, queue/topic/bucket policies, subscriptions and event invoke configs (asserted in
test_infra_template.py). Lambda invoke needs Docker, so handlers are called directly: `asset_package`
imports the ami_janitor package from the staged asset (third-party packages come from the test
environment, since the bundled ones are built for arm64).
"""

from __future__ import annotations

import importlib
import io
import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from synth_support import Synth, functions_by_handler

STACK = "AmiJanitor-us-east-1"
REGION = "us-east-1"
ACCOUNT = "123456789012"  # the emulator's default account
BOOTSTRAP_VERSION_PARAMETER = "/cdk-bootstrap/hnb659fds/version"


pytestmark = pytest.mark.slow  # synthesizes the stacks (or reads their synthesized templates)


@dataclass
class Deployment:
    """What the emulator created for the stack, by the template's names."""

    stack_name: str
    region: str
    resources: dict[str, str]  # logical id -> physical id
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)  # handler module -> configuration


def _zip(directory: Path) -> bytes:
    buffer = io.BytesIO()
    # Stored, not deflated: the emulator only keeps the archive, and 40 MB compress slowly.
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(directory).as_posix())
    return buffer.getvalue()


def _publish_assets(synth: Synth, stack: str) -> None:
    """What `cdk deploy` does before CreateStack: upload each file asset to the staging bucket."""
    s3 = boto3.client("s3", region_name=REGION)
    for entry in synth.assets(stack)["files"].values():
        source = synth.outdir / entry["source"]["path"]
        body = _zip(source) if entry["source"].get("packaging") == "zip" else source.read_bytes()
        for destination in entry["destinations"].values():
            bucket = (
                destination["bucketName"]
                .replace("${AWS::AccountId}", ACCOUNT)
                .replace("${AWS::Region}", REGION)
            )
            if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
                s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key=destination["objectKey"], Body=body)


@pytest.fixture(scope="module")
def deployment(synth: Synth) -> Iterator[Deployment]:
    """The stack created in the emulator; the mock stays active for the tests of this module."""
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=REGION)
    try:
        with mock_aws(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Tried to parse .* not supported by moto")
            boto3.client("ssm", region_name=REGION).put_parameter(
                Name=BOOTSTRAP_VERSION_PARAMETER, Value="30", Type="String"
            )
            _publish_assets(synth, STACK)
            cloudformation = boto3.client("cloudformation", region_name=REGION)
            cloudformation.create_stack(
                StackName=STACK,
                TemplateBody=(synth.outdir / f"{STACK}.template.json").read_text(),
                Capabilities=["CAPABILITY_IAM"],
            )
            status = cloudformation.describe_stacks(StackName=STACK)["Stacks"][0]
            assert status["StackStatus"] == "CREATE_COMPLETE", status.get("StackStatusReason")
            summaries = cloudformation.list_stack_resources(StackName=STACK)["StackResourceSummaries"]
            deployment = Deployment(
                stack_name=STACK,
                region=REGION,
                resources={s["LogicalResourceId"]: s["PhysicalResourceId"] for s in summaries},
            )
            lambda_ = boto3.client("lambda", region_name=REGION)
            for module, (logical_id, _) in functions_by_handler(synth.template(STACK)).items():
                name = deployment.resources[logical_id]
                deployment.functions[module] = lambda_.get_function(FunctionName=name)["Configuration"]
            yield deployment
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def asset_package(asset_dir: Path) -> Iterator[None]:
    """Import `ami_janitor` from the asset directory; everything else from the test environment."""
    own = [k for k in sys.modules if k == "ami_janitor" or k.startswith("ami_janitor.")]
    saved = {k: sys.modules.pop(k) for k in own}
    with tempfile.TemporaryDirectory() as shim:
        (Path(shim) / "ami_janitor").symlink_to(asset_dir / "ami_janitor", target_is_directory=True)
        sys.path.insert(0, shim)
        try:
            yield
        finally:
            sys.path.remove(shim)
            for k in [k for k in sys.modules if k == "ami_janitor" or k.startswith("ami_janitor.")]:
                del sys.modules[k]
            sys.modules.update(saved)


def test_stack_created_with_functions_rules_and_queues(deployment: Deployment, synth: Synth) -> None:
    template = synth.template(STACK)
    resources = deployment.resources
    handlers = {module: config["Handler"] for module, config in deployment.functions.items()}
    assert handlers == {
        "scheduled": "ami_janitor.handlers.scheduled.handler",
        "ami_event": "ami_janitor.handlers.ami_event.handler",
        "replicate": "ami_janitor.handlers.replicate.handler",
        "bake": "ami_janitor.handlers.bake.handler",
    }
    for config in deployment.functions.values():
        assert config["Runtime"] == "python3.13"
        assert config["Environment"]["Variables"]["AMI_JANITOR_CONFIG"] == "/var/task/policy.json"

    sqs = boto3.client("sqs", region_name=REGION)
    queue_urls = set(sqs.list_queues()["QueueUrls"])
    assert len(queue_urls) == 4
    replication_id = next(k for k in resources if k.startswith("ReplicationQueue") and "Policy" not in k)
    replication_url = resources[replication_id]
    assert replication_url in queue_urls

    scheduled_env = deployment.functions["scheduled"]["Environment"]["Variables"]
    assert scheduled_env["REPLICATION_QUEUE_URL"] == replication_url
    assert (
        deployment.functions["ami_event"]["Environment"]["Variables"]["REPLICATION_QUEUE_URL"]
        == replication_url
    )
    buckets = {b["Name"] for b in boto3.client("s3", region_name=REGION).list_buckets()["Buckets"]}
    assert scheduled_env["REPORT_BUCKET"] in buckets
    topics = {t["TopicArn"] for t in boto3.client("sns", region_name=REGION).list_topics()["Topics"]}
    assert scheduled_env["TOPIC_ARN"] in topics

    events = boto3.client("events", region_name=REGION)
    rules = {r["Name"]: r for r in events.list_rules()["Rules"]}
    assert len(rules) == 3
    targets = {t["Arn"] for name in rules for t in events.list_targets_by_rule(Rule=name)["Targets"]}
    arns = {module: config["FunctionArn"] for module, config in deployment.functions.items()}
    assert targets == {arns["scheduled"], arns["ami_event"], arns["bake"]}

    mappings = boto3.client("lambda", region_name=REGION).list_event_source_mappings()["EventSourceMappings"]
    assert [m["FunctionArn"] for m in mappings] == [arns["replicate"]]
    assert len(template["Resources"]) > len(resources)  # alarms, policies, ... skipped by the emulator


def test_handlers_import_from_the_asset(synth: Synth) -> None:
    asset_dir = synth.code_asset_dir(STACK)
    handlers = [props["Handler"] for _, props in functions_by_handler(synth.template(STACK)).values()]
    assert len(handlers) == 4
    with asset_package(asset_dir):
        for handler in handlers:
            module_name, function_name = handler.rsplit(".", 1)
            module = importlib.import_module(module_name)
            assert Path(module.__file__ or "").resolve().is_relative_to(asset_dir.resolve())
            assert callable(getattr(module, function_name))
    # The test environment's own package is back in place.
    import ami_janitor

    assert not Path(ami_janitor.__file__ or "").resolve().is_relative_to(asset_dir.resolve())
