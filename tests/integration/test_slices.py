"""A run's due stages past one invocation, on the moto server: the scheduled run queues its slices to a
FIFO work queue, the slice worker takes them one by one, and the run's last slice sends its one report."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError
from botocore.exceptions import ClientError

from ami_janitor import engine
from ami_janitor.aws import runs, slicer
from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.ledger import Ledger
from ami_janitor.aws.runs import RunRecords, run_key
from ami_janitor.core.model import Plan, RegionStatus, iso
from ami_janitor.core.policy import DEFAULT_LEDGER_TABLE, Policy, parse_policy
from ami_janitor.core.slices import WorkSlice
from ami_janitor.handlers import scheduled, slices
from builders import decision
from lambda_events import Context, sqs_event, sqs_record
from server import POLICY, Fleet, ec2, image_ids, make_ledger, now, seed_fleet

REGION = "us-east-1"
SCHEDULED = {"version": "0", "detail-type": "Scheduled Event", "source": "aws.events", "detail": {}}


class Deployment:
    """The stack's pieces the two functions use: the work queue, the report bucket, the topic (with a
    queue subscribed, to read what it sent)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, policy_path: Path) -> None:
        self.policy_path = policy_path
        self.sqs = boto3.client("sqs", region_name=REGION)
        self.s3 = boto3.client("s3", region_name=REGION)
        sns = boto3.client("sns", region_name=REGION)
        self.queue_url = self.sqs.create_queue(
            QueueName="work.fifo", Attributes={"FifoQueue": "true", "VisibilityTimeout": "0"}
        )["QueueUrl"]
        self.queue_arn = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        self.s3.create_bucket(Bucket="reports")
        topic = sns.create_topic(Name="janitor")["TopicArn"]
        self.mail_url = self.sqs.create_queue(QueueName="mail")["QueueUrl"]
        mail_arn = self.sqs.get_queue_attributes(QueueUrl=self.mail_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=mail_arn)
        for name, value in {
            "AWS_REGION": REGION,
            "POWERTOOLS_SERVICE_NAME": "ami-janitor",
            "POWERTOOLS_METRICS_NAMESPACE": "AmiJanitor",
            "AMI_JANITOR_CONFIG": str(policy_path),
            "REPORT_BUCKET": "reports",
            "TOPIC_ARN": topic,
            "WORK_QUEUE_URL": self.queue_url,
        }.items():
            monkeypatch.setenv(name, value)

    def write_policy(self, mode: str, **defaults: Any) -> None:
        policy = yaml.safe_load(POLICY.format(mode=mode))
        policy["defaults"].update(defaults)
        self.policy_path.write_text(json.dumps(policy))

    def queued(self) -> list[str]:
        bodies: list[str] = []
        while True:
            answer = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10)
            messages = answer.get("Messages", [])
            if not messages:
                return bodies
            for message in messages:
                bodies.append(message["Body"])
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])

    def work(self, body: str, delivery: int = 1) -> dict[str, Any]:
        """The slice worker given this message, on its `delivery`th delivery."""
        answer: dict[str, Any] = slices.handler(
            sqs_event(body, queue_arn=self.queue_arn, group=REGION, receive_count=delivery), Context()
        )
        return answer

    def next_run_long_after(self, run: str) -> None:
        """`run` started 13 hours ago (none of its slices can still come); then the next scheduled run,
        and its slices."""
        boto3.client("dynamodb", region_name=REGION).update_item(
            TableName=DEFAULT_LEDGER_TABLE,
            Key=run_key(REGION, run),
            UpdateExpression="SET started = :at",
            ExpressionAttributeValues={":at": {"S": iso(now() - timedelta(hours=13))}},
        )
        scheduled.handler(SCHEDULED, Context())
        for body in self.queued():
            self.work(body)

    def mails(self) -> list[str]:
        answer = self.sqs.receive_message(QueueUrl=self.mail_url, MaxNumberOfMessages=10)
        return [json.loads(m["Body"])["Message"] for m in answer.get("Messages", [])]

    def planned(self) -> tuple[Fleet, list[str]]:
        """An enforce run on the seeded fleet, with its ledger: the fleet, and the slices it queued."""
        self.write_policy("enforce")
        fleet = seed_fleet(now())
        make_ledger()
        scheduled.handler(SCHEDULED, Context())
        return fleet, self.queued()

    def part(self, bodies: list[str], index: int) -> dict[str, Any]:
        """What slice `index` of the run whose slices `bodies` are wrote beside the run's report."""
        run = WorkSlice.model_validate_json(bodies[0]).run
        key = slices.slice_key(REGION, run, index)
        answer: dict[str, Any] = json.loads(self.s3.get_object(Bucket="reports", Key=key)["Body"].read())
        return answer

    def keys(self) -> list[str]:
        return sorted(o["Key"] for o in self.s3.list_objects_v2(Bucket="reports").get("Contents", []))


@pytest.fixture
def deployed(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    # One AMI per slice: each retires through three stages of 0.2 s of paced calls.
    monkeypatch.setattr(engine, "SLICE_BUDGET_SECONDS", 0.6)
    yield Deployment(monkeypatch, tmp_path / "policy.json")


def test_a_run_applies_its_due_stages_in_slices_and_reports_once_after_the_last(deployed: Deployment) -> None:
    deployed.write_policy("enforce")
    fleet = seed_fleet(now())
    make_ledger()

    answer = scheduled.handler(SCHEDULED, Context())

    assert answer["slices_queued"] == 3
    assert answer["summary"]["retired"] == 3
    assert set(fleet.images) <= image_ids()  # nothing retired yet: the stages wait in the queue
    bodies = deployed.queued()
    work = [WorkSlice.model_validate_json(b) for b in bodies]
    assert [(w.index, w.count) for w in work] == [(0, 3), (1, 3), (2, 3)]
    retiring = [i.image_id for w in work for i in w.items]
    assert len(set(retiring)) == 3
    assert all(i.stages == ("deprecate", "disable", "deregister") for w in work for i in w.items)
    run = work[0].run
    assert deployed.keys() == [f"runs/{REGION}/{run}/run.json"]
    assert deployed.mails() == []  # the summary waits for the last slice

    for body in bodies[:2]:
        assert deployed.work(body) == {"batchItemFailures": []}
        assert deployed.mails() == []
    deployed.work(bodies[2])

    assert not set(retiring) & image_ids()
    [mail] = deployed.mails()
    assert "failures: 0" in mail and "images retired: 3" in mail
    report = json.loads(
        deployed.s3.get_object(Bucket="reports", Key=f"runs/{REGION}/{run}.json")["Body"].read()
    )
    done = [
        (r["image_id"], r["action"], r["status"]) for r in report["results"] if r["action"] == "deregister"
    ]
    assert sorted(done) == sorted((i, "deregister", "ok") for i in retiring)
    assert report["slices_queued"] == 3 and report["summary"]["actions_failed"] == 0

    # SQS delivers at least once: the first slice again changes nothing, counts nothing, mails nothing.
    deployed.work(bodies[0])
    assert deployed.mails() == []
    progress = RunRecords(boto3.client("dynamodb", region_name=REGION), DEFAULT_LEDGER_TABLE).read(
        REGION, run
    )
    assert progress.done == {0, 1, 2} and progress.counts["held_back"] == 0


def test_the_retirement_metrics_come_from_the_slices_that_retire(
    deployed: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run that queues the slices retires nothing itself (ImagesRetired 0); each slice worker counts
    what it deregistered and deleted, so the metric sums to what was done."""
    deployed.write_policy("enforce")
    fleet = seed_fleet(now())
    make_ledger()
    capsys.readouterr()

    answer = scheduled.handler(SCHEDULED, Context())

    assert answer["summary"]["retired"] == 3 and answer["slices_queued"] == 3
    assert _metric(capsys, "ImagesRetired") == [0.0]
    for body in deployed.queued():
        deployed.work(body)
    retired = [i for i in fleet.images if i not in image_ids()]
    assert len(retired) == 3 and sum(_metric(capsys, "ImagesRetired")) == 3


def _metric(capsys: pytest.CaptureFixture[str], name: str) -> list[float]:
    """The values of metric `name` in the EMF lines printed since the last read."""
    values: list[float] = []
    for line in capsys.readouterr().out.splitlines():
        if '"_aws"' in line and f'"{name}"' in line:
            value = json.loads(line)[name]
            values += value if isinstance(value, list) else [value]
    return values


def test_a_slice_its_run_did_not_queue_is_refused_before_it_reads_or_counts(
    deployed: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Someone able to send to the work queue, not to write the ledger table: a slice of the run with an
    # AMI the plan kept added, its consumers changed, or a slice of a run that never was.
    fleet, bodies = deployed.planned()
    first = WorkSlice.model_validate_json(bodies[0])
    planned = {i.image_id for body in bodies for i in WorkSlice.model_validate_json(body).items}
    kept = sorted(set(fleet.images) - planned)[0]
    added = first.items[0].model_copy(update={"image_id": kept})
    forged = [
        first.model_copy(update={"items": (*first.items, added)}),
        first.model_copy(
            update={"items": (first.items[0].model_copy(update={"consumers": ("999988887777",)}),)}
        ),
        first.model_copy(update={"run": "2026-01-01T00:00:00Z"}),
    ]

    logged: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(slices.logger, "error", lambda message, extra: logged.append((message, extra)))
    for work in forged:
        with pytest.raises(BatchProcessingError):  # SQS delivers it again, then to the DLQ (alarmed)
            deployed.work(work.model_dump_json())

    assert [m for m, _ in logged] == ["slice refused"] * 3  # every delivery says why
    assert "not the one its run recorded" in logged[0][1]["reason"]
    assert "no record of run 2026-01-01T00:00:00Z" in logged[2][1]["reason"]
    assert set(fleet.images) <= image_ids()
    records = RunRecords(boto3.client("dynamodb", region_name=REGION), DEFAULT_LEDGER_TABLE)
    assert records.read(REGION, first.run).done == frozenset()  # no slice counted
    assert deployed.keys() == [f"runs/{REGION}/{first.run}/run.json"]  # no result written
    assert deployed.work(bodies[0]) == {"batchItemFailures": []}  # the run's own slice still runs
    assert first.items[0].image_id not in image_ids()


def test_a_slice_holds_back_an_ami_opted_out_since_the_plan(deployed: Deployment) -> None:
    fleet, bodies = deployed.planned()
    kept = WorkSlice.model_validate_json(bodies[1]).items[0].image_id
    ec2().create_tags(Resources=[kept], Tags=[{"Key": "ami-janitor:keep", "Value": "incident 42"}])

    for body in bodies:
        deployed.work(body)

    retiring = {WorkSlice.model_validate_json(b).items[0].image_id for b in bodies}
    assert kept in image_ids() and len(fleet.images) - len(image_ids() & set(fleet.images)) == 2
    assert not (retiring - {kept}) & image_ids()
    [mail] = deployed.mails()
    assert "held back by a slice's fresh read (planned again next run): 1" in mail
    run = WorkSlice.model_validate_json(bodies[0]).run
    report = json.loads(
        deployed.s3.get_object(Bucket="reports", Key=f"runs/{REGION}/{run}.json")["Body"].read()
    )
    held = [r for r in report["results"] if r["image_id"] == kept and r["action"] == "deregister"]
    assert held[0]["status"] == "skipped"
    assert held[0]["detail"] == "held back: opted out (tag ami-janitor:keep) since the plan"


def test_where_describe_image_references_is_not_offered_a_slice_reads_every_source_again(
    deployed: Deployment,
) -> None:
    """moto has no DescribeImageReferences (as some partitions): a launch template made since the plan
    still holds its AMI back, found by reading the region's reference sources again."""
    _, bodies = deployed.planned()
    used = WorkSlice.model_validate_json(bodies[1]).items[0].image_id
    template = ec2().create_launch_template(
        LaunchTemplateName="since-the-plan", LaunchTemplateData={"ImageId": used}
    )["LaunchTemplate"]["LaunchTemplateId"]

    for body in bodies:
        deployed.work(body)

    assert used in image_ids()
    part = deployed.part(bodies, 1)
    why = f"in use since the plan: referenced by launch template {template} (since-the-plan) version 1"
    assert part["held"] == {used: why}
    [mail] = deployed.mails()
    assert "held back by a slice's fresh read (planned again next run): 1" in mail


def test_a_slice_holds_back_an_ami_rescued_by_hand_since_the_plan(deployed: Deployment) -> None:
    """`ami-janitor rescue` closes the AMI's clock between the plan and its slice: held back, with why,
    and counted as held back in the run's summary."""
    _, bodies = deployed.planned()
    rescued = WorkSlice.model_validate_json(bodies[1]).items[0].image_id
    policy = parse_policy(json.loads(deployed.policy_path.read_text()))
    [rescue] = engine.rescue(policy, rescued, [REGION], lambda region: RegionClients(region), now())
    assert "candidate clock closed in the ledger" in (rescue.detail or "")

    for body in bodies:
        deployed.work(body)

    assert rescued in image_ids()
    part = deployed.part(bodies, 1)
    why = "no candidate clock open in the ledger (rescued since the plan)"
    assert part["held"] == {rescued: why}
    assert {(r["status"], r["detail"]) for r in part["results"]} == {("skipped", f"held back: {why}")}
    [mail] = deployed.mails()
    assert "held back by a slice's fresh read (planned again next run): 1" in mail


def test_a_paused_policy_stops_the_queued_slices_without_a_write(deployed: Deployment) -> None:
    fleet, bodies = deployed.planned()
    deployed.write_policy("paused")

    assert deployed.work(bodies[0]) == {"batchItemFailures": []}

    assert set(fleet.images) <= image_ids()
    run = WorkSlice.model_validate_json(bodies[0]).run
    progress = RunRecords(boto3.client("dynamodb", region_name=REGION), DEFAULT_LEDGER_TABLE).read(
        REGION, run
    )
    assert progress.done == frozenset()
    assert deployed.keys() == [f"runs/{REGION}/{run}/run.json"]


def test_a_slice_queued_in_enforce_and_worked_in_dry_run_changes_no_ami_and_says_why(
    deployed: Deployment,
) -> None:
    fleet, bodies = deployed.planned()
    retiring = sorted(i.image_id for b in bodies for i in WorkSlice.model_validate_json(b).items)
    table = Ledger(
        RegionClients(REGION, dynamodb=boto3.client("dynamodb", region_name=REGION)), DEFAULT_LEDGER_TABLE
    )
    clocks = table.read_items(retiring)
    deployed.write_policy("dry-run")  # the operator's switch, before the worker takes the slices

    for body in bodies:
        assert deployed.work(body) == {"batchItemFailures": []}

    described = ec2().describe_images(ImageIds=retiring)["Images"]
    assert set(fleet.images) <= image_ids()
    assert {(i["State"], i.get("DeprecationTime")) for i in described} == {("available", None)}
    assert table.read_items(retiring) == clocks  # the clocks stand as the enforce run left them
    part = deployed.part(bodies, 0)
    why = "the policy's mode is dry-run since the plan: nothing is done; the next enforce run plans again"
    assert part["dropped"] == why
    assert {(r["status"], r["detail"]) for r in part["results"]} == {("skipped", why)}
    [mail] = deployed.mails()  # the enforce run's one summary says what was planned and not run
    assert "images retired: 3" in mail
    assert (
        "not run: a queued slice was dropped or ran out of time, or another run of the same scheduled event "
        "had them (see the report's results; planned again by the next enforce run): 3" in mail
    )


def test_a_slice_of_another_policy_is_dropped_and_counted(deployed: Deployment) -> None:
    fleet, bodies = deployed.planned()
    deployed.write_policy("enforce", keep_latest=5)  # deployed since the plan: it would keep more

    for body in bodies:
        deployed.work(body)

    assert set(fleet.images) <= image_ids()
    [mail] = deployed.mails()
    assert "ami-janitor enforce run" in mail
    assert "planned again by the next enforce run): 3" in mail
    part = deployed.part(bodies, 0)
    assert part["dropped"] == "the policy changed since the plan: the next run plans again"
    assert {r["status"] for r in part["results"]} == {"skipped"}


def test_a_slice_starts_no_ami_once_its_invocation_runs_short_of_time(deployed: Deployment) -> None:
    fleet, bodies = deployed.planned()

    for body in bodies:
        slices.handler(
            sqs_event(body, queue_arn=deployed.queue_arn, group=REGION),
            Context(remaining_millis=slices.RESERVE_MILLIS - 1),
        )

    assert set(fleet.images) <= image_ids()  # not one stage started
    [mail] = deployed.mails()  # the run still ends, with its one summary
    assert "failures: 0" in mail
    run = WorkSlice.model_validate_json(bodies[0]).run
    report = json.loads(
        deployed.s3.get_object(Bucket="reports", Key=f"runs/{REGION}/{run}.json")["Body"].read()
    )
    staged = [r for r in report["results"] if r["action"] in ("deprecate", "disable", "deregister")]
    assert len(staged) == 9 and {r["status"] for r in staged} == {"skipped"}
    assert {r["detail"] for r in staged} == {
        "the invocation's time ran out before it: the next run plans it again"
    }


def test_a_malformed_record_after_a_failed_one_fails_with_it_not_the_whole_batch(
    deployed: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FIFO: once a record fails, the records after it fail too. A malformed one among them is a batch
    item failure like the others: it had failed the invocation, so that SQS delivered again the record
    done before the failure."""
    deployed.write_policy("enforce")
    handled: list[str] = []

    def slice_record(record: slices.WorkSliceRecord, *args: object) -> dict[str, object]:
        handled.append(record.messageId)
        if record.messageId == "m-1":
            raise RuntimeError("cannot read its AMIs")
        return {}

    monkeypatch.setattr(slices, "slice_record", slice_record)
    good = WorkSlice(
        run="2026-11-25T03:00:00Z",
        region=REGION,
        index=0,
        count=1,
        planned_at="2026-11-25T03:00:00Z",
        policy="p",
        items=[{"image_id": "ami-0123456789abcdef0", "family": "web", "stages": ["deprecate"]}],
    ).model_dump_json()
    records = [
        sqs_record(good, message_id="m-0", queue_arn=deployed.queue_arn, group=REGION),
        sqs_record(good, message_id="m-1", queue_arn=deployed.queue_arn, group=REGION),
        sqs_record("not a slice", message_id="m-2", queue_arn=deployed.queue_arn, group=REGION),
    ]

    answer = slices.handler({"Records": records}, Context())

    assert handled == ["m-0", "m-1"]
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-1"}, {"itemIdentifier": "m-2"}]}
    # Alone, it fails the invocation, as any batch whose every record fails (Powertools): SQS delivers
    # it again, then parks it in the dead-letter queue.
    with pytest.raises(BatchProcessingError, match=r"not a slice|Invalid JSON"):
        slices.handler({"Records": records[2:]}, Context())


def test_one_slice_takes_its_amis_side_by_side_and_reports_them_in_plan_order(
    deployed: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "SLICE_BUDGET_SECONDS", 300.0)
    deployed.write_policy("enforce")
    fleet = seed_fleet(now(), count=9)
    make_ledger()
    scheduled.handler(SCHEDULED, Context())
    [body] = deployed.queued()
    work = WorkSlice.model_validate_json(body)
    assert len(work.items) == 6

    deployed.work(body)

    assert not {i.image_id for i in work.items} & image_ids()
    assert len(image_ids() & set(fleet.images)) == 3
    report = json.loads(
        deployed.s3.get_object(Bucket="reports", Key=slices.slice_key(REGION, work.run, 0))["Body"].read()
    )
    order = [(r["image_id"], r["action"]) for r in report["results"]]
    assert order == [(i.image_id, stage) for i in work.items for stage in i.stages]
    assert {r["status"] for r in report["results"]} == {"ok"}


def test_a_summary_that_could_not_be_sent_is_sent_by_the_slices_next_delivery(deployed: Deployment) -> None:
    _, bodies = deployed.planned()
    run = WorkSlice.model_validate_json(bodies[0]).run
    part = f"runs/{REGION}/{run}/run.json"
    kept = deployed.s3.get_object(Bucket="reports", Key=part)["Body"].read()
    deployed.s3.delete_object(Bucket="reports", Key=part)  # the run's part cannot be read for a while
    for body in bodies[:-1]:
        deployed.work(body)

    with pytest.raises(BatchProcessingError):  # the invocation fails: SQS delivers the slice again
        deployed.work(bodies[-1])

    assert deployed.mails() == []
    deployed.s3.put_object(Bucket="reports", Key=part, Body=kept)
    assert deployed.work(bodies[-1]) == {"batchItemFailures": []}  # SQS delivers it again
    [mail] = deployed.mails()
    assert "images retired: 3" in mail


def test_a_slice_delivered_again_after_it_was_counted_leaves_its_results_in_the_report(
    deployed: Deployment,
) -> None:
    """The last slice retires its AMI, is counted, then cannot send the summary: SQS delivers it again.
    The second delivery finds the slice counted: it reads and does nothing again, and the run's report
    keeps what the first delivery did (not its AMI's stages skipped as gone)."""
    _, bodies = deployed.planned()
    last = WorkSlice.model_validate_json(bodies[-1])
    part = f"runs/{REGION}/{last.run}/run.json"
    kept = deployed.s3.get_object(Bucket="reports", Key=part)["Body"].read()
    deployed.s3.delete_object(Bucket="reports", Key=part)  # the run's part cannot be read for a while
    for body in bodies[:-1]:
        deployed.work(body)
    with pytest.raises(BatchProcessingError):
        deployed.work(bodies[-1])
    deployed.s3.put_object(Bucket="reports", Key=part, Body=kept)

    again = deployed.work(bodies[-1])

    assert again == {"batchItemFailures": []}
    [mail] = deployed.mails()
    assert "images retired: 3" in mail
    report = json.loads(
        deployed.s3.get_object(Bucket="reports", Key=f"runs/{REGION}/{last.run}.json")["Body"].read()
    )
    [item] = last.items
    mine = [r for r in report["results"] if r["image_id"] == item.image_id and r["action"] in item.stages]
    assert [(r["action"], r["status"]) for r in mine] == [(stage, "ok") for stage in item.stages], mine
    assert mine[-1]["snapshots_deleted"] != []


def test_the_next_run_says_once_which_earlier_run_never_finished_its_slices(deployed: Deployment) -> None:
    """A slice that ends in the dead-letter queue leaves its run without a report or summary: the next
    scheduled run past the age a queued slice may reach names that run in its report and mail, once."""
    _, bodies = deployed.planned()
    run = WorkSlice.model_validate_json(bodies[0]).run
    for body in bodies[:-1]:
        deployed.work(body)  # the last slice is parked in the dead-letter queue: never worked
    assert deployed.mails() == []
    db = boto3.client("dynamodb", region_name=REGION)
    record = RunRecords(db, DEFAULT_LEDGER_TABLE)

    deployed.next_run_long_after(run)

    [mail] = deployed.mails()
    line = (
        f"unfinished run: {REGION}: run {run}: 1 of its 3 slices never finished, so its report and "
        "summary never came: see the work queue's dead-letter queue (the next run plans those AMIs again)"
    )
    assert line in mail.splitlines()
    stored = deployed.keys()
    [later] = [k for k in stored if k.endswith(".json") and k.count("/") == 2 and run not in k]
    report = json.loads(deployed.s3.get_object(Bucket="reports", Key=later)["Body"].read())
    assert report["unfinished_runs"] == [line.removeprefix("unfinished run: ")]
    # Said once: the record is marked, so no later run's Scan finds it again.
    table = Ledger(RegionClients(REGION, dynamodb=db), DEFAULT_LEDGER_TABLE)
    assert table.read_all().unfinished_runs == ()
    assert not record.mark_unfinished_reported(REGION, run, now())


def _run_left_unfinished_long_ago(deployed: Deployment) -> tuple[str, Ledger]:
    """A run whose last slice was parked in the dead-letter queue (never worked), started 13 hours ago:
    past the age a queued slice may reach, the next run names it. Its run, and the region's ledger."""
    _, bodies = deployed.planned()
    run = WorkSlice.model_validate_json(bodies[0]).run
    for body in bodies[:-1]:
        deployed.work(body)
    db = boto3.client("dynamodb", region_name=REGION)
    db.update_item(
        TableName=DEFAULT_LEDGER_TABLE,
        Key=run_key(REGION, run),
        UpdateExpression="SET started = :at",
        ExpressionAttributeValues={":at": {"S": iso(now() - timedelta(hours=13))}},
    )
    return run, Ledger(RegionClients(REGION, dynamodb=db), DEFAULT_LEDGER_TABLE)


def _next_run_with_its_bucket_names_it_once(
    deployed: Deployment, monkeypatch: pytest.MonkeyPatch, run: str, table: Ledger
) -> None:
    """The next run, with the report bucket, names the unfinished `run` once in its mail and marks it."""
    monkeypatch.setenv("REPORT_BUCKET", "reports")
    scheduled.handler(SCHEDULED, Context())
    for body in deployed.queued():
        deployed.work(body)
    [mail] = deployed.mails()
    assert sum(line.startswith(f"unfinished run: {REGION}: run {run}:") for line in mail.splitlines()) == 1
    assert run not in [u.run for u in table.read_all().unfinished_runs]  # marked: said once


def test_a_run_that_dies_before_its_report_is_out_leaves_the_unfinished_run_to_the_next(
    deployed: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run that names an unfinished run fails to write its report (here the bucket is gone, and
    EventBridge invokes the function again): the record is not marked, so the next run names it."""
    run, table = _run_left_unfinished_long_ago(deployed)

    monkeypatch.setenv("REPORT_BUCKET", "reports-gone")
    with pytest.raises(ClientError):
        scheduled.handler(SCHEDULED, Context())
    deployed.queued()  # that run's slices: it failed, the next plans those AMIs again
    assert run in [u.run for u in table.read_all().unfinished_runs]  # not marked: nobody was told

    _next_run_with_its_bucket_names_it_once(deployed, monkeypatch, run, table)


def test_a_run_with_no_report_bucket_whose_slices_send_the_mail_leaves_the_unfinished_run_to_the_next(
    deployed: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a report bucket, a run that queues slices writes no part: its last slice mails what the
    run's record holds, which names no earlier run. The unfinished run it found stays unmarked, for a
    later run to name."""
    run, table = _run_left_unfinished_long_ago(deployed)

    monkeypatch.delenv("REPORT_BUCKET")
    assert scheduled.handler(SCHEDULED, Context())["slices_queued"] > 0
    for body in deployed.queued():
        deployed.work(body)
    [mail] = deployed.mails()
    assert not any(line.startswith(f"unfinished run: {REGION}: run {run}:") for line in mail.splitlines())
    assert run in [u.run for u in table.read_all().unfinished_runs]  # not marked: nobody was told

    _next_run_with_its_bucket_names_it_once(deployed, monkeypatch, run, table)


def _a_run_that_times_out_after_queueing(
    deployed: Deployment, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, dict[str, Any]]:
    """A fleet, and a scheduled event whose run queued its slices and wrote its part of the report, then
    timed out (Lambda runs the event again)."""
    deployed.write_policy("enforce", limits={"max_actions_per_run": 2, "max_fraction_per_family": 1.0})
    fleet = seed_fleet(now())
    make_ledger()
    event = {**SCHEDULED, "id": "7bf73129-1428-4cd3-a780-95db273d1602", "time": iso(now())}
    publish = scheduled.publish

    def publish_then_time_out(*args: Any, **kwargs: Any) -> None:
        publish(*args, **kwargs)
        raise TimeoutError("Task timed out")

    with monkeypatch.context() as failing:
        failing.setattr(scheduled, "publish", publish_then_time_out)
        with pytest.raises(TimeoutError):
            scheduled.handler(event, Context())
    return fleet, event


def test_a_retried_scheduled_event_queues_no_slices_again_and_the_cap_holds_per_event(
    deployed: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run queues its slices, then fails (its invocation times out after its report), and Lambda
    runs the same event again. Its slices have acted meanwhile: the retry would plan the next AMIs,
    twice the cap for one scheduled event. The retry queues none; its stages are skipped, saying why.
    The next scheduled event (another id) plans them again."""
    fleet, event = _a_run_that_times_out_after_queueing(deployed, monkeypatch)
    first = deployed.queued()
    assert first
    for body in first:
        deployed.work(body)
    retired = [i for i in fleet.images if i not in image_ids()]
    assert 0 < len(retired) <= 2

    retry = scheduled.handler(event, Context())  # the same event, run again by Lambda

    assert deployed.queued() == [] and retry["slices_queued"] == 0
    assert [i for i in fleet.images if i not in image_ids()] == retired  # nothing more this event
    stored = deployed.keys()
    key = max(k for k in stored if k.startswith(f"runs/{REGION}/") and k.count("/") == 2)  # the retry's
    report = json.loads(deployed.s3.get_object(Bucket="reports", Key=key)["Body"].read())
    skipped = [r for r in report["results"] if r["status"] == "skipped"]
    assert skipped and all(
        f"the scheduled event {event['id']} was run before" in r["detail"] for r in skipped
    )

    scheduled.handler({**event, "id": "0d6d4c0e-8f0b-4a59-9d2c-2f4c7a1b9e33"}, Context())  # the next one
    assert deployed.queued()


def test_a_retried_events_summary_counts_its_skipped_stages_as_not_run(
    deployed: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry of an event whose first run's slices did its work skips its stages: its summary must
    say they were not done by it (the report's, the answer's and the mail's), not count them retired
    with nothing amiss, the first run's own summary counting the same AMIs retired."""
    fleet, event = _a_run_that_times_out_after_queueing(deployed, monkeypatch)
    for body in deployed.queued():
        deployed.work(body)
    retired = [i for i in fleet.images if i not in image_ids()]
    [first_mail] = deployed.mails()  # the first run's summary, sent by its last slice
    assert f"images retired: {len(retired)}" in first_mail

    answer = scheduled.handler(event, Context())  # the same event, run again by Lambda

    assert answer["slices_queued"] == 0
    stored = deployed.keys()
    key = max(k for k in stored if k.startswith(f"runs/{REGION}/") and k.count("/") == 2)  # the retry's
    report = json.loads(deployed.s3.get_object(Bucket="reports", Key=key)["Body"].read())
    skipped = {r["image_id"] for r in report["results"] if r["status"] == "skipped"}
    assert skipped and report["summary"]["retired"] == len(skipped)  # the plan's count: none done here
    assert report["summary"]["not_run"] == len(skipped)
    assert answer["summary"]["not_run"] == len(skipped)
    [mail] = deployed.mails()
    [line] = [line for line in mail.splitlines() if line.startswith("not run: ")]
    assert "another run of the same scheduled event had them" in line and line.endswith(f": {len(skipped)}")


def test_a_retried_event_whose_first_run_queued_no_slice_queues_them(
    deployed: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQS refused every slice (their stages failed), then the report could not be written: Lambda runs
    the event again. Nothing of the event was queued, so the first run gave its claim back and the
    retry queues the slices."""
    deployed.write_policy("enforce")
    fleet = seed_fleet(now())
    make_ledger()
    event = {**SCHEDULED, "id": "2c1d7a9e-5b3f-4e8a-9d6c-0f1e2d3c4b5a"}

    def sqs_down(*args: Any, **kwargs: Any) -> int:
        raise slicer.SlicesNotQueued("SQS refused slices: ServiceUnavailable", frozenset())

    def s3_down(*args: Any, **kwargs: Any) -> None:
        raise ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "down"}}, "PutObject")

    with monkeypatch.context() as failing:
        failing.setattr(slicer, "enqueue_slices", sqs_down)
        failing.setattr(scheduled, "publish", s3_down)
        with pytest.raises(ClientError):
            scheduled.handler(event, Context())
    assert deployed.queued() == []
    time.sleep(1.1)  # the retry plans a run of another second

    retry = scheduled.handler(event, Context())

    assert retry["slices_queued"] > 0 and deployed.queued()
    assert set(fleet.images) <= image_ids()


def age_claim(event_id: str, by: timedelta) -> None:
    """Make the event's claim in the ledger table `by` older."""
    db = boto3.client("dynamodb", region_name=REGION)
    key = runs.event_key(REGION, event_id)
    claimed = db.get_item(TableName=DEFAULT_LEDGER_TABLE, Key=key, ConsistentRead=True)["Item"]["claimed"][
        "S"
    ]
    older = iso(datetime.fromisoformat(claimed) - by)
    db.update_item(
        TableName=DEFAULT_LEDGER_TABLE,
        Key=key,
        UpdateExpression="SET claimed = :at",
        ExpressionAttributeValues={":at": {"S": older or ""}},
    )


def test_a_retried_event_whose_first_run_was_killed_before_it_recorded_its_slices_queues_them(
    deployed: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The invocation was killed (its timeout: no error handling runs) between the claim of its event
    and the record of its slices: nothing was queued. The retry, which Lambda makes only after that
    timeout, takes the claim over and queues them; a further delivery of the event then finds the
    retry's record, and queues nothing."""
    deployed.write_policy("enforce")
    seed_fleet(now())
    make_ledger()
    event = {**SCHEDULED, "id": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"}

    class Killed(BaseException):
        """What a Lambda timeout is to the code: it stops, and nothing after runs."""

    def killed(*args: Any, **kwargs: Any) -> None:
        raise Killed()

    with monkeypatch.context() as failing:
        failing.setattr(RunRecords, "start", killed)
        with pytest.raises(Killed):
            scheduled.handler(event, Context())
    assert deployed.queued() == []
    age_claim(event["id"], runs.SCHEDULED_RUN_TIMEOUT)  # the retry comes after the killed one's timeout
    time.sleep(1.1)

    assert scheduled.handler(event, Context())["slices_queued"] > 0
    time.sleep(1.1)
    assert scheduled.handler(event, Context())["slices_queued"] == 0


def test_a_second_delivery_of_an_event_whose_claim_is_not_recorded_yet_does_not_take_it_over(
    moto_aws: None,
) -> None:
    """EventBridge delivered the event twice: the second run asks while the first holds the claim and has
    not recorded its slices yet (claim and record are two calls). Taken over as a killed run's claim,
    both runs would queue their slices, the caps twice for one event: the claim holds until the first
    run's invocation is surely over (SCHEDULED_RUN_TIMEOUT), and only then is taken over."""
    make_ledger()
    records = RunRecords(boto3.client("dynamodb", region_name=REGION), DEFAULT_LEDGER_TABLE)
    start = now()
    first, second, third = (iso(start + timedelta(seconds=s)) or "" for s in (0, 1, 2))
    assert records.claim_event(REGION, "event-1", first, start, "request-1") is None

    held = records.claim_event(REGION, "event-1", second, start + timedelta(seconds=1), "request-2")
    late = records.claim_event(REGION, "event-1", third, start + runs.SCHEDULED_RUN_TIMEOUT, "request-3")

    assert held == first  # its stages are skipped: "the scheduled event ... was run before"
    assert late is None  # the first run is over, having recorded nothing: this one takes the claim over


def test_lambdas_retry_of_an_invocation_that_died_between_claim_and_record_takes_its_claim_over(
    moto_aws: None,
) -> None:
    """The first attempt claimed the event, then died before it recorded its slices, its claim not
    given back (killed: out of memory). Lambda runs a failed invocation again about a minute later,
    with the same request id: nothing of the event was queued, and the retry takes the claim over. A
    second delivery of the event (another invocation) is still held off."""
    make_ledger()
    records = RunRecords(boto3.client("dynamodb", region_name=REGION), DEFAULT_LEDGER_TABLE)
    start = now()
    first, duplicate, retry = (iso(start + timedelta(seconds=s)) or "" for s in (0, 30, 60))
    assert records.claim_event(REGION, "event-1", first, start, "request-1") is None

    assert (
        records.claim_event(REGION, "event-1", duplicate, start + timedelta(seconds=30), "request-2") == first
    )
    assert records.claim_event(REGION, "event-1", retry, start + timedelta(minutes=1), "request-1") is None
    # The retry's claim holds against the duplicate in its turn.
    assert (
        records.claim_event(REGION, "event-1", duplicate, start + timedelta(minutes=2), "request-2") == retry
    )


def test_a_slice_delivered_again_after_it_acted_but_before_it_was_counted_counts_its_amis_retired(
    deployed: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker stops between a slice's stages and its count: SQS delivers the slice again, which
    finds its AMI gone. The ledger shows the AMI deregistered since the plan: done by the first
    delivery, not held back, and the summary counts nothing held back."""
    _, bodies = deployed.planned()
    last = WorkSlice.model_validate_json(bodies[-1])
    [item] = last.items
    count = RunRecords.finish_slice
    stops = iter([True])

    def stop_once(self: RunRecords, *args: Any) -> Any:
        if next(stops, False):
            raise RuntimeError("the invocation ended before the slice was counted")
        return count(self, *args)

    for body in bodies[:-1]:
        deployed.work(body)
    monkeypatch.setattr(RunRecords, "finish_slice", stop_once)
    with pytest.raises(BatchProcessingError):
        deployed.work(bodies[-1])
    assert item.image_id not in image_ids()  # retired by the first delivery, not counted

    assert deployed.work(bodies[-1]) == {"batchItemFailures": []}  # SQS delivers it again

    part = json.loads(
        deployed.s3.get_object(Bucket="reports", Key=slices.slice_key(REGION, last.run, last.index))[
            "Body"
        ].read()
    )
    assert part["held"] == {}
    details = {(r["action"], r["status"], r["detail"]) for r in part["results"]}
    assert {(action, status) for action, status, _ in details} == {(s, "skipped") for s in item.stages}
    assert all(
        d.startswith("done by an earlier delivery of this slice (deregistered ") for _, _, d in details
    )
    progress = RunRecords(boto3.client("dynamodb", region_name=REGION), DEFAULT_LEDGER_TABLE).read(
        REGION, last.run
    )
    assert progress.counts["held_back"] == 0
    [mail] = deployed.mails()
    assert "images retired: 3" in mail and "held back" not in mail


class SecondBatchRefused:
    """The work queue: the first SendMessageBatch goes through, the second is refused."""

    def __init__(self, sqs: Any) -> None:
        self.sqs, self.calls = sqs, 0

    def send_message_batch(self, **request: Any) -> Any:
        self.calls += 1
        if self.calls == 2:
            raise ClientError(
                {"Error": {"Code": "RequestThrottled", "Message": "slow down"}}, "SendMessageBatch"
            )
        return self.sqs.send_message_batch(**request)


def twelve_slices() -> tuple[Any, str, Policy, Plan, list[WorkSlice]]:
    """A work queue, and a run's twelve slices of one AMI each (two SendMessageBatch calls)."""
    make_ledger()
    sqs = boto3.client("sqs", region_name=REGION)
    queue = sqs.create_queue(QueueName="work.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    policy = parse_policy(
        {"mode": "enforce", "regions": [REGION], "families": [{"name": "app", "match": {"name": "app-*"}}]}
    )
    decisions = [decision(n, stages=("deregister",), region=REGION) for n in range(12)]
    plan = Plan(
        mode="enforce",
        generated_at=iso(now()) or "",
        regions=[RegionStatus(region=REGION, status="ok")],
        decisions=decisions,
    )
    work = engine.cut_due(plan, policy, REGION, decisions, now(), budget_seconds=0.2)  # one AMI a slice
    assert len(work) == 12
    return sqs, queue, policy, plan, work


def test_slices_sqs_took_before_it_refused_others_are_not_reported_as_not_queued(moto_aws: None) -> None:
    """Twelve slices, two SendMessageBatch calls: the ten SQS took will run, and report themselves;
    only the two it refused fail here."""
    sqs, queue, policy, plan, work = twelve_slices()
    decisions = plan.decisions
    clients = RegionClients(REGION, sqs=SecondBatchRefused(sqs))  # type: ignore[arg-type]

    result = engine.queue_slices(engine.RunResult(plan=plan), REGION, work, policy, clients, queue, now())

    messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
    taken = {item.image_id for m in messages for item in WorkSlice.model_validate_json(m["Body"]).items}
    failed = {r.image_id for r in result.results if r.status == "failed"}
    assert len(taken) == 10 and result.slices_queued == 10
    assert failed == {d.image_id for d in decisions} - taken
    assert all(
        "slice not queued: " in (r.error or "") and "RequestThrottled" in (r.error or "")
        for r in result.results
    )


def test_a_run_recorded_first_by_an_invocation_of_the_same_second_queues_nothing_again(
    moto_aws: None,
) -> None:
    """EventBridge delivered the schedule twice: the two invocations plan runs of one key (the region and
    the second). The first records and queues its slices; the second's stages are skipped, saying why."""
    _, queue, policy, plan, work = twelve_slices()
    first = engine.queue_slices(
        engine.RunResult(plan=plan), REGION, work, policy, RegionClients(REGION), queue, now()
    )
    assert first.slices_queued == 12

    second = engine.queue_slices(
        engine.RunResult(plan=plan), REGION, work, policy, RegionClients(REGION), queue, now()
    )

    assert second.slices_queued == 0 and {r.status for r in second.results} == {"skipped"}
    assert len(second.results) == 12
    assert "recorded by another invocation started the same second" in (second.results[0].detail or "")


def test_the_summary_counts_the_amis_a_slice_had_no_time_for_as_not_run(deployed: Deployment) -> None:
    """The last slice's invocation has less than its reserve left: its AMI is not started (the next run
    plans it again). The run's one summary counted it nowhere: retired as planned, nothing amiss."""
    _, bodies = deployed.planned()
    run = WorkSlice.model_validate_json(bodies[0]).run
    for body in bodies[:-1]:
        deployed.work(body)
    slices.handler(
        sqs_event(bodies[-1], queue_arn=deployed.queue_arn, group=REGION, receive_count=1),
        Context(remaining_millis=60_000),
    )
    last = deployed.part(bodies, len(bodies) - 1)
    assert {r["status"] for r in last["results"]} == {"skipped"}

    [mail] = deployed.mails()
    report = json.loads(
        deployed.s3.get_object(Bucket="reports", Key=f"runs/{REGION}/{run}.json")["Body"].read()
    )
    assert report["summary"]["not_run"] == 1
    assert "not run: a queued slice was dropped or ran out of time" in mail
