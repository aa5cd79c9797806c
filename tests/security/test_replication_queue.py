"""Forged copy requests on the replication queue: the worker rebuilds each request from the policy and
refuses what the policy would not make; the refused message ends in the dead-letter queue.

Anyone with sqs:SendMessage on the queue could write a request (the deployed queue policy lets only
the janitor's own roles send; this is the worker's side of that). The queue, its redrive and the
worker run in process on moto, delivered the way the Lambda event source mapping does. moto ignores
the KMS key of CopyImage, so every CopyImage request is recorded from botocore's own event hook.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.ec2.models import ec2_backends

from ami_janitor.aws import inventory
from ami_janitor.aws.clients import ClientFactory, RegionClients
from ami_janitor.core.model import Copy, Image
from ami_janitor.core.policy import SOURCE_IMAGE_TAG
from ami_janitor.core.replication import MAX_COPY_GENERATIONS
from ami_janitor.demo import emulator
from ami_janitor.handlers import ami_event, replicate
from lambda_events import Context
from server import make_ledger
from sessions import botocore_session

US, EU, WEST, SOUTH = "us-east-1", "eu-west-1", "us-west-2", "ap-south-1"
KEY_EU = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
OTHER_KEY = "arn:aws:kms:eu-west-1:999999999999:key/ffffffff-ffff-ffff-ffff-ffffffffffff"
POLICY_DATA: dict[str, Any] = {
    "mode": "enforce",
    "regions": [US],
    "families": [
        {
            "name": "web",
            "match": {"tags": {"Project": "Web"}, "name": "web-*"},
            "latest": {"tag": "Latest"},
            "replicate": [{"region": EU, "kms_key_id": KEY_EU}, {"region": WEST}],
        }
    ],
}
# As the deployed queue (infra.replication.MAX_RECEIVE_COUNT): five deliveries, then the DLQ.
MAX_RECEIVE_COUNT = 5
EVENTS = Path(__file__).resolve().parents[1] / "events"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": US,
    "AWS_REGION": US,
    "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
    "AMI_JANITOR_MAX_ATTEMPTS": "1",
    "POWERTOOLS_SERVICE_NAME": "ami-janitor",
    "POWERTOOLS_METRICS_NAMESPACE": "AmiJanitor",
}


class RecordingClients(ClientFactory):
    """The worker's clients; each region's EC2 client records the CopyImage requests as the code passes
    them, before moto (which drops KmsKeyId and Encrypted) answers."""

    def __init__(self, requests: list[tuple[str, dict[str, Any]]]) -> None:
        super().__init__()
        self.requests = requests

    def __call__(self, region: str) -> RegionClients:
        clients = super().__call__(region)
        clients.ec2.meta.events.register(
            "provide-client-params.ec2.CopyImage",
            lambda params, **_: self.requests.append((region, dict(params))),
            unique_id=f"record-copy-image-{region}",
        )
        return clients


@dataclass
class Account:
    """moto with the replication queue and its DLQ, and every CopyImage request the worker makes."""

    clients: ClientFactory
    queue_url: str
    queue_arn: str
    dead_letters_url: str
    # (destination region, CopyImage parameters) in the order the worker called it.
    copy_requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)

    def send(self, body: str) -> str:
        sqs = boto3.client("sqs", region_name=US)
        return sqs.send_message(QueueUrl=self.queue_url, MessageBody=body)["MessageId"]

    def deliver(self) -> None:
        """What the event source mapping does until the queue is empty: receive, invoke the worker, delete
        what it did not report as failed (the rest is received again; moto redrives it to the DLQ)."""
        sqs = boto3.client("sqs", region_name=US)
        for _ in range(MAX_RECEIVE_COUNT + 2):
            messages = sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=10, VisibilityTimeout=0, AttributeNames=["All"]
            ).get("Messages", [])
            if not messages:
                return
            answer = replicate.handler(sqs_event(messages, self.queue_arn), Context())  # type: ignore[arg-type]
            self.answers.append(answer)
            failed = {f["itemIdentifier"] for f in answer["batchItemFailures"]}
            for message in messages:
                if message["MessageId"] not in failed:
                    sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        raise AssertionError("the queue never emptied")

    def dead_letters(self) -> list[str]:
        sqs = boto3.client("sqs", region_name=US)
        messages = sqs.receive_message(QueueUrl=self.dead_letters_url, MaxNumberOfMessages=10)
        return [m["Body"] for m in messages.get("Messages", [])]


def sqs_event(messages: list[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m["Attributes"],
                "messageAttributes": {},
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": US,
            }
            for m in messages
        ]
    }


@pytest.fixture
def account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Account]:
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    # No profile file on the machine can lend a real identity.
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    # Powertools reads the namespace when the module is imported, which may be before this fixture.
    monkeypatch.setattr(replicate.metrics, "namespace", "AmiJanitor")
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY_DATA))
    monkeypatch.setenv("AMI_JANITOR_CONFIG", str(path))
    emulator.install()
    with mock_aws():
        make_ledger((US, EU, WEST, SOUTH))
        sqs = boto3.client("sqs", region_name=US)
        dlq_url = sqs.create_queue(QueueName="copies-dead-letters")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]
        redrive = {"deadLetterTargetArn": dlq_arn["QueueArn"], "maxReceiveCount": MAX_RECEIVE_COUNT}
        url = sqs.create_queue(QueueName="copies", Attributes={"RedrivePolicy": json.dumps(redrive)})[
            "QueueUrl"
        ]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        monkeypatch.setenv("REPLICATION_QUEUE_URL", url)
        recorded = Account(
            ClientFactory(botocore_session()), url, arn, dlq_url
        )  # a full SDK: it makes resources
        monkeypatch.setattr(replicate, "ClientFactory", lambda *_: RecordingClients(recorded.copy_requests))
        yield recorded


@pytest.fixture
def worker_log(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The worker's structured log (one JSON object per line)."""
    buffer = io.StringIO()
    monkeypatch.setattr(replicate.logger.registered_handler, "stream", buffer)
    return buffer


def refusals(log: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("message") == "copy request refused"]


def bake(account: Account, name: str, region: str = US, project: str = "Web") -> Image:
    ec2 = account.clients(region).ec2
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
    image_id = ec2.create_image(InstanceId=instance["InstanceId"], Name=name)["ImageId"]
    ec2.create_tags(Resources=[image_id], Tags=[{"Key": "Project", "Value": project}])
    image = inventory.describe_image(account.clients(region), image_id)
    assert image is not None
    return image


def images_in(account: Account, region: str) -> list[str]:
    return sorted(
        i["ImageId"] for i in account.clients(region).ec2.describe_images(Owners=["self"])["Images"]
    )


def forged(source: Image, **fields: Any) -> str:
    """A request as a sender outside the janitor could write it: a genuine one with some fields changed."""
    request = Copy(
        family="web",
        source_image_id=source.image_id,
        source_region=source.region,
        region=EU,
        kms_key_id=KEY_EU,
        generation=1,
    )
    return request.model_copy(update=fields).model_dump_json()


# The source to bake (name, region, Project tag), what the forged request changes, why it is refused.
FORGERIES = [
    pytest.param(
        ("build-host-1", US, "Ops"), {}, "(build-host-1) is in no family of the policy", id="no-family"
    ),
    pytest.param(
        ("web-1", US, "Web"),
        {"kms_key_id": None},
        f"kms_key_id missing: target {EU} encrypts copies with {KEY_EU}",
        id="no-key",
    ),
    pytest.param(
        ("web-1", US, "Web"),
        {"kms_key_id": OTHER_KEY},
        f"kms_key_id {OTHER_KEY} is not the key target {EU} configures ({KEY_EU})",
        id="other-key",
    ),
    pytest.param(
        ("web-1", US, "Web"),
        {"generation": 99},
        "generation 99 is above 1, the highest the janitor could plan",
        id="generation-99",
    ),
    pytest.param(
        ("web-1", US, "Web"),
        {"generation": 2},
        "generation 2 is above 1, the highest the janitor could plan",
        id="generation-never-planned",
    ),
    pytest.param(
        ("web-1", US, "Web"),
        {"region": SOUTH, "kms_key_id": None},
        f"target region {SOUTH} is not a replicate target of family web",
        id="target-not-in-family",
    ),
    pytest.param(
        ("web-1", EU, "Web"),
        {"region": WEST, "kms_key_id": None},
        f"source region {EU} is not one of the policy's regions",
        id="source-region-outside-policy",
    ),
]


@pytest.mark.parametrize(("baked", "changes", "reason"), FORGERIES)
def test_a_forged_request_copies_nothing_and_ends_in_the_dead_letter_queue_with_the_reason(
    account: Account,
    worker_log: io.StringIO,
    capsys: pytest.CaptureFixture[str],
    baked: tuple[str, str, str],
    changes: dict[str, Any],
    reason: str,
) -> None:
    name, region, project = baked
    source = bake(account, name, region, project)
    target = changes.get("region", EU)
    before = images_in(account, target)
    body = forged(source, **changes)
    message_id = account.send(body)
    account.deliver()
    assert account.copy_requests == []  # CopyImage was never called, in any region
    assert images_in(account, target) == before
    # Every delivery was reported failed; after the last one SQS moved the message to the DLQ.
    assert len(account.answers) == MAX_RECEIVE_COUNT
    assert all(a["batchItemFailures"] == [{"itemIdentifier": message_id}] for a in account.answers)
    assert account.dead_letters() == [body]
    refused = refusals(worker_log)
    assert len(refused) == MAX_RECEIVE_COUNT
    assert reason in refused[-1]["reason"]
    assert refused[-1]["request"] == json.loads(body)
    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert sum(sum(m.get("CopyRequestsRefused", [])) for m in metrics) == MAX_RECEIVE_COUNT


def test_a_request_of_the_janitor_itself_copies_with_the_policy_key(
    account: Account, worker_log: io.StringIO
) -> None:
    source = bake(account, "web-2")
    # The AMI event handler plans the new source's copies and queues them, as deployed.
    event = json.loads((EVENTS / "ami_available.json").read_text())
    event["detail"]["ImageId"] = source.image_id
    event["resources"] = [f"arn:aws:ec2:{US}::image/{source.image_id}"]
    assert ami_event.handler(event, Context())["copies_queued"] == 2  # type: ignore[arg-type]
    account.deliver()
    assert [a["batchItemFailures"] for a in account.answers] == [[]]
    assert refusals(worker_log) == [] and account.dead_letters() == []
    requests = dict(account.copy_requests)
    assert sorted(requests) == [EU, WEST]
    assert (requests[EU]["KmsKeyId"], requests[EU]["Encrypted"]) == (KEY_EU, True)
    assert "KmsKeyId" not in requests[WEST] and "Encrypted" not in requests[WEST]
    for region, request in requests.items():
        assert (request["SourceRegion"], request["SourceImageId"]) == (US, source.image_id)
        [copy] = account.clients(region).ec2.describe_images(Owners=["self"])["Images"]
        assert {t["Key"]: t["Value"] for t in copy["Tags"]}[SOURCE_IMAGE_TAG] == source.image_id
        # The ledgers record it: the copy on the source's item, the replica on the copy's.
        made = inventory.read_ledger_items(account.clients(region), "ami-janitor-ledger", [copy["ImageId"]])
        assert made is not None and made.items[copy["ImageId"]].replica is not None
        assert made.items[copy["ImageId"]].replica.source_image_id == source.image_id
    recorded = inventory.read_ledger_items(account.clients(US), "ami-janitor-ledger", [source.image_id])
    assert recorded is not None
    assert sorted(c.region for c in recorded.items[source.image_id].copies) == [EU, WEST]


def test_a_request_for_another_generation_beside_a_usable_copy_copies_nothing(
    account: Account, worker_log: io.StringIO
) -> None:
    """Even from a janitor's role: the generation one above the highest started passes the request's
    checks, but no copy is made beside a usable one, so repeated requests cannot multiply copies."""
    source = bake(account, "web-2")
    event = json.loads((EVENTS / "ami_available.json").read_text())
    event["detail"]["ImageId"] = source.image_id
    event["resources"] = [f"arn:aws:ec2:{US}::image/{source.image_id}"]
    ami_event.handler(event, Context())
    account.deliver()
    made = images_in(account, EU)
    assert len(made) == 1
    account.copy_requests.clear()

    for generation in (2, 2, 3):
        account.send(forged(source, generation=generation))
        account.deliver()

    assert account.copy_requests == [] and images_in(account, EU) == made


def test_a_request_past_the_bound_of_failed_generations_copies_nothing(
    account: Account, worker_log: io.StringIO
) -> None:
    """The janitor stops at MAX_COPY_GENERATIONS failed copies and reports them; a queued request for one
    more generation is no request of the policy's, however well it counts."""
    source = bake(account, "web-2")
    for generation in range(1, MAX_COPY_GENERATIONS + 1):
        before = images_in(account, EU)
        account.send(forged(source, generation=generation))
        account.deliver()
        [copy_id] = set(images_in(account, EU)) - set(before)
        ec2_backends[emulator.DEFAULT_ACCOUNT_ID][EU].amis[copy_id].state = "failed"
    failed = images_in(account, EU)
    account.copy_requests.clear()
    assert len(failed) == MAX_COPY_GENERATIONS

    body = forged(source, generation=MAX_COPY_GENERATIONS + 1)
    account.send(body)
    account.deliver()

    assert account.copy_requests == [] and images_in(account, EU) == failed
    assert account.dead_letters() == [body]
    assert (
        f"{MAX_COPY_GENERATIONS} generations of its copy to {EU} failed" in refusals(worker_log)[-1]["reason"]
    )
