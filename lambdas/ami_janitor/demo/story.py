"""`ami-janitor demo`: the PetTracker fleet on an embedded AWS (moto on loopback), planned and cleaned.

Alex bakes `pettracker-ml` every other night in two regions and two architectures, and an API image
every week. Three months later the account is full of AMIs and snapshots, and some of them are still
used by things nobody remembers. The demo seeds that account, shows the plan with its reasons,
applies it, and prints what is left.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

DEMO_POLICY = """\
mode: enforce
regions: [us-east-1, eu-west-1]
defaults:
  keep_latest: 3
  min_age_days: 14
  launched_within_days: 14
  limits: {max_actions_per_run: 500, max_fraction_per_family: 1.0}
families:
  - name: pettracker-ml
    match: {tags: {Project: PetTracker}, name: "pettracker-ml-*"}
    latest: {tag: Latest, ssm_parameter: "/ami/pettracker-ml/{arch}/latest"}
    lifecycle: {deprecate_after_days: 0, disable_after_days: 7, deregister_after_days: 14}
  - name: pettracker-api
    match: {tags: {Project: PetTracker}, name: "pettracker-api-*"}
    latest: {tag: Latest, ssm_parameter: "/ami/pettracker-api/latest"}
    share_with: {accounts: ["111122223333"]}
    replicate:
      - {region: eu-west-1, kms_key_id: "alias/pettracker-key"}
    bake: {instance_tag: {Role: pettracker-api}}
    keep_latest: 2
    lifecycle: {deprecate_after_days: 0, disable_after_days: 0, deregister_after_days: 0}
"""
REGIONS = ("us-east-1", "eu-west-1")
ARCHITECTURES = ("x86_64", "arm64")
UNLISTED_ACCOUNT = "999988887777"


def _isolate_from_real_aws(endpoint: str, config: Path) -> None:
    """Every client of this process talks to the emulator, never to an account."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        os.environ.pop(key, None)
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AMI_JANITOR_MAX_ATTEMPTS": "1",
            "AMI_JANITOR_CONFIG": str(config),
        }
    )


class Fleet:
    """Seeds the PetTracker account through the EC2/SSM APIs, and ages it in the emulator."""

    def __init__(self, now: datetime) -> None:
        import boto3

        from ami_janitor.demo import emulator

        self.now = now
        self.emulator = emulator
        self.ec2 = {r: boto3.client("ec2", region_name=r) for r in REGIONS}
        self.ssm = {r: boto3.client("ssm", region_name=r) for r in REGIONS}
        self.ml: dict[tuple[str, str], list[str]] = {}  # (region, arch) -> ids, oldest first
        self.api: list[str] = []
        self.builders: dict[str, str] = {}

    def _builder(self, region: str) -> str:
        ec2 = self.ec2[region]
        base = ec2.register_image(Name="al2023-base", RootDeviceName="/dev/xvda")["ImageId"]
        instance = ec2.run_instances(ImageId=base, MinCount=1, MaxCount=1, InstanceType="c5.large")
        return instance["Instances"][0]["InstanceId"]

    def _bake(self, region: str, name: str, arch: str, age_days: float, version: str) -> str:
        ec2 = self.ec2[region]
        image_id = ec2.create_image(
            InstanceId=self.builders[region],
            Name=name,
            Description="PetTracker image baked by CI",
            TagSpecifications=[
                {
                    "ResourceType": "image",
                    "Tags": [{"Key": "Project", "Value": "PetTracker"}, {"Key": "Version", "Value": version}],
                }
            ],
        )["ImageId"]
        self.emulator.set_image_fields(
            region, image_id, creation_date=self.now - timedelta(days=age_days), architecture=arch
        )
        return image_id

    def seed(self) -> None:
        for region in REGIONS:
            self.builders[region] = self._builder(region)
        for night in range(0, 90, 2):  # ~90 days of nightly-ish bakes, oldest first
            age = 90 - night + 0.1
            stamp = (self.now - timedelta(days=age)).strftime("%Y%m%d")
            for region in REGIONS:
                for arch in ARCHITECTURES:
                    name = f"pettracker-ml-{stamp}-{arch}"
                    image_id = self._bake(region, name, arch, age, f"1.{night}")
                    self.ml.setdefault((region, arch), []).append(image_id)
        for week in range(12):
            age = 84 - week * 7 + 0.2
            stamp = (self.now - timedelta(days=age)).strftime("%Y%m%d")
            self.api.append(self._bake("us-east-1", f"pettracker-api-{stamp}", "x86_64", age, f"2.{week}"))
        self._add_references()

    def tag_api_builder(self) -> None:
        """pettracker-api's bake.instance_tag on the us-east-1 build instance: `bake` then finds it."""
        builder = self.builders["us-east-1"]
        self.ec2["us-east-1"].create_tags(
            Resources=[builder], Tags=[{"Key": "Role", "Value": "pettracker-api"}]
        )

    def _add_references(self) -> None:
        east, ssm = self.ec2["us-east-1"], self.ssm["us-east-1"]
        ml = self.ml[("us-east-1", "x86_64")]
        # A stopped instance still launched from an old ML image.
        stopped = east.run_instances(ImageId=ml[4], MinCount=1, MaxCount=1, InstanceType="c5.large")
        east.stop_instances(InstanceIds=[stopped["Instances"][0]["InstanceId"]])
        # The web launch template: version 1 (not the default any more) still names an old API image.
        template = east.create_launch_template(
            LaunchTemplateName="pettracker-web",
            LaunchTemplateData={"ImageId": self.api[1], "InstanceType": "t3.small"},
        )["LaunchTemplate"]["LaunchTemplateId"]
        east.create_launch_template_version(
            LaunchTemplateId=template,
            LaunchTemplateData={"ImageId": self.api[-1], "InstanceType": "t3.small"},
        )
        east.modify_launch_template(LaunchTemplateId=template, DefaultVersion="2")
        # The batch template resolves its AMI through an SSM alias at launch time.
        ssm.put_parameter(
            Name="/pettracker/api/pinned", Value=self.api[3], Type="String", DataType="aws:ec2:image"
        )
        east.create_launch_template(
            LaunchTemplateName="pettracker-batch",
            LaunchTemplateData={"ImageId": "resolve:ssm:/pettracker/api/pinned", "InstanceType": "m5.large"},
        )
        # A rollback pointer someone keeps by hand.
        ssm.put_parameter(Name="/pettracker/ml/rollback-ami", Value=ml[10], Type="String")
        # Opted out, protected, and shared with an account the family does not list.
        east.create_tags(Resources=[self.api[5]], Tags=[{"Key": "ami-janitor:keep", "Value": "audit 2026"}])
        self.ec2["eu-west-1"].enable_image_deregistration_protection(
            ImageId=self.ml[("eu-west-1", "arm64")][2]
        )
        east.modify_image_attribute(
            ImageId=self.api[6], LaunchPermission={"Add": [{"UserId": UNLISTED_ACCOUNT}]}
        )

    def in_use(self) -> dict[str, list[str]]:
        """The AMIs the story says something still uses, by region."""
        east_ml = self.ml[("us-east-1", "x86_64")]
        return {
            "us-east-1": [east_ml[4], east_ml[10], self.api[1], self.api[3], self.api[5], self.api[6]],
            "eu-west-1": [self.ml[("eu-west-1", "arm64")][2]],
        }

    def missing(self, wanted: dict[str, list[str]]) -> list[str]:
        gone = []
        for region, ids in wanted.items():
            found = self.ec2[region].describe_images(Owners=["self"], ImageIds=ids, IncludeDisabled=True)
            present = {i["ImageId"] for i in found["Images"] if i["State"] == "available"}
            gone += [image_id for image_id in ids if image_id not in present]
        return gone

    def census(self) -> dict[str, Any]:
        images = 0
        snapshots = 0
        gib = 0
        for region in REGIONS:
            pages = self.ec2[region].get_paginator("describe_images")
            for page in pages.paginate(Owners=["self"]):
                images += sum(1 for i in page["Images"] if i.get("Name", "").startswith("pettracker-"))
            for snapshot_page in (
                self.ec2[region].get_paginator("describe_snapshots").paginate(OwnerIds=["self"])
            ):
                snapshots += len(snapshot_page["Snapshots"])
                gib += sum(s.get("VolumeSize", 0) for s in snapshot_page["Snapshots"])
        return {"images": images, "snapshots": snapshots, "gib": gib}


def _interesting(decision: Any) -> bool:
    routine = ("among the", "younger than", "Latest of its group")
    return decision.action not in ("keep", "deprecate") or any(
        not reason.startswith(routine) for reason in decision.reasons if decision.action == "keep"
    )


@contextmanager
def _function_of(region: str) -> Iterator[None]:
    """The handlers called here run as `region`'s stack deploys them (its AWS_REGION)."""
    home = os.environ["AWS_REGION"]
    os.environ["AWS_REGION"] = region
    try:
        yield
    finally:
        os.environ["AWS_REGION"] = home


class _Context:
    """What the Lambda runtime passes a handler (the demo calls the handlers directly)."""

    function_name = "ami-janitor-demo"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:ami-janitor-demo"
    aws_request_id = "00000000-0000-4000-8000-000000000000"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000  # a fresh invocation of the longest timeout


def _invoke(
    handler: Callable[[dict[str, Any], Any], dict[str, Any]], event: dict[str, Any]
) -> dict[str, Any]:
    """A handler called as Lambda would call it. Its metrics are dropped: Powertools prints each
    `single_metric` as an EMF line on stdout, POWERTOOLS_METRICS_DISABLED or not, and the demo's stdout
    holds the story (or, with --format json, one JSON document) alone."""
    with redirect_stdout(io.StringIO()):
        return handler(event, _Context())


def ami_state_event(region: str, image_id: str, state: str) -> dict[str, Any]:
    """The event EventBridge delivers for an AMI state change."""
    return {
        "version": "0",
        "id": f"demo-{image_id}-{state}",
        "detail-type": "EC2 AMI State Change",
        "source": "aws.ec2",
        "account": "123456789012",
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [f"arn:aws:ec2:{region}::image/{image_id}"],
        "detail": {"RequestId": "demo", "ImageId": image_id, "State": state, "ErrorMessage": ""},
    }


def _pointer(fleet: Fleet, region: str, arch: str) -> tuple[list[str], str]:
    ids = fleet.ml[(region, arch)]
    images = fleet.ec2[region].describe_images(ImageIds=ids, IncludeDisabled=True)["Images"]
    holders = sorted(i["ImageId"] for i in images if any(t["Key"] == "Latest" for t in i.get("Tags", [])))
    value = fleet.ssm[region].get_parameter(Name=f"/ami/pettracker-ml/{arch}/latest")["Parameter"]["Value"]
    return holders, value


def _rotation_story(fleet: Fleet, policy: Any, out: TextIO) -> None:
    from ami_janitor.aws import rotator
    from ami_janitor.aws.clients import RegionClients
    from ami_janitor.handlers import ami_event

    region, arch = "us-east-1", "x86_64"
    out.write("\n== Latest rotation ==\n")
    holders, value = _pointer(fleet, region, arch)
    out.write(f"Latest of pettracker-ml {region} {arch}: tag on {', '.join(holders)}; parameter {value}\n")
    stamp = fleet.now.strftime("%Y%m%d")
    new = fleet._bake(region, f"pettracker-ml-{stamp}-night-{arch}", arch, 0.01, "1.90")
    fleet.ml[(region, arch)].append(new)
    out.write(
        f"Tonight's bake {new} becomes available; EventBridge delivers its EC2 AMI State Change event.\n"
    )
    result = _invoke(ami_event.handler, ami_state_event(region, new, "available"))
    holders, value = _pointer(fleet, region, arch)
    out.write(
        f"  event handler: {result['outcome']}; Latest tag on {', '.join(holders)}; parameter {value}\n"
    )
    late = fleet.ml[(region, arch)][-3]
    again = _invoke(ami_event.handler, ami_state_event(region, late, "available"))
    holders, value = _pointer(fleet, region, arch)
    out.write(
        f"A late, out-of-order event for the older {late}: {len(again.get('rotations', []))} writes; "
        f"Latest still {', '.join(holders)}\n"
    )
    # A lost event or a hand edit leaves a stale pointer; the scheduled run's reconcile repairs it.
    stale = fleet.ml[(region, arch)][-4]
    fleet.ec2[region].create_tags(Resources=[stale], Tags=[{"Key": "Latest", "Value": "true"}])
    fleet.ssm[region].put_parameter(
        Name=f"/ami/pettracker-ml/{arch}/latest",
        Value=stale,
        Type="String",
        DataType="aws:ec2:image",  # SSM changes no parameter's data type to or from aws:ec2:image
        Overwrite=True,
    )
    holders, value = _pointer(fleet, region, arch)
    out.write(f"Someone points Latest at {stale} by hand: tag on {', '.join(holders)}; parameter {value}\n")
    repaired = rotator.converge(RegionClients(region), policy, datetime.now(UTC))
    holders, value = _pointer(fleet, region, arch)
    writes = sum(len(r.written) for r in repaired)
    out.write(f"  reconcile ({writes} writes): tag on {', '.join(holders)}; parameter {value}\n")


def _sqs_event(messages: Sequence[Mapping[str, Any]], queue_arn: str) -> dict[str, Any]:
    """The event Lambda's SQS event source hands the replication worker."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": "0",
                    "SenderId": "AIDAEXAMPLE",
                    "ApproximateFirstReceiveTimestamp": "0",
                },
                "messageAttributes": {},
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            }
            for m in messages
        ]
    }


def _bake_story(fleet: Fleet, policy: Any, out: TextIO) -> None:
    import boto3

    from ami_janitor.aws import baker
    from ami_janitor.aws.clients import RegionClients
    from ami_janitor.aws.ledger import Ledger
    from ami_janitor.handlers import ami_event, replicate

    out.write("\n== Bake, share, replicate ==\n")
    east = RegionClients("us-east-1")
    family = policy.family("pettracker-api")
    fleet.tag_api_builder()
    instance = baker.find_bake_instance(east, family)
    baked = baker.bake(east, family, instance, datetime.now(UTC), no_reboot=False)
    out.write(f"ami-janitor bake --family pettracker-api: {baked.image_id} ({baked.name}) from {instance}\n")
    sqs = boto3.client("sqs", region_name="us-east-1")
    queue_url = sqs.create_queue(QueueName="ami-janitor-replication")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    os.environ["REPLICATION_QUEUE_URL"] = queue_url
    result = _invoke(ami_event.handler, ami_state_event("us-east-1", baked.image_id, "available"))
    grants = east.ec2.describe_image_attribute(ImageId=baked.image_id, Attribute="launchPermission")
    shared = ", ".join(p.get("UserId", p.get("Group", "?")) for p in grants["LaunchPermissions"])
    latest = east.ssm.get_parameter(Name="/ami/pettracker-api/latest")["Parameter"]["Value"]
    out.write(
        f"  its available event: Latest and /ami/pettracker-api/latest -> {latest}; shared with {shared}; "
        f"{result.get('copies_queued', 0)} copy queued for eu-west-1\n"
    )
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
    answer = _invoke(replicate.handler, _sqs_event(messages, queue_arn))
    west = RegionClients("eu-west-1")
    copies = west.ec2.describe_images(
        Owners=["self"], Filters=[{"Name": "tag:ami-janitor:source-image", "Values": [baked.image_id]}]
    )["Images"]
    failures = len(answer["batchItemFailures"])
    for copy in copies:
        tags = {t["Key"]: t["Value"] for t in copy.get("Tags", [])}
        out.write(
            f"  the replication worker copied it to eu-west-1: {copy['ImageId']} (KMS key requested; "
            f"source-image {tags.get('ami-janitor:source-image')}, source-created "
            f"{tags.get('ami-janitor:source-created')}); {failures} failed messages\n"
        )
        replica = Ledger(west, policy.ledger.table).read_items([copy["ImageId"]])[copy["ImageId"]].replica
        out.write(
            f"  encrypted with {REPLICA_ALIAS}, resolved in eu-west-1 to "
            f"{replica.kms_key_arn if replica else '?'}: CopyImage got that key ARN, and the ledger records "
            "it with the copy (an alias later moved to another key is refused)\n"
        )
        with _function_of("eu-west-1"):  # the copy's event reaches eu-west-1's stack
            _invoke(ami_event.handler, ami_state_event("eu-west-1", copy["ImageId"], "available"))
        pointer = west.ssm.get_parameter(Name="/ami/pettracker-api/latest")["Parameter"]["Value"]
        out.write(f"  the copy's available event in eu-west-1: /ami/pettracker-api/latest -> {pointer}\n")
    again = _invoke(replicate.handler, _sqs_event(messages, queue_arn))
    recount = west.ec2.describe_images(
        Owners=["self"], Filters=[{"Name": "tag:ami-janitor:source-image", "Values": [baked.image_id]}]
    )["Images"]
    out.write(
        f"  the same message delivered again: {len(recount)} copy in eu-west-1, "
        f"{len(again['batchItemFailures'])} failed messages (found by provenance, not copied twice)\n"
    )


@contextmanager
def _kill_interrupts() -> Iterator[None]:
    """`kill` (SIGTERM) interrupts as Ctrl-C does, so that what was started is stopped and its files
    removed (in the main thread, the only one a signal reaches; the previous handler is put back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_emulator(
    out: TextIO, *, port: int = 0, seeded: bool = True, exit_after: float | None = None
) -> int:
    """The demo's emulator alone (seeded with the PetTracker account unless asked empty), with the
    environment lines that point the CLI at it; serves until interrupted (Ctrl-C or `kill`) or
    `exit_after` seconds."""
    with _kill_interrupts():
        return _serve_emulator(out, port=port, seeded=seeded, exit_after=exit_after)


def _serve_emulator(out: TextIO, *, port: int, seeded: bool, exit_after: float | None) -> int:
    os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    from ami_janitor.demo import emulator

    server, endpoint = emulator.start_server(port=port)
    workdir = Path(tempfile.mkdtemp(prefix="ami-janitor-emulator-"))
    config = workdir / "janitor.yaml"
    config.write_text(DEMO_POLICY)
    _isolate_from_real_aws(endpoint, config)
    try:
        if seeded:
            fleet = Fleet(datetime.now(UTC).replace(microsecond=0))
            fleet.seed()
            # What the demo sets up on its way, so that `bake` and `replicate` work here as written.
            fleet.tag_api_builder()
            _make_replica_key()
        out.write(
            f"# the emulator listens on {endpoint} ({'the demo account' if seeded else 'empty'}); "
            "in another shell:\n"
            f"export AWS_ENDPOINT_URL={endpoint} AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing\n"
            "export AWS_DEFAULT_REGION=us-east-1 AMI_JANITOR_MAX_ATTEMPTS=1  # moto answers what it lacks "
            "with an error: no retries\n"
            f"export AMI_JANITOR_CONFIG={config}\n"
            "ami-janitor ledger create && ami-janitor plan\n"
        )
        out.flush()
        deadline = None if exit_after is None else time.monotonic() + exit_after
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # the policy it wrote points at a server now gone
    return 0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(out: TextIO, *, json_output: bool = False) -> int:
    with _kill_interrupts():
        return _run_demo(out, json_output=json_output)


def _run_demo(out: TextIO, *, json_output: bool) -> int:
    started = time.monotonic()
    os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # before moto builds its backends
    # The handlers run in this process: keep their JSON logs and metrics out of the story.
    os.environ.update(
        {"POWERTOOLS_LOG_LEVEL": "WARNING", "POWERTOOLS_METRICS_DISABLED": "true", "AWS_REGION": "us-east-1"}
    )
    from ami_janitor.core.policy import load_policy
    from ami_janitor.demo import emulator

    server, endpoint = emulator.start_server()
    workdir = Path(tempfile.mkdtemp(prefix="ami-janitor-demo-"))
    config = workdir / "janitor.yaml"
    config.write_text(DEMO_POLICY)
    _isolate_from_real_aws(endpoint, config)
    # With --format json, stdout carries only the plan's JSON; the story goes to stderr.
    text = sys.stderr if json_output else out
    try:
        now = datetime.now(UTC).replace(microsecond=0)
        text.write(f"Embedded AWS (moto) on {endpoint}; policy {config}\n\n")
        fleet = Fleet(now)
        fleet.seed()
        before = fleet.census()
        text.write(
            f"Seeded the PetTracker account: {before['images']} AMIs, {before['snapshots']} snapshots "
            f"({before['gib']} GiB) in {', '.join(REGIONS)}; x86_64 and arm64.\n"
            "In use: a stopped instance, a non-default launch template version, a resolve:ssm: alias,\n"
            "a hand-kept SSM parameter; one AMI opted out, one protected, one shared with an unlisted "
            "account.\n\n"
        )
        policy = load_policy(config)
        _replica_key(text)
        result = _cleanup_story(fleet, policy, now, out, json_output)
        after = fleet.census()
        if not json_output:
            _ledger_story(fleet, policy, now, out)
        _rotation_story(fleet, policy, text)
        _bake_story(fleet, policy, text)
        _left_story(result, before, after, text)
        code = _check_in_use(fleet, text) or result.exit_code
        text.write(f"Done in {time.monotonic() - started:.1f} s. Exit code {code}.\n")
        return code
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


REPLICA_ALIAS = "alias/pettracker-key"


def _make_replica_key() -> str:
    """The key pettracker-api's copies to eu-west-1 are encrypted with, named by its alias in the policy."""
    import boto3

    kms = boto3.client("kms", region_name="eu-west-1")
    arn = str(kms.create_key(Description="PetTracker AMI copies")["KeyMetadata"]["Arn"])
    kms.create_alias(AliasName=REPLICA_ALIAS, TargetKeyId=arn)
    return arn


def _replica_key(out: TextIO) -> str:
    arn = _make_replica_key()
    out.write(f"Replica key in eu-west-1: {REPLICA_ALIAS} -> {arn} (the policy names the alias).\n\n")
    return arn


def _cleanup_story(fleet: Fleet, policy: Any, now: datetime, out: TextIO, json_output: bool) -> Any:
    """The plan (routine keeps folded), then the scheduled run in enforce mode; returns its result."""
    from ami_janitor import engine
    from ami_janitor.aws.clients import ClientFactory
    from ami_janitor.cli.render import print_plan, print_results

    factory = ClientFactory()
    # What `ami-janitor ledger create` does: enforce records every step in the ledger first.
    made = engine.create_ledgers(policy, policy.managed_regions, factory, None)
    if not json_output:
        out.write(
            f"Ledger: `ami-janitor ledger create` made {policy.ledger.table} in {len(made)} regions.\n\n"
        )
    preview = engine.run(policy, policy.managed_regions, factory, now, apply=False)
    if json_output:
        out.write(preview.plan.to_json())
    else:
        out.write("== The plan (every decision carries its reasons; routine keeps are folded) ==\n")
        shown = preview.plan.model_copy(
            update={"decisions": [d for d in preview.plan.decisions if _interesting(d)]}
        )
        print_plan(shown, out)
        folded = len(preview.plan.decisions) - len(shown.decisions)
        out.write(f"({folded} routine decisions folded: newest-N, young, Latest, staged deprecations)\n\n")
    engine.require_ledgers(policy, policy.managed_regions, factory)
    result = engine.run(policy, policy.managed_regions, factory, now, apply=True)
    if not json_output:
        out.write("== Applied (mode: enforce) ==\n")
        api = set(fleet.api)
        print_results(
            result.model_copy(update={"results": [r for r in result.results if r.image_id in api]}), out
        )
        staged = Counter(r.action for r in result.results if r.image_id not in api and r.status == "ok")
        out.write(
            f"pettracker-ml: {staged['mark-candidate']} clocks started, {staged['deprecate']} deprecated "
            "(still launchable by id; disable is due in 7 days)\n"
        )
    return result


def _ledger_story(fleet: Fleet, policy: Any, now: datetime, out: TextIO) -> None:
    """The ledger the run wrote (a line per stage), then a forged clock tag: reported, not obeyed."""
    from ami_janitor import engine
    from ami_janitor.aws.clients import ClientFactory, RegionClients
    from ami_janitor.aws.ledger import Ledger
    from ami_janitor.cli.render import print_plan
    from ami_janitor.core.model import iso
    from ami_janitor.core.policy import CANDIDATE_TAG

    view = Ledger(RegionClients("us-east-1"), policy.ledger.table).read_all()
    out.write("\n== The ledger (us-east-1; only the janitor's roles may write it) ==\n")
    staged = sorted(
        (item for item in view.items.values() if item.stages), key=lambda i: (-len(i.stages), i.image_id)
    )
    for item in staged[:4]:
        for stage, entry in sorted(item.stages.items(), key=lambda kv: kv[1].at):
            extra = (
                f" (snapshots {', '.join(s.snapshot_id for s in item.snapshots)})"
                if stage == "deregister"
                else ""
            )
            out.write(f"  {item.image_id}: {stage} recorded {iso(entry.at)}{extra}\n")
    out.write(f"  ... {len(view.items)} items in all (candidate clocks, stages, grants)\n")

    # Someone who may only tag backdates the clock of a deprecated pettracker-ml AMI, hoping the next
    # run disables and deregisters it at once.
    target = next(i for i in fleet.ml[("us-east-1", "x86_64")] if i in view.items and view.items[i].stages)
    forged = iso(now - timedelta(days=60)) or ""
    fleet.ec2["us-east-1"].create_tags(Resources=[target], Tags=[{"Key": CANDIDATE_TAG, "Value": forged}])
    out.write(f"\nSomeone with ec2:CreateTags sets {CANDIDATE_TAG}={forged} on {target}; the next plan:\n")
    plan = engine.run(policy, ["us-east-1"], ClientFactory(), now, apply=False).plan
    decision = next(d for d in plan.decisions if d.image_id == target)
    shown = plan.model_copy(
        update={"decisions": [decision], "notes": [], "latest": [], "copies": [], "shares": []}
    )
    print_plan(shown.model_copy(update={"bakes": []}), out)


def _left_story(result: Any, before: Mapping[str, int], after: Mapping[str, int], out: TextIO) -> None:
    waiting = [d for d in result.plan.decisions if d.next_action]
    done = {r.image_id for r in result.results if r.action == "deregister" and r.status == "ok"}
    deleted = sum(len(r.snapshots_deleted) for r in result.results)
    freed = sum(d.size_gib for d in result.plan.decisions if d.image_id in done)
    next_at = min((d.next_action_at for d in waiting if d.next_action_at), default=None)
    out.write(
        f"\n== What is left ==\nThe cleanup run: AMIs {before['images']} -> {after['images']} "
        f"({result.plan.summary.retired} retired, {len(result.replicated.copy_results)} copies made in "
        f"eu-west-1; the bakes and copies since are not counted); snapshots deleted: {deleted} ({freed} "
        f"GiB, an upper bound: snapshots are incremental)\n"
        f"pettracker-api (all stages at 0 days) was retired at once; pettracker-ml is on the staged "
        f"path: next stage {waiting[0].next_action if waiting else '-'} at {next_at}.\n"
    )


def _check_in_use(fleet: Fleet, out: TextIO) -> int:
    """1 if an AMI in use was touched (the demo's own safety check), else 0."""
    wanted = fleet.in_use()
    missing = fleet.missing(wanted)
    if missing:
        out.write(f"FAILED: in-use AMIs were touched: {', '.join(missing)}\n")
        return 1
    count = sum(len(ids) for ids in wanted.values())
    out.write(
        f"Checked: all {count} referenced, opted-out, protected or foreign-shared AMIs are available.\n"
    )
    return 0
