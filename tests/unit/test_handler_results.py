"""Each handler answers with the JSON of its result model (the engine stubbed, no AWS): the answer
validates against the model and is exactly what the model dumps."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from ami_janitor import engine
from ami_janitor.aws import copier
from ami_janitor.aws.executor import ActionResult
from ami_janitor.aws.rotator import AmiEventOutcome, RotationResult
from ami_janitor.aws.sharer import ShareResult
from ami_janitor.core.model import Copy, LatestChange, Plan, RegionStatus, Summary, Tampered
from ami_janitor.core.policy import Family, Policy
from ami_janitor.core.replication import CopyResult, RefusedCopy
from ami_janitor.handlers import ami_event, bake, replicate, scheduled
from ami_janitor.handlers.events import ScheduledRunResult
from lambda_events import Context, sqs_record

EVENTS = Path(__file__).resolve().parents[1] / "events"
REGION = "us-east-1"
NOW = "2026-11-25T03:00:00Z"
POLICY: dict[str, Any] = {
    "regions": [REGION],
    "families": [
        {
            "name": "web",
            "match": {"name": "web-*"},
            "latest": {"tag": "Latest"},
            "bake": {"instance_tag": {"Role": "web"}},
            "replicate": [{"region": "eu-west-1"}],
        }
    ],
}


@pytest.fixture
def mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set the deployed environment; call with a mode to write the policy in that mode."""
    for name in ("REPORT_BUCKET", "TOPIC_ARN", "REPLICATION_QUEUE_URL", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    path = tmp_path / "policy.json"
    monkeypatch.setenv("AMI_JANITOR_CONFIG", str(path))

    def write(value: str) -> None:
        path.write_text(json.dumps({**POLICY, "mode": value}))

    return write


def assert_answers_with(model: type[BaseModel], answer: dict[str, Any]) -> None:
    assert model.model_validate(answer).model_dump(mode="json") == answer
    json.dumps(answer)  # plain JSON, as Lambda returns it


def ami_event_json(state: str = "available") -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / "ami_available.json").read_text())
    event["detail"]["State"] = state
    return event


def test_the_scheduled_run_answers_with_its_result(mode: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = Plan(
        mode="enforce",
        generated_at=NOW,
        regions=[RegionStatus(region=REGION, status="ok")],
        decisions=[],
        latest=[LatestChange(region=REGION, family="web", architecture="x86_64", from_="ami-1", to="ami-2")],
        summary=Summary(images=4, retired=1, snapshots_deleted=1),
    )
    result = engine.RunResult(
        plan=plan,
        results=[
            ActionResult(
                region=REGION,
                image_id="ami-0",
                action="deregister",
                status="ok",
                snapshots_deleted=["s-1", "s-2"],
            )
        ],
        rotations=[
            RotationResult(region=REGION, family="web", architecture="x86_64", to="ami-2", written=[])
        ],
    )
    monkeypatch.setattr(engine, "run", lambda *args, **kwargs: result)
    mode("enforce")
    answer = scheduled.handler(json.loads((EVENTS / "scheduled.json").read_text()), Context())
    assert_answers_with(ScheduledRunResult, answer)
    assert answer["summary"]["snapshots_deleted"] == 2 and answer["summary"]["actions_failed"] == 0
    # The report is the plan's JSON (a Latest change's `from`), its summary completed, then what applying did.
    report = result.report().model_dump(mode="json")
    planned = plan.to_dict()
    extra = [
        "results",
        "rotations",
        "share_results",
        "copy_results",
        "copies_queued",
        "copies_not_queued",
        "slices_queued",
        "usage_reports",
        "usage_problems",
        "unfinished_runs",
    ]
    assert list(report) == [*planned, *extra]
    assert {key: report[key] for key in planned if key != "summary"} == {
        key: value for key, value in planned.items() if key != "summary"
    }
    assert report["summary"] == {
        **planned["summary"],
        "snapshots_deleted": 2,
        "actions_failed": 0,
        "held_back": 0,
        "not_run": 0,
    }
    assert report["latest"][0]["from"] == "ami-1"
    mode("paused")
    answer = scheduled.handler({}, Context())
    assert answer == {"mode": "paused"}
    assert_answers_with(ScheduledRunResult, answer)


def test_the_scheduled_run_makes_the_queue_client_only_to_queue_a_copy(
    mode: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []
    queued: list[tuple[str, str, list[Copy]]] = []

    class Clients:
        @property
        def sqs(self) -> str:
            made.append("sqs")
            return "the queue's client"

    def enqueue_copies(client: str, url: str, copies: list[Copy]) -> int:
        queued.append((client, url, list(copies)))
        return len(copies)

    copy = Copy(family="web", source_image_id="ami-1", source_region=REGION, region="eu-west-1")
    answers: list[int] = []

    def run(*args: Any, enqueue: engine.Enqueue, **kwargs: Any) -> engine.RunResult:
        answers.append(enqueue([]))
        assert made == []  # no copy, no client
        answers.append(enqueue([copy]))
        return engine.RunResult(plan=Plan(mode="enforce", generated_at=NOW, regions=[], decisions=[]))

    monkeypatch.setattr(engine, "run", run)
    monkeypatch.setattr(scheduled, "ClientFactory", lambda *_: lambda region: Clients())
    monkeypatch.setattr(copier, "enqueue_copies", enqueue_copies)
    monkeypatch.setenv("REPLICATION_QUEUE_URL", "https://sqs.us-east-1.amazonaws.com/123456789012/copies")
    mode("enforce")

    scheduled.handler(json.loads((EVENTS / "scheduled.json").read_text()), Context())

    assert answers == [0, 1] and made == ["sqs"]
    assert queued == [
        ("the queue's client", "https://sqs.us-east-1.amazonaws.com/123456789012/copies", [copy])
    ]


def test_the_scheduled_run_counts_tampered_tags(
    mode: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tampered = [
        Tampered(
            region=REGION,
            image_id="ami-1",
            tag="ami-janitor:candidate-since",
            value="2020-01-01T00:00:00Z",
            ledger=None,
        ),
        Tampered(
            region=REGION,
            image_id="ami-2",
            tag="ami-janitor:shared",
            value="111122223333",
            ledger="210987654321",
        ),
    ]
    plan = Plan(
        mode="enforce",
        generated_at=NOW,
        regions=[RegionStatus(region=REGION, status="ok")],
        decisions=[],
        tampered=tampered,
    )
    monkeypatch.setattr(engine, "run", lambda *args, **kwargs: engine.RunResult(plan=plan))
    mode("enforce")
    capsys.readouterr()

    answer = scheduled.handler(json.loads((EVENTS / "scheduled.json").read_text()), Context())

    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert [m["TamperedTags"] for m in metrics if "TamperedTags" in m] in ([2.0], [[2.0]])
    assert answer["summary"]["tampered"] == 2
    report = engine.RunResult(plan=plan).report()
    assert [t.model_dump() for t in report.tampered] == [t.model_dump() for t in tampered]
    text = scheduled.summary_text(REGION, report)
    assert "janitor tags that disagree with the ledger (reported, not obeyed): 2" in text
    assert "tampered: us-east-1 ami-2 ami-janitor:shared='111122223333', ledger: '210987654321'" in text


@pytest.mark.parametrize(
    "outcome",
    [
        {"outcome": "paused"},
        {"outcome": "ignored", "why": "the AMI belongs to no family"},
        {
            "outcome": "dry-run",
            "would": [
                LatestChange(region=REGION, family="web", architecture="x86_64", from_=None, to="ami-2")
            ],
            "would_share": None,
            "would_copy": 1,
        },
        {
            "outcome": "rotated",
            "rotations": [
                RotationResult(region=REGION, family="web", architecture="x86_64", to="ami-2", written=[])
            ],
            "shared": [],
            "copies_queued": 1,
        },
    ],
)
def test_the_ami_event_answers_with_its_outcome(
    mode: Any, monkeypatch: pytest.MonkeyPatch, outcome: dict[str, Any]
) -> None:
    def handle(image_id: str, state: Any, clients: Any, policy: Policy, *args: Any, **kwargs: Any) -> Any:
        return AmiEventOutcome(
            image_id=image_id, state=state, region=clients.region, mode=policy.mode, **outcome
        )

    monkeypatch.setattr(engine, "handle_ami_event", handle)
    mode("dry-run")
    answer = ami_event.handler(ami_event_json(), Context())
    assert_answers_with(AmiEventOutcome, answer)
    assert set(answer) == {"image_id", "state", "region", "mode", *outcome}
    if "would" in outcome:
        assert answer["would"][0]["from"] is None and answer["would_share"] is None


def answer_with(monkeypatch: pytest.MonkeyPatch, **fields: Any) -> None:
    """engine.handle_ami_event answers with an outcome of these fields, whatever the event."""

    def handle(image_id: str, state: Any, clients: Any, policy: Policy, *args: Any, **kwargs: Any) -> Any:
        return AmiEventOutcome(
            image_id=image_id, state=state, region=clients.region, mode=policy.mode, **fields
        )

    monkeypatch.setattr(engine, "handle_ami_event", handle)


@pytest.mark.parametrize(
    ("outcome", "why"),
    [
        (
            {
                "shared": [
                    ShareResult(
                        region=REGION,
                        image_id="ami-2",
                        status="failed",
                        error="Throttling: slow",
                        passing=True,
                    )
                ]
            },
            "sharing failed: Throttling: slow",
        ),
        ({"shared": [], "copies_queued": 1, "copies_not_queued": 2}, "2 of its copies not queued"),
    ],
)
def test_the_ami_event_fails_when_a_new_sources_share_or_copies_are_left_undone(
    mode: Any, monkeypatch: pytest.MonkeyPatch, outcome: dict[str, Any], why: str
) -> None:
    """Logged, then raised: Lambda tries the event again, then its failed-invocations queue alarms."""

    answer_with(monkeypatch, outcome="rotated", **outcome)
    mode("enforce")
    event = ami_event_json()
    with pytest.raises(RuntimeError) as raised:
        ami_event.handler(event, Context())
    assert str(raised.value) == f"AMI {event['detail']['ImageId']}: {why}"


def test_the_ami_event_answers_when_a_share_is_refused_for_good(
    mode: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ledger table, or image block public access refusing the public group: a retry fails the same
    way, so the invocation answers (the failed share is in the answer and its log)."""
    refused = ShareResult(
        region=REGION, image_id="ami-2", status="failed", error="no ledger table in us-east-1"
    )

    answer_with(monkeypatch, outcome="rotated", shared=[refused])
    mode("enforce")
    answer = ami_event.handler(ami_event_json(), Context())
    assert answer["shared"][0]["status"] == "failed" and answer["shared"][0]["passing"] is False


@pytest.mark.parametrize("policy_mode", ["paused", "dry-run", "enforce"])
def test_the_bake_answers_with_its_outcome(
    mode: Any, monkeypatch: pytest.MonkeyPatch, policy_mode: str
) -> None:
    def scheduled_bake(policy: Policy, family: Family, clients: Any, now: Any) -> engine.BakeOutcome:
        if policy.mode == "dry-run":
            return engine.BakeOutcome(
                mode="dry-run",
                region=clients.region,
                family=family.name,
                outcome="would-bake",
                instance_id="i-0123456789abcdef0",
                name="web-20261125T030000Z",
                create_image={"Name": "web-20261125T030000Z"},
            )
        return engine.BakeOutcome(
            mode="enforce",
            region=clients.region,
            family=family.name,
            outcome="baked",
            instance_id="i-0123456789abcdef0",
            image_id="ami-0123456789abcdef0",
            name="web-20261125T030000Z",
            state="pending",
            warnings=[],
        )

    monkeypatch.setattr(engine, "scheduled_bake", scheduled_bake)
    mode(policy_mode)
    answer = bake.handler({"family": "web"}, Context())
    assert_answers_with(engine.BakeOutcome, answer)
    assert "create_image" not in answer
    if policy_mode == "paused":
        assert answer == {"mode": "paused", "family": "web"}


def record(message_id: str, body: str) -> dict[str, Any]:
    return sqs_record(
        body, message_id=message_id, queue_arn="arn:aws:sqs:us-east-1:123456789012:copies", region=REGION
    )


def test_the_replication_worker_answers_with_a_partial_batch_response(
    mode: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def start(request: Copy, policy: Policy, clients_for: Any) -> CopyResult:
        if request.generation == 2:
            raise RefusedCopy("generation 2 is above 1", request)
        return CopyResult(**request.model_dump(exclude={"kms_key_id"}), status="ok", started=True)

    monkeypatch.setattr(engine, "start_requested_copy", start)
    monkeypatch.setattr(replicate.metrics, "namespace", "AmiJanitor")
    log = io.StringIO()
    monkeypatch.setattr(replicate.logger.registered_handler, "stream", log)
    copy = Copy(
        family="web", source_image_id="ami-0123456789abcdef0", source_region=REGION, region="eu-west-1"
    )
    event = {
        "Records": [
            record("good", copy.model_dump_json()),
            record("not-json", "not json"),
            record("no-region", json.dumps(copy.model_dump(exclude={"region"}))),
            record("refused", copy.model_copy(update={"generation": 2}).model_dump_json()),
        ]
    }
    mode("enforce")
    answer = replicate.handler(event, Context())
    # Powertools' PartialItemFailureResponse (a TypedDict): the failed records' ids, nothing else.
    assert answer == {
        "batchItemFailures": [{"itemIdentifier": i} for i in ("not-json", "no-region", "refused")]
    }
    lines = [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
    refused = {
        line["message_id"]: line["reason"] for line in lines if line.get("message") == "copy request refused"
    }
    assert refused["no-region"] == "bad copy request: body.region: Field required"
    assert refused["not-json"].startswith("bad copy request: body: Invalid JSON")
    assert refused["refused"] == "generation 2 is above 1"
    counted = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert sum(sum(m.get("CopyRequestsRefused", [])) for m in counted) == 3
    mode("paused")
    assert replicate.handler(event, Context()) == {"batchItemFailures": []}
