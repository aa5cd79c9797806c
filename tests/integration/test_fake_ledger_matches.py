"""The in-memory ledger the properties run on (fake_ec2.FakeLedger) answers as the real one does: the
same sequence of writes on both (the real table on moto's DynamoDB) gives the same answers
("recorded" / "already-recorded") and the same items. Its conditions are written twice (Python there,
DynamoDB condition expressions here); this keeps them one. So does the ledger on the fake's DynamoDB
client (fake_ec2.FakeDynamoDB, which the fleet simulator runs on): the real Ledger's own update and
condition expressions, evaluated by tests/dynamodb_expressions.py."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ami_janitor.aws import ledger
from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.ledger import Ledger, Prior
from ami_janitor.core.model import LedgerItem, LedgerStage
from ami_janitor.core.trust import STAGES
from fake_ec2 import FakeEC2, FakeLedger

TABLE = "ami-janitor-ledger"
START = datetime(2026, 11, 1, 3, tzinfo=UTC)
IMAGES = ("a", "b")
_examples = itertools.count()

Write = Callable[[Ledger, str], str]


def _candidate(day: int) -> Write:
    return lambda book, image_id: book.record_candidate(image_id, START + timedelta(days=day))


def _stage(stage: str, previous: str | None, day: int) -> Write:
    prior = Prior(
        deprecation=START if day % 2 else None, launch_permissions=("user:111122223333",)[: day % 2]
    )

    def write(book: Ledger, image_id: str) -> str:
        at = START + timedelta(days=day)
        snapshots = [f"snap-{image_id}"] if stage == "deregister" else []
        return book.record_stage(image_id, stage, at, prior, previous=previous, snapshots=snapshots)  # type: ignore[arg-type]

    return write


def _confirm(stage: str, day: int) -> Write:
    return lambda book, image_id: book.confirm_stage(image_id, stage, START + timedelta(days=day))  # type: ignore[arg-type]


def _redo(stage: str, day: int, seen: int | None) -> Write:
    # What the stage changes this time replaces the first record's: set, or removed where empty; only
    # where the stage was last done again when the caller read it (`seen`: that day; None: never).
    prior = Prior(
        deprecation=START + timedelta(days=day) if day % 3 else None,
        launch_permissions=("user:111122223333", "user:444455556666")[: day % 3],
        already_disabled=day % 3 == 1,
    )
    at, as_read = START + timedelta(days=day), None if seen is None else START + timedelta(days=seen)
    return lambda book, image_id: book.redo_stage(image_id, stage, at, prior, as_read)  # type: ignore[arg-type]


def _adopted(stage: str, day: int) -> Write:
    # A stage adopted from an older janitor's tags (a redo makes the record the janitor's own).
    at = START + timedelta(days=day)
    entry = LedgerStage(at=at, prior_launch_permissions=("user:111122223333",), adopted=True)
    item = LedgerItem(image_id="", first_candidate=at, stages={stage: entry})  # type: ignore[dict-item]
    return lambda book, image_id: book.adopt(item.model_copy(update={"image_id": image_id}))


def _deregistered(day: int) -> Write:
    return lambda book, image_id: book.confirm_deregistered(image_id, START + timedelta(days=day))


def _close(day: int, seen: str | None) -> Write:
    return lambda book, image_id: book.close(image_id, START + timedelta(days=day), seen)  # type: ignore[arg-type]


def _reopen(stage: str) -> Write:
    return lambda book, image_id: book.reopen(image_id, stage)  # type: ignore[arg-type]


def _grants(grants: list[str]) -> Write:
    return lambda book, image_id: book.record_grants(image_id, grants)


def _confirm_grants(grants: list[str]) -> Write:
    return lambda book, image_id: book.confirm_grants(image_id, grants)


def _forget(grants: list[str]) -> Write:
    return lambda book, image_id: book.forget_grants(image_id, grants)


def _found(grants: list[str]) -> Write:
    return lambda book, image_id: book.record_found(image_id, grants)


days = st.integers(0, 20)
stages = st.sampled_from(STAGES)
grant_sets = st.lists(st.sampled_from(["user:111122223333", "user:444455556666"]), min_size=1, unique=True)
writes = st.one_of(
    st.builds(_candidate, days),
    st.builds(_stage, stages, st.one_of(st.none(), stages), days),
    st.builds(_confirm, stages, days),
    st.builds(_redo, stages, days, st.one_of(st.none(), days)),
    st.builds(_adopted, stages, days),
    st.builds(_deregistered, days),
    st.builds(_close, days, st.one_of(st.none(), stages)),
    st.builds(_reopen, stages),
    st.builds(_grants, grant_sets),
    st.builds(_confirm_grants, grant_sets),
    st.builds(_forget, grant_sets),
    st.builds(_found, grant_sets),
)
steps = st.lists(st.tuples(st.sampled_from(IMAGES), writes), min_size=1, max_size=12)


@pytest.fixture
def real(moto_aws: None) -> Ledger:
    clients = RegionClients("us-east-1")
    ledger.create_table(clients, TABLE, ["arn:aws:iam::123456789012:role/deployer"])
    return Ledger(clients, TABLE)


class _FakeTableClients:
    """What a Ledger asks of its region's clients: the DynamoDB client, here the fake's."""

    def __init__(self, fake: FakeEC2) -> None:
        self.dynamodb = fake.dynamodb


def _on_fake_table() -> Ledger:
    fake = FakeEC2("us-east-1")
    return Ledger(_FakeTableClients(fake), fake.ledger.table)  # type: ignore[arg-type]


def _comparable(item: LedgerItem) -> dict[str, Any]:
    return item.model_dump(exclude={"image_id"})


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(steps)
def test_the_fake_ledger_answers_as_the_table_does(real: Ledger, steps: list[tuple[str, Write]]) -> None:
    fake = FakeLedger()
    fake_table = _on_fake_table()
    prefix = f"ami-{next(_examples):08x}"  # one table for the test: each example its own AMIs
    for image, write in steps:
        image_id = f"{prefix}{image}"
        answer = write(real, image_id)
        assert (write(fake, image_id), write(fake_table, image_id)) == (answer, answer)
    ids = {f"{prefix}{image}" for image in IMAGES}
    table = {i: _comparable(item) for i, item in real.read_all().items.items() if i in ids}
    memory = {i: _comparable(item) for i, item in fake.read_all().items.items() if i in ids}
    on_fake_table = {i: _comparable(item) for i, item in fake_table.read_all().items.items() if i in ids}
    assert (memory, on_fake_table) == (table, table)
