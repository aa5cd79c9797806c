"""A share made between a run's plan and its slice (deployed, a slice may run hours later): the slice
must keep the AMI as the plan would have (rule 5), never disable it (DisableImage removes every launch
permission) nor deregister it. Played on the moto server through the scheduled run, its work queue
and the slice worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from ami_janitor.core.slices import WorkSlice
from ami_janitor.handlers import scheduled, slices
from lambda_events import Context, sqs_event
from server import POLICY, ec2, image_ids, make_ledger, now, seed_fleet

REGION = "us-east-1"
SCHEDULED = {"version": "0", "detail-type": "Scheduled Event", "source": "aws.events", "detail": {}}
OUTSIDE_ACCOUNT = "999988887777"
PARTNER_ACCOUNT = "111122223333"


class Queued:
    """The scheduled run's slices, waiting in the work queue for the slice worker."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, policy_path: Path, **defaults: Any) -> None:
        policy = yaml.safe_load(POLICY.format(mode="enforce"))
        policy["defaults"].update(defaults)
        policy["families"][0]["share_with"] = {"accounts": [PARTNER_ACCOUNT]}
        policy_path.write_text(json.dumps(policy))
        sqs = boto3.client("sqs", region_name=REGION)
        self.s3 = boto3.client("s3", region_name=REGION)
        self.s3.create_bucket(Bucket="reports")
        queue_url = sqs.create_queue(
            QueueName="work.fifo", Attributes={"FifoQueue": "true", "VisibilityTimeout": "0"}
        )["QueueUrl"]
        self.queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        for name, value in {
            "AWS_REGION": REGION,
            "POWERTOOLS_SERVICE_NAME": "ami-janitor",
            "POWERTOOLS_METRICS_NAMESPACE": "AmiJanitor",
            "AMI_JANITOR_CONFIG": str(policy_path),
            "WORK_QUEUE_URL": queue_url,
            "REPORT_BUCKET": "reports",
        }.items():
            monkeypatch.setenv(name, value)
        seed_fleet(now())
        make_ledger()
        scheduled.handler(SCHEDULED, Context())
        self.bodies: list[str] = []
        while messages := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages"):
            for message in messages:
                self.bodies.append(message["Body"])
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        self.retiring = [
            item.image_id for b in self.bodies for item in WorkSlice.model_validate_json(b).items
        ]

    def work(self) -> None:
        for body in self.bodies:
            answer = slices.handler(sqs_event(body, queue_arn=self.queue_arn, group=REGION), Context())
            assert answer == {"batchItemFailures": []}

    def results(self, image_id: str) -> list[tuple[str, str, str | None]]:
        """(stage, status, detail) of the AMI, from its slice's report."""
        found: list[tuple[str, str, str | None]] = []
        for body in self.bodies:
            work = WorkSlice.model_validate_json(body)
            key = slices.slice_key(REGION, work.run, work.index)
            outcome = json.loads(self.s3.get_object(Bucket="reports", Key=key)["Body"].read())
            found += [
                (r["action"], r["status"], r["detail"])
                for r in outcome["results"]
                if r["image_id"] == image_id
            ]
        return found


def share(image_id: str, who: dict[str, str]) -> None:
    ec2().modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": [who]})  # type: ignore[list-item]


def shown(image_id: str) -> dict[str, Any]:
    return dict(ec2().describe_images(ImageIds=[image_id], IncludeDisabled=True)["Images"][0])


def permissions(image_id: str) -> list[dict[str, str]]:
    answer = ec2().describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    return list(answer["LaunchPermissions"])


def test_a_share_made_after_the_plan_keeps_the_ami_its_slice_would_disable(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queued = Queued(monkeypatch, tmp_path / "policy.json")
    shared, *others = queued.retiring
    share(shared, {"UserId": OUTSIDE_ACCOUNT})

    queued.work()

    assert shown(shared)["State"] == "available"
    assert {"UserId": OUTSIDE_ACCOUNT} in permissions(shared)
    assert others and not set(others) & image_ids()  # the rest of the run retires as planned
    held = f"held back: shared with user:{OUTSIDE_ACCOUNT} (not in share_with) since the plan"
    assert queued.results(shared)[1:] == [
        ("disable", "skipped", f"{held}: not disabled, its launch permissions left as they are"),
        ("deregister", "skipped", "disable not applied"),
    ]


def test_an_ami_made_public_after_the_plan_is_held_before_any_stage(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queued = Queued(monkeypatch, tmp_path / "policy.json")
    public = queued.retiring[0]
    share(public, {"Group": "all"})

    queued.work()

    image = shown(public)
    assert image["State"] == "available" and image["Public"] is True
    assert "DeprecationTime" not in image  # DescribeImages says public: no stage starts
    held = "held back: public (the family does not set public: true) since the plan"
    assert queued.results(public) == [
        (stage, "skipped", held) for stage in ("deprecate", "disable", "deregister")
    ]


def test_a_share_made_after_the_plan_keeps_an_ami_its_lifecycle_never_disables(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lifecycle = {"deprecate_after_days": 0, "disable_after_days": None, "deregister_after_days": 0}
    queued = Queued(monkeypatch, tmp_path / "policy.json", lifecycle=lifecycle)
    shared, *others = queued.retiring
    share(shared, {"UserId": OUTSIDE_ACCOUNT})

    queued.work()

    # Deprecated (reversible: the next run rescues it), never deregistered with its share.
    assert shared in image_ids() and {"UserId": OUTSIDE_ACCOUNT} in permissions(shared)
    assert others and not set(others) & image_ids()
    held = f"held back: shared with user:{OUTSIDE_ACCOUNT} (not in share_with) since the plan"
    assert queued.results(shared)[1:] == [("deregister", "skipped", f"{held}: not deregistered")]


@pytest.mark.parametrize(
    ("defaults", "who"),
    [({"allow_shared": True}, {"UserId": OUTSIDE_ACCOUNT}), ({}, {"UserId": PARTNER_ACCOUNT})],
    ids=["allow_shared", "inside-share_with"],
)
def test_a_share_the_plan_would_allow_retires_as_planned(
    endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    defaults: dict[str, Any],
    who: dict[str, str],
) -> None:
    queued = Queued(monkeypatch, tmp_path / "policy.json", **defaults)
    share(queued.retiring[0], who)

    queued.work()

    assert not set(queued.retiring) & image_ids()
