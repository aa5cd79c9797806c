"""Deploy one region's synthesized template on the in-process emulator, then run its handlers on it.

The emulator's CloudFormation creates the functions, rules, queues, buckets, topic and key; it skips
alarms, queue/topic/bucket policies, subscriptions and event invoke configs (asserted in
test_infra_template.py). Lambda invoke needs Docker, so handlers are called directly: `asset_package`
imports the ami_janitor package from the staged asset (third-party packages come from the test
environment, since the bundled ones are built for arm64), by the Handler names of the template, with
the deployed functions' environment. They run a scheduled cleanup, a bake, an AMI state change and the
replication worker against the stack's own bucket and queue and a small fleet seeded in the emulator.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from synth_support import Synth, functions_by_handler

from ami_janitor.demo import emulator

STACK = "AmiJanitor-us-east-1"
REGION = "us-east-1"
ACCOUNT = "123456789012"  # the emulator's default account
BOOTSTRAP_VERSION_PARAMETER = "/cdk-bootstrap/hnb659fds/version"
EVENTS = Path(__file__).resolve().parents[1] / "events"

# The test policy's pettracker-ml family (tests/infra/policy.yaml); its rules are the defaults:
# keep_latest 3, min_age_days 30, lifecycle 0/7/14 days, at most half of a group per run.
FAMILY_TAGS = {"Project": "PetTracker"}
BAKE_TAGS = {"Role": "pettracker-ml"}
LATEST_TAG = "Latest"
LATEST_PARAMETER = "/ami/pettracker-ml/x86_64/latest"
REPLICA_REGION = "eu-west-1"
REPLICA_KEY = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
CANDIDATE_TAG = "ami-janitor:candidate-since"
SOURCE_IMAGE_TAG = "ami-janitor:source-image"
SOURCE_REGION_TAG = "ami-janitor:source-region"
LEDGER_TABLE = "ami-janitor-ledger"


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
    variables = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        # Read when the emulator first builds a region's EC2 backend (lazily, at its first EC2 call):
        # set before the mock starts, no region of this module gets the public images, so
        # DescribeImages sees the seeded fleet only.
        "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
    }
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
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
        "slices": "ami_janitor.handlers.slices.handler",
    }
    for config in deployment.functions.values():
        assert config["Runtime"] == "python3.13"
        assert config["Environment"]["Variables"]["AMI_JANITOR_CONFIG"] == "/var/task/policy.json"

    sqs = boto3.client("sqs", region_name=REGION)
    queue_urls = set(sqs.list_queues()["QueueUrls"])
    assert len(queue_urls) == 8
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
    # The AMI state changes go to the region's FIFO queue, which the event function consumes.
    events_url = next(u for u in queue_urls if u.endswith("-ami-events.fifo"))
    events_arn = sqs.get_queue_attributes(QueueUrl=events_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    assert targets == {arns["scheduled"], events_arn, arns["bake"]}

    mappings = boto3.client("lambda", region_name=REGION).list_event_source_mappings()["EventSourceMappings"]
    assert sorted(m["FunctionArn"] for m in mappings) == sorted(
        [arns["replicate"], arns["slices"], arns["ami_event"]]
    )
    [events_mapping] = [m for m in mappings if m["FunctionArn"] == arns["ami_event"]]
    assert events_mapping["EventSourceArn"] == events_arn

    # The ledger table (its resource policy, PITR and TTL are skipped here: test_infra_ledger checks them).
    table = boto3.client("dynamodb", region_name=REGION).describe_table(TableName="ami-janitor-ledger")[
        "Table"
    ]
    assert table["DeletionProtectionEnabled"] is True
    assert [k["AttributeName"] for k in table["KeySchema"]] == ["pk", "sk"]
    assert len(template["Resources"]) > len(resources)  # alarms, policies, ... skipped by the emulator


def test_handlers_import_from_the_asset(synth: Synth) -> None:
    asset_dir = synth.code_asset_dir(STACK)
    handlers = [props["Handler"] for _, props in functions_by_handler(synth.template(STACK)).values()]
    assert len(handlers) == 5
    with asset_package(asset_dir):
        for handler in handlers:
            module_name, function_name = handler.rsplit(".", 1)
            module = importlib.import_module(module_name)
            assert Path(module.__file__ or "").resolve().is_relative_to(asset_dir.resolve())
            assert callable(getattr(module, function_name))
    # The test environment's own package is back in place.
    import ami_janitor

    assert not Path(ami_janitor.__file__ or "").resolve().is_relative_to(asset_dir.resolve())


# ---- the handlers on the deployed stack ---------------------------------------------------------------


@dataclass(frozen=True)
class LambdaContext:
    """What Powertools reads from the Lambda context, for one deployed function."""

    function_name: str
    invoked_function_arn: str
    memory_limit_in_mb: int
    aws_request_id: str = "c6af9ac6-7b61-11e6-9a41-93e812345678"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000  # a fresh invocation of the longest timeout


@dataclass
class Fleet:
    """Seven pettracker-ml AMIs ten days apart (oldest first); the third oldest is used by a stopped
    instance, and the build instance carries the family's bake tag."""

    images: list[str]
    referenced: str
    builder: str


@dataclass
class ScheduledRuns:
    dry_run: dict[str, Any]
    after_dry_run: dict[str, dict[str, Any]]  # the fleet as DescribeImages gave it after the dry run
    queued_by_dry_run: list[dict[str, Any]]
    enforce: dict[str, Any]
    queued: list[dict[str, Any]]  # the copy requests the enforce run sent, as received from the queue
    slices: list[dict[str, Any]]  # the slice worker's answers to the slices the enforce run queued


@dataclass
class Bake:
    bake: dict[str, Any]
    event: dict[str, Any]
    queued: list[dict[str, Any]]


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def ec2(region: str = REGION) -> Any:
    return boto3.client("ec2", region_name=region)


def images_by_id(image_ids: list[str], region: str = REGION) -> dict[str, dict[str, Any]]:
    answer = ec2(region).describe_images(ImageIds=image_ids, IncludeDeprecated=True, IncludeDisabled=True)
    return {image["ImageId"]: image for image in answer["Images"]}


def tags_of(image: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in image.get("Tags") or []}


def latest_holders(image_ids: list[str]) -> list[str]:
    return sorted(i for i, image in images_by_id(image_ids).items() if LATEST_TAG in tags_of(image))


def latest_parameter() -> str:
    ssm = boto3.client("ssm", region_name=REGION)
    return str(ssm.get_parameter(Name=LATEST_PARAMETER)["Parameter"]["Value"])


def event(name: str, image_id: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EVENTS / name).read_text())
    if image_id is not None:
        data["detail"]["ImageId"] = image_id
        data["resources"] = [f"arn:aws:ec2:{REGION}::image/{image_id}"]
    return data


def receive_all(queue_url: str) -> list[dict[str, Any]]:
    """Every message on the queue, hidden from other receivers for the rest of the module."""
    sqs = boto3.client("sqs", region_name=REGION)
    messages: list[dict[str, Any]] = []
    while True:
        answer = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=900, AttributeNames=["All"]
        )
        if not answer.get("Messages"):
            return messages
        messages.extend(answer["Messages"])


def sqs_event(queue_url: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The event the queue's event source mapping gives the replication function."""
    sqs = boto3.client("sqs", region_name=REGION)
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return {
        "Records": [
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": message.get("Attributes") or {},
                "messageAttributes": {},
                "md5OfBody": message["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": REGION,
            }
            for message in messages
        ]
    }


def invoke(
    deployment: Deployment, synth: Synth, module: str, payload: dict[str, Any], config: Path
) -> dict[str, Any]:
    """Call one deployed function's handler: imported from the asset by the template's Handler name, with
    the function's environment as the emulator's Lambda reports it."""
    asset_dir = synth.code_asset_dir(STACK)
    _, properties = functions_by_handler(synth.template(STACK))[module]
    module_name, function_name = properties["Handler"].rsplit(".", 1)
    configuration = deployment.functions[module]
    context = LambdaContext(
        function_name=configuration["FunctionName"],
        invoked_function_arn=configuration["FunctionArn"],
        memory_limit_in_mb=configuration["MemorySize"],
    )
    with pytest.MonkeyPatch.context() as patch, asset_package(asset_dir):
        for key, value in configuration["Environment"]["Variables"].items():
            patch.setenv(key, value)
        # The deployed path is /var/task/policy.json, where Lambda unpacks the asset: the test reads
        # the same file from the staged asset directory, or an enforce copy of it (see enforce_policy).
        patch.setenv("AMI_JANITOR_CONFIG", str(config))
        patch.setenv("AWS_REGION", REGION)  # set by the Lambda runtime, not by the template
        handler_module = importlib.import_module(module_name)
        assert Path(handler_module.__file__ or "").resolve().is_relative_to(asset_dir.resolve())
        result: dict[str, Any] = getattr(handler_module, function_name)(payload, context)
    return result


@pytest.fixture(scope="module")
def deployed_policy(synth: Synth) -> Path:
    return synth.code_asset_dir(STACK) / "policy.json"


@pytest.fixture(scope="module")
def enforce_policy(deployed_policy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deployed policy.json with mode enforce, everything else identical: the test policy is a dry
    run, which changes nothing, and the runs below are to change the fleet."""
    policy = json.loads(deployed_policy.read_text())
    assert policy["mode"] == "dry-run"
    path = tmp_path_factory.mktemp("policy") / "policy.json"
    path.write_text(json.dumps({**policy, "mode": "enforce"}))
    return path


@pytest.fixture(scope="module")
def worker_mapping_disabled(deployment: Deployment) -> None:
    """The emulator's queue would hand each new message to the replication function through its event
    source mapping, which needs Docker; the tests receive the messages and call the handler instead."""
    lambda_ = boto3.client("lambda", region_name=REGION)
    for mapping in lambda_.list_event_source_mappings()["EventSourceMappings"]:
        lambda_.update_event_source_mapping(UUID=mapping["UUID"], Enabled=False)


@pytest.fixture(scope="module")
def fleet(deployment: Deployment, worker_mapping_disabled: None) -> Fleet:
    emulator.install()  # deprecation, CopyImage TagSpecifications, ... (moto lacks them)
    client = ec2()
    now = datetime.now(UTC).replace(microsecond=0)
    base = client.register_image(Name="base", RootDeviceName="/dev/xvda")["ImageId"]
    builder = client.run_instances(
        ImageId=base,
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": _tag_list(BAKE_TAGS)}],
    )["Instances"][0]["InstanceId"]
    images = []
    count = 7
    for n in range(count):
        image_id = client.create_image(
            InstanceId=builder,
            Name=f"pettracker-ml-{n:02d}",
            TagSpecifications=[{"ResourceType": "image", "Tags": _tag_list(FAMILY_TAGS)}],
        )["ImageId"]
        # 71, 61, ... 11 days old: the four oldest are past min_age_days.
        emulator.set_image_fields(REGION, image_id, creation_date=now - timedelta(days=10 * (count - n) + 1))
        images.append(image_id)
    referenced = images[2]
    user = client.run_instances(ImageId=referenced, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    client.stop_instances(InstanceIds=[user])
    return Fleet(images=images, referenced=referenced, builder=builder)


@pytest.fixture(scope="module")
def scheduled_runs(
    deployment: Deployment, synth: Synth, fleet: Fleet, deployed_policy: Path, enforce_policy: Path
) -> ScheduledRuns:
    queue_url = deployment.functions["scheduled"]["Environment"]["Variables"]["REPLICATION_QUEUE_URL"]
    dry_run = invoke(deployment, synth, "scheduled", event("scheduled.json"), deployed_policy)
    after_dry_run = images_by_id(fleet.images)
    queued_by_dry_run = receive_all(queue_url)
    enforce = invoke(deployment, synth, "scheduled", event("scheduled.json"), enforce_policy)
    # The work queue's event source mapping: one slice per invocation, a region's slices in order (FIFO).
    work_url = deployment.functions["scheduled"]["Environment"]["Variables"]["WORK_QUEUE_URL"]
    sqs = boto3.client("sqs", region_name=REGION)
    slices = []
    while messages := sqs.receive_message(QueueUrl=work_url, AttributeNames=["All"]).get("Messages"):
        slices.append(invoke(deployment, synth, "slices", sqs_event(work_url, messages[:1]), enforce_policy))
        sqs.delete_message(QueueUrl=work_url, ReceiptHandle=messages[0]["ReceiptHandle"])
    return ScheduledRuns(
        dry_run=dry_run,
        after_dry_run=after_dry_run,
        queued_by_dry_run=queued_by_dry_run,
        enforce=enforce,
        queued=receive_all(queue_url),
        slices=slices,
    )


@pytest.fixture(scope="module")
def baked(deployment: Deployment, synth: Synth, scheduled_runs: ScheduledRuns, enforce_policy: Path) -> Bake:
    """A bake by the deployed bake function, then its AMI's `available` event."""
    bake = invoke(deployment, synth, "bake", {"family": "pettracker-ml"}, enforce_policy)
    available = event("ami_available.json", bake["image_id"])
    handled = invoke(deployment, synth, "ami_event", available, enforce_policy)
    queue_url = deployment.functions["ami_event"]["Environment"]["Variables"]["REPLICATION_QUEUE_URL"]
    return Bake(bake=bake, event=handled, queued=receive_all(queue_url))


def test_scheduled_dry_run_reads_the_deployed_policy_and_changes_nothing(
    fleet: Fleet, scheduled_runs: ScheduledRuns
) -> None:
    result = scheduled_runs.dry_run
    assert result["mode"] == "dry-run" and result["region"] == REGION
    # Planned only: three deprecations (none deregistered); no image, tag or queue was touched.
    assert result["summary"]["deprecated"] == 3 and result["summary"]["retired"] == 0
    assert set(scheduled_runs.after_dry_run) == set(fleet.images)
    for image in scheduled_runs.after_dry_run.values():
        assert not image.get("DeprecationTime")
        assert tags_of(image) == FAMILY_TAGS
    assert scheduled_runs.queued_by_dry_run == []


def test_scheduled_run_deprecates_old_amis_rotates_latest_reports_and_queues_copies(
    deployment: Deployment, fleet: Fleet, scheduled_runs: ScheduledRuns
) -> None:
    result = scheduled_runs.enforce
    assert result["mode"] == "enforce" and result["region"] == REGION
    assert result["summary"]["actions_failed"] == 0
    summary = result["summary"]
    assert (summary["images"], summary["kept"], summary["deprecated"], summary["retired"]) == (7, 4, 3, 0)

    # The default lifecycle deprecates on day 0 (disable after 7 days, deregister after 14): the three
    # old ones that no instance uses are deprecated and start their stage clock; the referenced one and
    # the three newest (keep_latest) are left alone.
    images = images_by_id(fleet.images)
    assert set(images) == set(fleet.images)  # nothing deregistered
    retired = [fleet.images[0], fleet.images[1], fleet.images[3]]
    for image_id in retired:
        assert images[image_id]["DeprecationTime"], image_id
        assert CANDIDATE_TAG in tags_of(images[image_id]), image_id
        assert images[image_id]["State"] == "available", image_id
    for image_id in [fleet.referenced, *fleet.images[4:]]:
        assert not images[image_id].get("DeprecationTime"), image_id
        assert CANDIDATE_TAG not in tags_of(images[image_id]), image_id

    newest = fleet.images[-1]
    assert latest_holders(fleet.images) == [newest]
    assert latest_parameter() == newest

    environment = deployment.functions["scheduled"]["Environment"]["Variables"]
    s3 = boto3.client("s3", region_name=REGION)
    reports = []
    for item in s3.list_objects_v2(Bucket=environment["REPORT_BUCKET"])["Contents"]:
        assert item["Key"].startswith(f"runs/{REGION}/")
        if item["Key"].count("/") > 2:
            continue  # the parts of a run with slices: the last slice wrote its one report beside them
        body = s3.get_object(Bucket=environment["REPORT_BUCKET"], Key=item["Key"])["Body"].read()
        reports.append(json.loads(body))
    assert scheduled_runs.enforce["slices_queued"] == len(scheduled_runs.slices) == 1
    assert scheduled_runs.slices == [{"batchItemFailures": []}]
    [report] = [r for r in reports if r["mode"] == "enforce"]
    assert {d["image_id"] for d in report["decisions"]} == set(fleet.images)
    assert report["rotations"][0]["to"] == newest
    assert report["copies_queued"] == 3

    # The three newest sources (keep_latest) are each to be copied to eu-west-1, with the policy's key.
    copies = [json.loads(message["Body"]) for message in scheduled_runs.queued]
    assert sorted(c["source_image_id"] for c in copies) == sorted(fleet.images[4:])
    for copy in copies:
        assert copy["source_region"] == REGION and copy["region"] == REPLICA_REGION
        assert copy["kms_key_id"] == REPLICA_KEY and copy["generation"] == 1


def test_baked_ami_takes_latest_on_its_available_event_and_is_queued_for_copy(
    fleet: Fleet, baked: Bake
) -> None:
    assert baked.bake["outcome"] == "baked" and baked.bake["instance_id"] == fleet.builder
    new = baked.bake["image_id"]
    image = images_by_id([new])[new]
    assert image["Name"].startswith("pettracker-ml-") and tags_of(image)["Project"] == "PetTracker"

    assert baked.event["outcome"] == "rotated"
    assert latest_holders([*fleet.images, new]) == [new]
    assert latest_parameter() == new
    assert baked.event["copies_queued"] == 1
    [copy] = [json.loads(message["Body"]) for message in baked.queued]
    assert copy["source_image_id"] == new and copy["region"] == REPLICA_REGION


def ledger_item(region: str, image_id: str) -> dict[str, Any]:
    key = {"pk": {"S": f"image#{image_id}"}, "sk": {"S": "item"}}
    answer = boto3.client("dynamodb", region_name=region).get_item(TableName=LEDGER_TABLE, Key=key)
    return dict(answer["Item"])


def test_replication_worker_copies_the_queued_requests_with_provenance(
    deployment: Deployment,
    synth: Synth,
    fleet: Fleet,
    scheduled_runs: ScheduledRuns,
    baked: Bake,
    enforce_policy: Path,
) -> None:
    queue_url = deployment.functions["scheduled"]["Environment"]["Variables"]["REPLICATION_QUEUE_URL"]
    messages = scheduled_runs.queued + baked.queued
    # The replica region's own stack makes its ledger table: the worker records each copy there too.
    boto3.client("dynamodb", region_name=REPLICA_REGION).create_table(
        TableName=LEDGER_TABLE,
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        BillingMode="PAY_PER_REQUEST",
    )
    result = invoke(deployment, synth, "replicate", sqs_event(queue_url, messages), enforce_policy)
    assert result == {"batchItemFailures": []}

    sources = sorted([*fleet.images[4:], baked.bake["image_id"]])
    copies = ec2(REPLICA_REGION).describe_images(Owners=["self"])["Images"]
    assert sorted(tags_of(c)[SOURCE_IMAGE_TAG] for c in copies) == sources
    source_images = images_by_id(sources)
    names = {i: image["Name"] for i, image in source_images.items()}
    # Each source's ledger item records the copy it started (a retry takes the next generation), and
    # each copy's item in the replica region's ledger records it as the janitor's copy of that source.
    for source in sources:
        item = ledger_item(REGION, source)
        assert list(item["copies"]["M"]) == [f"{REPLICA_REGION}#1"]
    for copy in copies:
        replica = ledger_item(REPLICA_REGION, copy["ImageId"])["replica"]["M"]
        assert replica["source_image_id"]["S"] == copy["SourceImageId"] == tags_of(copy)[SOURCE_IMAGE_TAG]
    for copy in copies:
        tags = tags_of(copy)
        assert tags[SOURCE_REGION_TAG] == REGION
        assert tags["Project"] == "PetTracker"  # the copy still joins its family
        assert LATEST_TAG not in tags and CANDIDATE_TAG not in tags
        assert copy["Name"] == names[tags[SOURCE_IMAGE_TAG]]
