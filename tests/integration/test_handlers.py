"""The Lambda handlers on a moto server: the scheduled run and EC2 AMI State Change events."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from moto.core import DEFAULT_ACCOUNT_ID
from moto.core.utils import unix_time_millis
from moto.sqs.models import sqs_backends

from ami_janitor import engine
from ami_janitor.aws import rotator
from ami_janitor.aws.clients import ClientFactory
from ami_janitor.aws.inventory import count_calls
from ami_janitor.aws.ledger import Ledger, LedgerMissing, Prior
from ami_janitor.core.model import Plan, RegionStatus, Summary, Tampered
from ami_janitor.core.policy import DEFAULT_LEDGER_TABLE, load_policy
from ami_janitor.demo import emulator
from ami_janitor.handlers import ami_event, scheduled
from ami_janitor.handlers.events import BadEvent
from lambda_events import Context
from sdk_faults import deny
from server import POLICY, Fleet, ec2, image_ids, make_ledger, now, seed_fleet

EVENTS = Path(__file__).resolve().parents[1] / "events"


TIME = "%Y-%m-%dT%H:%M:%SZ"


def event(name: str, image_id: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EVENTS / name).read_text())
    if image_id:
        data["detail"]["ImageId"] = image_id
        data["resources"] = [f"arn:aws:ec2:us-east-1::image/{image_id}"]
    return data


@pytest.fixture
def lambda_env(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "ami-janitor")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "AmiJanitor")
    policy = tmp_path / "policy.json"
    monkeypatch.setenv("AMI_JANITOR_CONFIG", str(policy))
    return policy


def write_policy(path: Path, mode: str) -> None:
    path.write_text(json.dumps(yaml.safe_load(POLICY.format(mode=mode))))


def latest_holders(ids: list[str]) -> list[str]:
    images = ec2().describe_images(ImageIds=ids, IncludeDisabled=True)["Images"]
    return sorted(i["ImageId"] for i in images if any(t["Key"] == "Latest" for t in i.get("Tags", [])))


def parameter() -> str:
    return boto3.client("ssm", region_name="us-east-1").get_parameter(Name="/ami/web/latest")["Parameter"][
        "Value"
    ]


def test_scheduled_run_reconciles_then_cleans_up_and_reports(
    lambda_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    make_ledger()
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="reports")
    topic = boto3.client("sns", region_name="us-east-1").create_topic(Name="janitor")["TopicArn"]
    monkeypatch.setenv("REPORT_BUCKET", "reports")
    monkeypatch.setenv("TOPIC_ARN", topic)
    result = scheduled.handler(event("scheduled.json"), Context())
    assert result["mode"] == "enforce"
    assert result["summary"]["retired"] == 3 and result["summary"]["actions_failed"] == 0
    assert fleet.images[0] not in image_ids()
    assert latest_holders(fleet.images) == [fleet.images[-1]]
    assert parameter() == fleet.images[-1]
    [report_key] = [o["Key"] for o in s3.list_objects_v2(Bucket="reports")["Contents"]]
    report = json.loads(s3.get_object(Bucket="reports", Key=report_key)["Body"].read())
    assert report_key.startswith("runs/us-east-1/")
    assert {d["image_id"] for d in report["decisions"]} == set(fleet.images)
    assert report["rotations"][0]["to"] == fleet.images[-1]


def test_scheduled_run_in_dry_run_and_paused_writes_nothing(lambda_env: Path) -> None:
    fleet = seed_fleet(now())
    write_policy(lambda_env, "dry-run")
    result = scheduled.handler(event("scheduled.json"), Context())
    assert result["summary"]["retired"] == 3  # planned, not done
    assert set(fleet.images) <= image_ids()
    assert latest_holders(fleet.images) == []
    write_policy(lambda_env, "paused")
    assert scheduled.handler(event("scheduled.json"), Context()) == {"mode": "paused"}


def _emitted(capsys: pytest.CaptureFixture[str]) -> dict[str, list[float]]:
    """Each metric's values in the EMF lines the handlers printed since the last read."""
    emitted: dict[str, list[float]] = {}
    for line in capsys.readouterr().out.splitlines():
        if '"_aws"' in line:
            record = json.loads(line)
            for metric in record["_aws"]["CloudWatchMetrics"][0]["Metrics"]:
                value = record[metric["Name"]]
                emitted.setdefault(metric["Name"], []).extend(value if isinstance(value, list) else [value])
    return emitted


def test_the_retirement_metrics_count_what_the_run_did_not_what_it_planned(
    lambda_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dry run plans three retirements and does none: ImagesRetired and SnapshotsDeleted say 0; the
    enforce run (its stages run in process) says what it deregistered and deleted."""
    seed_fleet(now())
    make_ledger()
    write_policy(lambda_env, "dry-run")
    capsys.readouterr()
    planned = scheduled.handler(event("scheduled.json"), Context())
    emitted = _emitted(capsys)
    assert planned["summary"]["retired"] == 3
    assert (emitted["ImagesRetired"], emitted["SnapshotsDeleted"]) == ([0.0], [0.0])
    write_policy(lambda_env, "enforce")
    done = scheduled.handler(event("scheduled.json"), Context())
    emitted = _emitted(capsys)
    assert done["summary"]["retired"] == 3 and emitted["ImagesRetired"] == [3.0]
    assert emitted["SnapshotsDeleted"] == [float(done["summary"]["snapshots_deleted"])]
    assert done["summary"]["snapshots_deleted"] > 0


def test_the_scheduled_run_refuses_another_rules_event_and_runs_on_its_own_or_by_hand(
    lambda_env: Path,
) -> None:
    """An AMI's state change sent to the scheduled function (a rule pointed at the wrong target) is
    refused naming its detail-type, not taken for a run of every managed region."""
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    make_ledger()
    with pytest.raises(BadEvent, match="malformed scheduled event: detail-type"):
        scheduled.handler(event("ami_available.json", fleet.images[-1]), Context())
    assert set(fleet.images) <= image_ids() and latest_holders(fleet.images) == []
    with pytest.raises(BadEvent, match="not a JSON object"):
        scheduled.handler([], Context())  # type: ignore[arg-type]
    write_policy(lambda_env, "dry-run")
    assert scheduled.handler({}, Context())["summary"]["retired"] == 3  # invoked by hand: a run


GARBAGE_BATCHES: list[tuple[object, str]] = [
    (None, "not a batch of the"),
    ([], "not a batch of the"),
    ({}, "not a batch of the"),
    ({"Records": []}, "not a batch of the"),
    ({"Records": "x"}, "not a batch of the"),
    ({"Records": ["x"]}, r"Records\[0\] is no SQS record: messageId, body, attributes missing or malformed"),
    ({"Records": [{"messageId": "m", "body": "{}"}]}, r"Records\[0\] is no SQS record: attributes missing"),
]


@pytest.mark.parametrize("handler", ["slices", "replicate", "ami_event"])
@pytest.mark.parametrize(("batch", "says"), GARBAGE_BATCHES)
def test_a_queue_fed_function_refuses_what_is_no_sqs_batch_naming_what_is_wrong(
    lambda_env: Path, handler: str, batch: object, says: str
) -> None:
    """Invoked by hand with something else, each fails with BadEvent before it reads a record (the
    batch processor raised a TypeError, AttributeError or KeyError, or failed the whole batch)."""
    from ami_janitor.handlers import replicate, slices

    write_policy(lambda_env, "enforce")
    function = {"slices": slices, "replicate": replicate, "ami_event": ami_event}[handler]
    if handler == "ami_event" and not (isinstance(batch, dict) and "Records" in batch):
        says = "not a JSON object|malformed EC2 AMI State Change event"  # one event invoked by hand
    with pytest.raises(BadEvent, match=says):
        function.handler(batch, Context())  # type: ignore[arg-type]


def test_available_event_rotates_its_group_and_a_late_old_event_does_not_move_it_back(
    lambda_env: Path,
) -> None:
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    newest, older = fleet.images[-1], fleet.images[-2]
    result = ami_event.handler(event("ami_available.json", newest), Context())
    assert result["outcome"] == "rotated"
    assert latest_holders(fleet.images) == [newest] and parameter() == newest
    # A late, duplicated event for an older AMI: nothing moves, nothing is written.
    for _ in range(2):
        late = ami_event.handler(event("ami_available.json", older), Context())
        assert late["outcome"] == "rotated" and late["rotations"] == []
    assert latest_holders(fleet.images) == [newest] and parameter() == newest


def test_a_parameter_edited_by_hand_is_written_back_alone(lambda_env: Path) -> None:
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    newest, older = fleet.images[-1], fleet.images[-2]
    ami_event.handler(event("ami_available.json", newest), Context())
    boto3.client("ssm", region_name="us-east-1").put_parameter(
        Name="/ami/web/latest", Value=older, Type="String", DataType="aws:ec2:image", Overwrite=True
    )
    again = ami_event.handler(event("ami_available.json", newest), Context())
    # The newest already carries the Latest tag: the parameter is the one write.
    assert [r["written"] for r in again["rotations"]] == [[f"/ami/web/latest = {newest}"]]
    assert latest_holders(fleet.images) == [newest] and parameter() == newest


def test_a_pointer_refused_for_good_is_counted_and_its_event_answered(
    lambda_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SecureString where the family's pointer should be: the tag moves, the parameter is left alone,
    and the event is answered (tried again it would fail alike) with the refusal, warned and counted as
    ActionsFailed, which alarms."""
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    newest = fleet.images[-1]
    ssm = boto3.client("ssm", region_name="us-east-1")
    ssm.put_parameter(Name="/ami/web/latest", Value=fleet.images[0], Type="SecureString", Overwrite=True)

    answer = ami_event.handler(event("ami_available.json", newest), Context())

    [rotation] = answer["rotations"]
    assert rotation["refused"] and rotation["status"] == "failed"
    assert "/ami/web/latest is a SecureString parameter" in rotation["error"]
    assert latest_holders(fleet.images) == [newest]
    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert any(m.get("ActionsFailed") in ([1.0], 1.0) for m in metrics), metrics


def test_disabled_and_deregistered_events_move_latest_to_the_next_newest(lambda_env: Path) -> None:
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    ami_event.handler(event("ami_available.json", fleet.images[-1]), Context())
    ec2().disable_image(ImageId=fleet.images[-1])
    disabled = ami_event.handler(event("ami_disabled.json", fleet.images[-1]), Context())
    assert latest_holders(fleet.images) == [fleet.images[-2]] and parameter() == fleet.images[-2]
    ec2().deregister_image(ImageId=fleet.images[-2])
    deregistered = ami_event.handler(event("ami_deregistered.json", fleet.images[-2]), Context())
    assert latest_holders(fleet.images[:-2] + fleet.images[-1:]) == [fleet.images[-3]]
    assert parameter() == fleet.images[-3]
    # The event names no group: every group is reconciled, and the answer says so.
    assert disabled["outcome"] == deregistered["outcome"] == "rotated"
    assert disabled["why"] == "every group reconciled: a disabled AMI may have been the Latest of any of them"
    assert deregistered["why"] == (
        f"every group reconciled: DescribeImages does not list {fleet.images[-2]} (not yet, or no longer)"
    )


def test_an_available_event_for_an_ami_not_listed_reconciles_every_group_and_says_why(
    lambda_env: Path,
) -> None:
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    unlisted = "ami-0123456789abcdef0"
    result = ami_event.handler(event("ami_available.json", unlisted), Context())
    assert result["outcome"] == "rotated"
    assert (
        result["why"]
        == f"every group reconciled: DescribeImages does not list {unlisted} (not yet, or no longer)"
    )
    assert latest_holders(fleet.images) == [fleet.images[-1]] and parameter() == fleet.images[-1]
    # An event for a listed AMI names its group: no reason to give.
    assert "why" not in ami_event.handler(event("ami_available.json", fleet.images[-1]), Context())


def test_the_janitors_own_retirements_events_read_one_ledger_item_and_a_current_latest_one_read(
    lambda_env: Path,
) -> None:
    """The janitor moved Latest away before its stages: their events ask the ledger, the AMI by its id
    and the Latest parameters alone, not the region. Any other event reads the region once when nothing
    needs writing (the rotation's first round is that read)."""
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    make_ledger()
    scheduled.handler(event("scheduled.json"), Context())  # every stage is due at once: it retires
    retired = [i for i in fleet.images if i not in image_ids()]
    assert retired
    policy = load_policy(str(lambda_env))
    clients = ClientFactory()("us-east-1")
    calls = count_calls(clients.ec2, clients.dynamodb, clients.ssm)

    for state, stage in (("disabled", "disable"), ("deregistered", "deregister")):
        outcome = rotator.handle_state_change(retired[0], state, clients, policy, now())
        assert outcome.outcome == "ignored" and outcome.why is not None
        assert outcome.why.startswith(f"the janitor's own {stage} stage")
    assert calls == {"dynamodb:BatchGetItem": 2, "ec2:DescribeImages": 2, "ssm:GetParameters": 2}

    calls.clear()
    outcome = rotator.handle_state_change(fleet.images[-1], "available", clients, policy, now())
    assert outcome.outcome == "rotated" and outcome.rotations == []
    assert calls["ec2:DescribeImages"] == 1


def disabled_by_the_janitor(lambda_env: Path, at: datetime) -> tuple[Fleet, Ledger]:
    """The fleet with its newest AMI Latest, and the ledger recording the janitor's disable stage of it
    `at` (its clock open); the AMI itself not disabled yet."""
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    make_ledger()
    newest = fleet.images[-1]
    ami_event.handler(event("ami_available.json", newest), Context())
    book = Ledger(ClientFactory()("us-east-1"), DEFAULT_LEDGER_TABLE)
    book.record_candidate(newest, at - timedelta(days=1))
    for stage in ("deprecate", "disable"):
        assert book.record_stage(newest, stage, at, Prior()) == "recorded"
        book.confirm_stage(newest, stage, at)
    return fleet, book


def test_a_hand_disable_of_an_ami_the_janitor_once_rescued_moves_latest(lambda_env: Path) -> None:
    """A rescue closed the item and kept its history: the stage recorded there is no longer the
    janitor's doing now, so the event rotates."""
    fleet, book = disabled_by_the_janitor(lambda_env, now())
    newest = fleet.images[-1]
    book.close(newest, now(), "disable")
    assert "disable" in book.read_items([newest])[newest].stages  # its history stays

    ec2().disable_image(ImageId=newest)
    outcome = ami_event.handler(event("ami_disabled.json", newest), Context())

    assert outcome["outcome"] == "rotated" and parameter() == fleet.images[-2]


def test_a_disable_long_after_the_janitors_own_is_someone_elses_and_moves_latest(lambda_env: Path) -> None:
    """The ledger records the janitor's disable stage of an AMI two days ago, its clock still open. Its
    own event, sent then, when Latest had been moved off the AMI, is ignored. The owner enabled the AMI
    since (Latest came back to it), and disables it now: that event is no echo of the janitor's stage,
    and Latest moves off the AMI."""
    then = now() - timedelta(days=2)
    fleet, _ = disabled_by_the_janitor(lambda_env, then)
    newest, older = fleet.images[-1], fleet.images[-2]
    ec2().disable_image(ImageId=newest)
    _latest_moved_to(older, off=newest)  # as the janitor moves it before its stages

    echo = {**event("ami_disabled.json", newest), "time": (then + timedelta(minutes=1)).strftime(TIME)}
    assert ami_event.handler(echo, Context())["outcome"] == "ignored"
    ec2().enable_image(ImageId=newest)
    assert ami_event.handler(event("ami_available.json", newest), Context())["outcome"] == "rotated"
    assert parameter() == newest
    ec2().disable_image(ImageId=newest)
    later = {**event("ami_disabled.json", newest), "time": now().strftime(TIME)}
    outcome = ami_event.handler(later, Context())
    assert outcome["outcome"] == "rotated" and parameter() == older


def _latest_moved_to(image_id: str, *, off: str) -> None:
    ec2().delete_tags(Resources=[off], Tags=[{"Key": "Latest"}])
    ec2().create_tags(Resources=[image_id], Tags=[{"Key": "Latest", "Value": "true"}])
    boto3.client("ssm", region_name="us-east-1").put_parameter(
        Name="/ami/web/latest", Value=image_id, Type="String", DataType="aws:ec2:image", Overwrite=True
    )


@pytest.mark.parametrize("holds", ["tag and parameter", "parameter", "tag"])
def test_the_janitors_own_disable_of_an_ami_an_event_made_latest_since_moves_latest(
    lambda_env: Path, holds: str
) -> None:
    """The run moved Latest off an AMI and planned to disable it; meanwhile the owner pulled the newer
    build and its event made this AMI Latest again; the run's slice then disabled it (the ledger records
    the janitor's stage a moment ago). Its event is no mere echo: Latest, tag or parameter, does not stay
    on a disabled AMI that launch templates resolving the parameter cannot launch (it was ignored)."""
    fleet, _ = disabled_by_the_janitor(lambda_env, now())
    newest, older = fleet.images[-1], fleet.images[-2]
    assert parameter() == newest and latest_holders(fleet.images) == [newest]
    if holds == "parameter":
        ec2().delete_tags(Resources=[newest], Tags=[{"Key": "Latest"}])
    if holds == "tag":
        boto3.client("ssm", region_name="us-east-1").put_parameter(
            Name="/ami/web/latest", Value=older, Type="String", DataType="aws:ec2:image", Overwrite=True
        )
    ec2().disable_image(ImageId=newest)

    outcome = ami_event.handler(event("ami_disabled.json", newest), Context())

    assert outcome["outcome"] == "rotated"
    assert parameter() == older and latest_holders(fleet.images) == [older]


def test_an_enforce_run_without_a_ledger_is_refused_before_it_writes(lambda_env: Path) -> None:
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    with pytest.raises(LedgerMissing, match="ami-janitor ledger create"):
        scheduled.handler(event("scheduled.json"), Context())
    assert image_ids() >= set(fleet.images)
    assert "Latest" not in {
        t["Key"] for t in ec2().describe_images(ImageIds=[fleet.images[-1]])["Images"][0].get("Tags", [])
    }


def test_a_stale_latest_is_repaired_by_reconcile(lambda_env: Path) -> None:
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    make_ledger()
    # A lost event and a hand edit: the tag sits on an old AMI and the parameter names another.
    ec2().create_tags(Resources=[fleet.images[1]], Tags=[{"Key": "Latest", "Value": "true"}])
    boto3.client("ssm", region_name="us-east-1").put_parameter(
        Name="/ami/web/latest", Value=fleet.images[2], Type="String", DataType="aws:ec2:image"
    )
    scheduled.handler(event("scheduled.json"), Context())
    assert latest_holders(fleet.images) == [fleet.images[-1]] and parameter() == fleet.images[-1]


def test_an_event_whose_group_the_policy_leaves_unrotated_says_why(lambda_env: Path) -> None:
    """One parameter for a family of two architectures is a policy error: the event writes nothing
    and its answer says so, rather than answering as if the pointer were current."""
    fleet = seed_fleet(now())
    arm = ec2().register_image(Name="web-arm", RootDeviceName="/dev/xvda")["ImageId"]
    ec2().create_tags(Resources=[arm], Tags=[{"Key": "Project", "Value": "Web"}])
    emulator.set_image_fields("us-east-1", arm, architecture="arm64")
    for mode in ("dry-run", "enforce"):
        write_policy(lambda_env, mode)
        result = ami_event.handler(event("ami_available.json", fleet.images[-1]), Context())
        assert result["outcome"] in ("dry-run", "rotated")
        assert result.get("would", result.get("rotations")) == []
        [why] = result["not_rotated"]
        assert "latest.ssm_parameter /ami/web/latest must contain {arch}" in why
    assert latest_holders([*fleet.images, arm]) == []


def test_a_rotation_that_fails_after_moving_the_tag_says_what_it_wrote_and_the_next_event_converges(
    lambda_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    newest, older = fleet.images[-1], fleet.images[-2]
    ami_event.handler(event("ami_available.json", older), Context())
    ec2().delete_tags(Resources=[newest], Tags=[{"Key": "Latest"}])
    ec2().create_tags(Resources=[older], Tags=[{"Key": "Latest", "Value": "true"}])
    boto3.client("ssm", region_name="us-east-1").put_parameter(
        Name="/ami/web/latest", Value=older, Type="String", DataType="aws:ec2:image", Overwrite=True
    )
    with monkeypatch.context() as patched:
        deny(patched, "PutParameter")
        with pytest.raises(RuntimeError) as failure:
            ami_event.handler(event("ami_available.json", newest), Context())
    message = str(failure.value)
    assert f"web (x86_64) in us-east-1 to {newest}: ClientError" in message and "AccessDenied" in message
    assert f"written before it: tag Latest=true on {newest}, untag Latest from {older})" in message
    assert latest_holders(fleet.images) == [newest] and parameter() == older

    again = ami_event.handler(event("ami_available.json", older), Context())
    assert again["rotations"][0]["written"][-1] == f"/ami/web/latest = {newest}"
    assert parameter() == newest


def test_failed_event_is_counted_and_an_ami_of_no_family_is_ignored(
    lambda_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_policy(lambda_env, "enforce")
    seed_fleet(now())
    result = ami_event.handler(event("ami_failed.json"), Context())
    assert result["outcome"] == "failed-counted"
    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert any(m.get("AmiFailedEvents") == [1.0] or m.get("AmiFailedEvents") == 1.0 for m in metrics)
    base = next(i["ImageId"] for i in ec2().describe_images(Owners=["self"])["Images"] if i["Name"] == "base")
    assert ami_event.handler(event("ami_no_family.json", base), Context())["outcome"] == "ignored"


def test_dry_run_event_logs_what_it_would_do(lambda_env: Path) -> None:
    write_policy(lambda_env, "dry-run")
    fleet = seed_fleet(now())
    result = ami_event.handler(event("ami_available.json", fleet.images[-1]), Context())
    assert result["outcome"] == "dry-run"
    assert result["would"][0]["to"] == fleet.images[-1]
    assert latest_holders(fleet.images) == []


def test_malformed_event_fails_naming_the_field(lambda_env: Path) -> None:
    write_policy(lambda_env, "enforce")
    with pytest.raises(BadEvent, match=r"detail\.State"):
        ami_event.handler(event("ami_malformed.json"), Context())
    with pytest.raises(BadEvent, match="not a JSON object"):
        ami_event.handler([], Context())  # type: ignore[arg-type]


def test_an_event_whose_time_has_no_zone_is_refused_naming_the_field(lambda_env: Path) -> None:
    """EventBridge's time always ends in Z. One without a zone, invoked by hand, is refused naming it:
    the rotation compares it with the clock (an AMI named as its family names them, its tags not yet
    there, waits for them until five minutes after the event), where it raised a TypeError."""
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    client = ec2()
    builder = client.run_instances(ImageId=fleet.images[0], MinCount=1, MaxCount=1)["Instances"][0]
    untagged = client.create_image(InstanceId=builder["InstanceId"], Name="web-packer")["ImageId"]
    naive = {**event("ami_available.json", untagged), "time": now().strftime("%Y-%m-%dT%H:%M:%S")}
    with pytest.raises(BadEvent, match=r"malformed EC2 AMI State Change event: time"):
        ami_event.handler(naive, Context())


@pytest.fixture
def events_queue(lambda_env: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The region's AMI event queue (FIFO, as the stack makes it), named to the function."""
    sqs = boto3.client("sqs", region_name="us-east-1")
    url = sqs.create_queue(
        QueueName="AmiJanitor-us-east-1-ami-events.fifo",
        Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "true", "VisibilityTimeout": "1800"},
    )["QueueUrl"]
    monkeypatch.setenv("AMI_EVENTS_QUEUE_URL", url)
    return url


def delivered(queue_url: str, *events: dict[str, Any]) -> dict[str, Any]:
    """The events sent by the rule (one message group), received as the event source mapping receives
    them, as the function's event."""
    sqs = boto3.client("sqs", region_name="us-east-1")
    for e in events:
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(e), MessageGroupId="ami-state-changes")
    return received(queue_url)


def received(queue_url: str) -> dict[str, Any]:
    sqs = boto3.client("sqs", region_name="us-east-1")
    answer = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, AttributeNames=["All"])
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
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
                "eventSourceARN": arn,
                "awsRegion": "us-east-1",
            }
            for m in answer.get("Messages", [])
        ]
    }


def seconds_until_visible(queue_url: str, message_id: str) -> float:
    """When the emulator makes the message visible again (no API tells it)."""
    queue = sqs_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].queues[queue_url.rsplit("/", 1)[1]]
    [message] = [m for m in queue._messages if m.id == message_id]  # (`messages`: the visible ones)
    return (message.visible_at - unix_time_millis()) / 1000


def recorder(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The AMIs whose events the handler handles, in order."""
    handled: list[str] = []
    handle = ami_event.handle_state_change

    def recorded(ami: ami_event.AmiStateChangeEvent, *args: Any) -> dict[str, Any]:
        handled.append(ami.detail.ImageId)
        return handle(ami, *args)

    monkeypatch.setattr(ami_event, "handle_state_change", recorded)
    return handled


def ids(batch: dict[str, Any]) -> list[str]:
    return [r["messageId"] for r in batch["Records"]]


def failures(*message_ids: str) -> dict[str, Any]:
    return {"batchItemFailures": [{"itemIdentifier": m} for m in message_ids]}


def test_queued_events_are_each_handled_in_order(
    events_queue: str, lambda_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    newest, older = fleet.images[-1], fleet.images[-2]
    handled = recorder(monkeypatch)
    batch = delivered(events_queue, event("ami_available.json", older), event("ami_available.json", newest))
    assert ami_event.handler(batch, Context()) == failures()
    assert handled == [older, newest]
    assert latest_holders(fleet.images) == [newest] and parameter() == newest


def test_queued_events_left_without_time_come_again_at_once(
    events_queue: str, lambda_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    newest, older = fleet.images[-1], fleet.images[-2]
    handled = recorder(monkeypatch)

    class Running(Context):
        """An invocation with time for its first event only."""

        def get_remaining_time_in_millis(self) -> int:
            self.remaining_millis -= 250_000
            return self.remaining_millis + 250_000

    batch = delivered(events_queue, event("ami_available.json", older), event("ami_available.json", newest))
    assert ami_event.handler(batch, Running(remaining_millis=300_000)) == failures(ids(batch)[1])
    assert handled == [older]
    # Lambda deletes the record handled; the one left is visible again at once (not in half an hour).
    boto3.client("sqs", region_name="us-east-1").delete_message(
        QueueUrl=events_queue, ReceiptHandle=batch["Records"][0]["receiptHandle"]
    )
    again = received(events_queue)
    assert ids(again) == ids(batch)[1:]
    assert ami_event.handler(again, Running(remaining_millis=300_000)) == failures()
    assert handled == [older, newest]


def test_a_queued_event_that_fails_is_logged_tried_again_soon_and_holds_back_no_other(
    events_queue: str,
    lambda_env: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    newest, older = fleet.images[-1], fleet.images[-2]
    handled = recorder(monkeypatch)
    logged: list[tuple[str, dict[str, Any], str]] = []

    def exception(message: str, *, extra: dict[str, Any]) -> None:
        logged.append((message, extra, str(sys.exc_info()[1])))

    monkeypatch.setattr(ami_event.logger, "exception", exception)
    batch = delivered(
        events_queue,
        event("ami_available.json", older),
        event("ami_malformed.json"),
        event("ami_available.json", newest),
    )
    answer = ami_event.handler(batch, Context())
    # Only the malformed event comes again; those before and after it are handled.
    assert answer == failures(ids(batch)[1])
    assert handled == [older, newest] and latest_holders(fleet.images) == [newest]
    [(message, extra, error)] = logged
    assert message == "AMI event failed" and extra == {"message_id": ids(batch)[1], "receive_count": "1"}
    assert "detail.State: Field required" in error
    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert any(m.get("AmiEventsFailed") in ([1.0], 1.0) for m in metrics)
    # It is tried again after a minute (times its deliveries), not after the queue's half hour: the
    # one message group is held that long only.
    sqs = boto3.client("sqs", region_name="us-east-1")
    for record in (batch["Records"][0], batch["Records"][2]):
        sqs.delete_message(QueueUrl=events_queue, ReceiptHandle=record["receiptHandle"])
    assert 50 < seconds_until_visible(events_queue, ids(batch)[1]) <= ami_event.RETRY_AFTER_SECONDS
    # Until then the region's one message group waits: a later event is not handed out.
    later = boto3.client("sqs", region_name="us-east-1")
    later.send_message(
        QueueUrl=events_queue,
        MessageBody=json.dumps(event("ami_available.json", older)),
        MessageGroupId="ami-state-changes",
    )
    assert received(events_queue) == {"Records": []}


def test_a_queued_event_of_an_ami_not_tagged_yet_is_tried_again_without_counting_a_failure(
    events_queue: str,
    lambda_env: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Packer tags an AMI once it is available: its event, just sent, finds the AMI named as family web
    names its AMIs but without the family's tag. It comes again in a minute (no failure counted, nothing
    logged as one), and rotates once the tag is there."""
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    client = ec2()
    builder = client.run_instances(ImageId=fleet.images[0], MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    packed = client.create_image(InstanceId=builder, Name="web-packer")["ImageId"]
    just_sent = {**event("ami_available.json", packed), "time": now().strftime(TIME)}
    monkeypatch.setattr(ami_event.logger, "exception", lambda *_, **__: pytest.fail("logged as a failure"))

    batch = delivered(events_queue, just_sent)
    assert ami_event.handler(batch, Context()) == failures(ids(batch)[0])
    assert "AmiEventsFailed" not in capsys.readouterr().out
    assert 50 < seconds_until_visible(events_queue, ids(batch)[0]) <= ami_event.RETRY_AFTER_SECONDS
    assert packed not in latest_holders([*fleet.images, packed])

    client.create_tags(Resources=[packed], Tags=[{"Key": "Project", "Value": "Web"}])
    assert ami_event.handler(batch, Context()) == failures()  # delivered again
    assert latest_holders([*fleet.images, packed]) == [packed] and parameter() == packed


def test_a_batch_whose_every_event_fails_does_not_fail_the_invocation(
    events_queue: str, lambda_env: Path
) -> None:
    # Its records' visibility is set all the same: a failed invocation would leave them to the queue's
    # visibility timeout (half an hour, the region's events held back behind them).
    write_policy(lambda_env, "enforce")
    alone = delivered(events_queue, event("ami_malformed.json"))
    assert ami_event.handler(alone, Context()) == failures(*ids(alone))
    assert 50 < seconds_until_visible(events_queue, ids(alone)[0]) <= ami_event.RETRY_AFTER_SECONDS


def test_an_event_of_another_region_is_refused_and_changes_nothing_there(lambda_env: Path) -> None:
    write_policy(lambda_env, "enforce")
    seed_fleet(now())
    west = boto3.client("ec2", region_name="eu-west-1")
    image_id = west.register_image(Name="web-west", RootDeviceName="/dev/xvda")["ImageId"]
    west.create_tags(Resources=[image_id], Tags=[{"Key": "Project", "Value": "Web"}])
    other = {**event("ami_available.json", image_id), "region": "eu-west-1"}

    with pytest.raises(BadEvent, match="the event is of region eu-west-1; this function handles us-east-1"):
        ami_event.handler(other, Context())
    assert boto3.client("ssm", region_name="eu-west-1").describe_parameters()["Parameters"] == []


def test_an_older_ami_becoming_available_later_does_not_take_latest(lambda_env: Path) -> None:
    write_policy(lambda_env, "enforce")
    fleet = seed_fleet(now())
    ami_event.handler(event("ami_available.json", fleet.images[-1]), Context())
    # Re-enabling an old disabled AMI emits "available" for it: Latest stays on the newest.
    ec2().disable_image(ImageId=fleet.images[0])
    ec2().enable_image(ImageId=fleet.images[0])
    ami_event.handler(event("ami_available.json", fleet.images[0]), Context())
    assert latest_holders(fleet.images) == [fleet.images[-1]]


def test_the_scheduled_run_sends_the_accounts_usage_report_unless_paused(lambda_env: Path) -> None:
    """Dry-run or enforce, the scheduled run reports the other accounts' AMIs it uses to the inbox (the
    owners' plans depend on it); paused, it writes nothing, that report included."""
    base = ec2().register_image(Name="golden", RootDeviceName="/dev/xvda")["ImageId"]
    ec2().run_instances(ImageId="ami-0123456789abcdef0", MinCount=1, MaxCount=1)
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="usage-inbox")
    key = "reports/123456789012/us-east-1.json"

    def with_inbox(mode: str) -> None:
        data = yaml.safe_load(POLICY.format(mode=mode))
        lambda_env.write_text(json.dumps({**data, "usage_reports": {"inbox": "s3://usage-inbox"}}))

    with_inbox("paused")
    assert scheduled.handler(event("scheduled.json"), Context()) == {"mode": "paused"}
    objects = boto3.client("s3", region_name="us-east-1").list_objects_v2(Bucket="usage-inbox")
    assert objects.get("KeyCount") == 0

    with_inbox("dry-run")
    scheduled.handler(event("scheduled.json"), Context())
    body = (
        boto3.client("s3", region_name="us-east-1").get_object(Bucket="usage-inbox", Key=key)["Body"].read()
    )
    report = json.loads(body)
    # The instance's AMI is another account's; the account's own AMI is not reported.
    assert list(report["uses"]) == ["ami-0123456789abcdef0"] and base not in report["uses"]


def mail_queue(monkeypatch: pytest.MonkeyPatch) -> str:
    """The alert topic, with a queue subscribed to it (its URL) that receives the summary mails."""
    sns = boto3.client("sns", region_name="us-east-1")
    sqs = boto3.client("sqs", region_name="us-east-1")
    topic = sns.create_topic(Name="janitor")["TopicArn"]
    mail = sqs.create_queue(QueueName="mail")["QueueUrl"]
    mail_arn = sqs.get_queue_attributes(QueueUrl=mail, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=mail_arn)
    monkeypatch.setenv("TOPIC_ARN", topic)
    return str(mail)


def mails(queue: str) -> list[str]:
    """The summary mails `queue` (mail_queue) received."""
    answer = boto3.client("sqs", region_name="us-east-1").receive_message(
        QueueUrl=queue, MaxNumberOfMessages=10
    )
    return [json.loads(m["Body"])["Message"] for m in answer.get("Messages", [])]


def test_the_summary_mail_names_a_few_of_each_list_however_large_the_fleet(
    lambda_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each AMI two families match is a policy error of its own: a fleet with thousands of them (and
    long lines) must still get its summary. SNS refuses a message over 256 KiB, which failed the run
    after its report was written, and every retry of it."""
    write_policy(lambda_env, "enforce")
    mail = mail_queue(monkeypatch)
    conflicts = [f"ami-{n:017x} matches several families (web, web-tagged): kept" for n in range(4000)]
    tampered = [
        Tampered(
            region="us-east-1",
            image_id=f"ami-{n:017x}",
            tag="ami-janitor:shared",
            value="x" * 300,
            ledger=None,
        )
        for n in range(4000)
    ]
    plan = Plan(
        mode="enforce",
        generated_at="2026-11-25T03:00:00Z",
        regions=[RegionStatus(region="us-east-1", status="ok")],
        decisions=[],
        summary=Summary(images=4000, kept=4000),
        policy_errors=[*conflicts, "a policy error of one very long line " + "y" * 300_000],
        tampered=tampered,
    )
    unfinished = [f"us-east-1: run 2026-11-{n % 28 + 1:02d}T03:00:00Z: never finished" for n in range(500)]
    monkeypatch.setattr(
        engine,
        "run",
        lambda *args, **kwargs: engine.RunResult(
            plan=plan, usage_problems=conflicts, unfinished_runs=unfinished
        ),
    )

    assert scheduled.handler(event("scheduled.json"), Context())["mode"] == "enforce"

    [text] = mails(mail)
    lines = text.splitlines()
    assert len(text.encode()) < 64 * 1024
    assert [line for line in lines if line.startswith("policy error: ami-")] == [
        f"policy error: {c}" for c in conflicts[:20]
    ]
    assert "policy error: 3981 more in the report" in lines
    assert "usage report problem: 3980 more in the report" in lines
    assert "unfinished run: 480 more in the report" in lines
    assert "tampered: 3980 more in the report" in lines
    assert sum(line.startswith("tampered: us-east-1 ami-") for line in lines) == 20
    assert max(len(line) for line in lines) <= 1000


def test_unfinished_runs_the_mail_alone_names_are_marked_reported_and_the_rest_left_for_later(
    lambda_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a report bucket the mail is the only report: it names 20 unfinished runs, and the runs
    past them, named nowhere, are left unmarked for a later run's mail (with a bucket, the report
    names them all)."""
    write_policy(lambda_env, "enforce")
    mail = mail_queue(monkeypatch)
    monkeypatch.delenv("REPORT_BUCKET", raising=False)
    runs = [f"2026-11-{n + 1:02d}T03:00:00Z" for n in range(25)]
    plan = Plan(
        mode="enforce",
        generated_at="2026-11-30T03:00:00Z",
        regions=[RegionStatus(region="us-east-1", status="ok")],
        decisions=[],
    )
    result = engine.RunResult(
        plan=plan,
        unfinished_runs=[f"us-east-1: run {run}: 1 of its 2 slices never finished" for run in runs],
        unfinished_keys=[("us-east-1", run) for run in runs],
    )
    monkeypatch.setattr(engine, "run", lambda *args, **kwargs: result)
    marked: list[tuple[str, str]] = []
    monkeypatch.setattr(
        engine, "mark_unfinished_reported", lambda policy, result, *_: marked.extend(result.unfinished_keys)
    )

    scheduled.handler(event("scheduled.json"), Context())

    [text] = mails(mail)
    assert marked == [("us-east-1", run) for run in runs[:20]]
    assert all(f"run {run}:" in text for run in runs[:20]) and "unfinished run: 5 more" in text

    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="reports")
    monkeypatch.setenv("REPORT_BUCKET", "reports")
    marked.clear()
    scheduled.handler(event("scheduled.json"), Context())
    assert marked == [("us-east-1", run) for run in runs]
