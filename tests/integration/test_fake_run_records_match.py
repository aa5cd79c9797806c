"""The fake DynamoDB the fleet simulator runs on (fake_ec2.FakeDynamoDB) keeps a run's record as the
real table does: the same sequence of aws/runs.py's writes and reads, on both (the real table on
moto's DynamoDB), gives the same answers and leaves the same items. The fake evaluates the run
records' own update and condition expressions (tests/dynamodb_expressions.py); this checks that
evaluation against DynamoDB's, as test_fake_ledger_matches does for the AMIs' items."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ami_janitor.aws import ledger
from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.ledger import WRITE_ID_ATTRIBUTE
from ami_janitor.aws.runs import COUNTERS, RunNotStarted, RunRecords, SliceNotRecorded, event_key, run_key
from fake_ec2 import FakeEC2

TABLE = "ami-janitor-ledger"
REGION = "us-east-1"
START = datetime(2026, 11, 1, 3, tzinfo=UTC)
RUNS = ("r1", "r2")
EVENTS = ("e1", "e2")
_examples = itertools.count()

Step = Callable[[RunRecords, str], object]


def _digest(index: int) -> str:
    return f"digest-{index}"


def _start(slices: int, day: int, counted: int) -> Step:
    def step(records: RunRecords, prefix: str) -> object:
        return records.start(
            REGION,
            f"{prefix}r1",
            slices=slices,
            plan_summary={"deregister": slices * 2, "keep": 3},
            counts={"snapshots_deleted": counted},
            digests={i: _digest(i) for i in range(slices)},
            at=START + timedelta(days=day),
        )

    return step


def _on_run(run: str, act: Callable[[RunRecords, str], object]) -> Step:
    return lambda records, prefix: act(records, f"{prefix}{run}")


def _finish(index: int, counts: tuple[int, ...]) -> Callable[[RunRecords, str], object]:
    return lambda records, run: records.finish_slice(
        REGION, run, index, dict(zip(COUNTERS, counts, strict=True))
    )


def _check(index: int, same: bool) -> Callable[[RunRecords, str], object]:
    return lambda records, run: records.check_slice(REGION, run, index, _digest(index) if same else "forged")


def _claim_summary(index: int, delivery: int, day: int) -> Callable[[RunRecords, str], object]:
    return lambda records, run: records.claim_summary(
        REGION, run, START + timedelta(days=day), index=index, delivery=delivery
    )


def _confirm(day: int) -> Callable[[RunRecords, str], object]:
    return lambda records, run: records.confirm_summary(REGION, run, START + timedelta(days=day))


def _mark(day: int) -> Callable[[RunRecords, str], object]:
    return lambda records, run: records.mark_unfinished_reported(REGION, run, START + timedelta(days=day))


def _release(records: RunRecords, run: str) -> object:
    return records.release_summary(REGION, run)


def _read(records: RunRecords, run: str) -> object:
    return records.read(REGION, run)


def _claim_event(event: str, run: str, minutes: int, invocation: str | None) -> Step:
    def step(records: RunRecords, prefix: str) -> object:
        at = START + timedelta(minutes=minutes)
        return records.claim_event(REGION, f"{prefix}{event}", f"{prefix}{run}", at, invocation)

    return step


def _release_event(event: str, run: str) -> Step:
    return lambda records, prefix: records.release_event(REGION, f"{prefix}{event}", f"{prefix}{run}")


indexes = st.integers(0, 2)
days = st.integers(0, 5)
runs = st.sampled_from(("r1", "r1", "r1", "r2"))  # r2 is never started
on_a_run = st.one_of(
    st.builds(_finish, indexes, st.tuples(*(st.integers(0, 3) for _ in COUNTERS))),
    st.builds(_check, indexes, st.booleans()),
    st.builds(_claim_summary, indexes, st.integers(1, 2), days),
    st.builds(_confirm, days),
    st.builds(_mark, days),
    st.just(_release),
    st.just(_read),
)
steps = st.lists(
    st.one_of(
        st.builds(_start, st.integers(1, 3), days, st.integers(0, 2)),
        st.builds(_on_run, runs, on_a_run),
        st.builds(
            _claim_event,
            st.sampled_from(EVENTS),
            runs,
            st.sampled_from([0, 5, 14, 16, 40]),  # about SCHEDULED_RUN_TIMEOUT
            st.sampled_from([None, "inv-1", "inv-2"]),
        ),
        st.builds(_release_event, st.sampled_from(EVENTS), runs),
    ),
    min_size=1,
    max_size=14,
)


class _FakeTable:
    """The fake's DynamoDB client, on which RunRecords writes a run's record."""

    def __init__(self) -> None:
        self.db = FakeEC2(REGION).dynamodb


def _answer(step: Step, records: RunRecords, prefix: str) -> object:
    """What a call answered, comparably: a value (a run's record as its fields), or the error's kind."""
    try:
        answer = step(records, prefix)
    except (RunNotStarted, SliceNotRecorded) as refused:
        return type(refused).__name__
    return answer.model_dump() if hasattr(answer, "model_dump") else answer


def _stored(db: Any, prefix: str) -> dict[str, Any]:
    """The run and event items the example wrote, without the writes' random ids, sets in order."""
    found: dict[str, Any] = {}
    keys = [run_key(REGION, f"{prefix}{r}") for r in RUNS] + [
        event_key(REGION, f"{prefix}{e}") for e in EVENTS
    ]
    for item_key in keys:
        item = db.get_item(TableName=TABLE, Key=item_key, ConsistentRead=True).get("Item")
        if item is not None:
            found[item_key["pk"]["S"]] = {
                name: {"SS": sorted(value["SS"])} if "SS" in value else value
                for name, value in item.items()
                if name != WRITE_ID_ATTRIBUTE
            }
    return found


@pytest.fixture
def real(moto_aws: None) -> RunRecords:
    ledger.create_table(RegionClients(REGION), TABLE, ["arn:aws:iam::123456789012:role/deployer"])
    return RunRecords(boto3.client("dynamodb", region_name=REGION), TABLE)


# The edges each condition draws, always run besides the drawn sequences.
EDGES = [
    # a slice counted twice, once; one not in the record; a forged digest; a run never started
    [_start(2, 0, 1), _on_run("r1", _finish(0, (1, 0, 0, 0))), _on_run("r1", _finish(0, (1, 0, 0, 0)))],
    [_start(1, 0, 0), _on_run("r1", _check(1, True)), _on_run("r1", _check(0, False)), _on_run("r2", _read)],
    [
        _on_run("r1", _finish(0, (0, 0, 0, 0))),
        _on_run("r1", _claim_summary(0, 1, 0)),
        _on_run("r1", _mark(0)),
    ],
    # the summary claimed once; again by the same slice's later delivery only; released, claimed again
    [_start(2, 0, 0), _on_run("r1", _claim_summary(0, 1, 0)), _on_run("r1", _claim_summary(0, 1, 1))],
    [_start(2, 0, 0), _on_run("r1", _claim_summary(0, 1, 0)), _on_run("r1", _claim_summary(1, 2, 1))],
    [_start(2, 0, 0), _on_run("r1", _claim_summary(1, 1, 0)), _on_run("r1", _claim_summary(1, 2, 1))],
    [
        _start(1, 0, 0),
        _on_run("r1", _claim_summary(0, 1, 0)),
        _on_run("r1", _release),
        _on_run("r1", _claim_summary(0, 1, 1)),
    ],
    [
        _start(1, 0, 0),
        _on_run("r1", _claim_summary(0, 1, 0)),
        _on_run("r1", _confirm(0)),
        _on_run("r1", _read),
    ],
    # marked reported once; a second start of the same run
    [_start(1, 0, 0), _on_run("r1", _mark(1)), _on_run("r1", _mark(2)), _start(2, 1, 0)],
    # an event's claim: held by a younger claim of another invocation, taken over past the timeout or
    # by the same invocation's retry, kept by a run that recorded its slices, given back
    [
        _claim_event("e1", "r2", 0, "inv-1"),
        _claim_event("e1", "r1", 14, "inv-2"),
        _claim_event("e1", "r1", 16, "inv-2"),
    ],
    [_claim_event("e1", "r2", 0, "inv-1"), _claim_event("e1", "r1", 5, "inv-1")],
    [_claim_event("e1", "r1", 0, None), _start(1, 0, 0), _claim_event("e1", "r2", 40, "inv-2")],
    [
        _claim_event("e1", "r1", 0, "inv-1"),
        _release_event("e1", "r2"),
        _release_event("e1", "r1"),
        _claim_event("e1", "r2", 1, None),
    ],
]


def _same_on_both(real: RunRecords, steps: list[Step]) -> None:
    fake = RunRecords(_FakeTable().db, TABLE)  # type: ignore[arg-type]
    prefix = f"x{next(_examples):06d}-"  # one table for the test: each example its own runs and events
    for step in steps:
        assert _answer(step, fake, prefix) == _answer(step, real, prefix)
    assert _stored(fake.db, prefix) == _stored(real.db, prefix)


@pytest.mark.parametrize("steps", EDGES)
def test_each_edge_of_a_run_record_on_the_fake_table_as_on_dynamodb(
    real: RunRecords, steps: list[Step]
) -> None:
    _same_on_both(real, steps)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(steps)
def test_the_fake_table_keeps_a_run_record_as_dynamodb_does(real: RunRecords, steps: list[Step]) -> None:
    _same_on_both(real, steps)
