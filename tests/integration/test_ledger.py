"""The ledger table on moto: creation and adoption, its resource policy, exactly-once writes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.exceptions import ClientError
from botocore.stub import ANY, Stubber

from ami_janitor.aws import ledger
from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.inventory.ledger_items import read_ledger
from ami_janitor.aws.inventory.reading import SourceFailed
from ami_janitor.aws.ledger import Ledger, Prior
from ami_janitor.aws.runs import RunNotStarted, RunRecords, run_key
from ami_janitor.core.model import LedgerBake, LedgerCopy, LedgerItem
from ami_janitor.core.policy import DEFAULT_LEDGER_TABLE
from sdk_faults import LoseFirstAnswers
from server import make_ledger

TABLE = "ami-janitor-ledger"
WRITER = "arn:aws:iam::123456789012:role/deployer"
NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


@pytest.fixture
def clients(moto_aws: None) -> RegionClients:
    return RegionClients("us-east-1")


def test_create_is_idempotent_and_sets_every_guard(clients: RegionClients) -> None:
    assert not ledger.exists(clients, TABLE)
    first = ledger.create_table(clients, TABLE, [WRITER])
    assert first.created and len(first.changes) == 4
    assert ledger.exists(clients, TABLE)
    again = ledger.create_table(clients, TABLE, [WRITER])
    assert not again.created and again.changes == []
    db = clients.dynamodb
    table = db.describe_table(TableName=TABLE)["Table"]
    assert table["DeletionProtectionEnabled"] is True
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert [k["AttributeName"] for k in table["KeySchema"]] == ["pk", "sk"]
    backups = db.describe_continuous_backups(TableName=TABLE)["ContinuousBackupsDescription"]
    assert backups["PointInTimeRecoveryDescription"]["PointInTimeRecoveryStatus"] == "ENABLED"
    ttl = db.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "ttl")


def test_resource_policy_denies_writes_outside_the_janitor_path(clients: RegionClients) -> None:
    ledger.create_table(clients, TABLE, [WRITER])
    arn = clients.dynamodb.describe_table(TableName=TABLE)["Table"]["TableArn"]
    # moto stores the policy but never evaluates it: check the document itself.
    stored = json.loads(clients.dynamodb.get_resource_policy(ResourceArn=arn)["Policy"])
    [statement] = stored["Statement"]
    assert statement["Effect"] == "Deny" and statement["Principal"] == "*"
    assert {
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:DeleteItem",
        "dynamodb:BatchWriteItem",
    } <= set(statement["Action"])
    assert {"dynamodb:DeleteTable", "dynamodb:UpdateTable", "dynamodb:PutResourcePolicy"} <= set(
        statement["Action"]
    )
    assert not any(a.startswith("dynamodb:Get") or a.endswith("Query") for a in statement["Action"])
    assert statement["Resource"] == [arn, f"{arn}/*"]
    assert statement["Condition"] == {
        "ArnNotLike": {"aws:PrincipalArn": ["arn:aws:iam::*:role/ami-janitor/*", WRITER]}
    }
    # Another writer is added; the first stays named.
    other = "arn:aws:iam::123456789012:role/other"
    result = ledger.create_table(clients, TABLE, [other])
    assert result.writers == [WRITER, other]
    stored = json.loads(clients.dynamodb.get_resource_policy(ResourceArn=arn)["Policy"])
    assert stored["Statement"][0]["Condition"]["ArnNotLike"]["aws:PrincipalArn"][1:] == [WRITER, other]


def test_an_existing_table_is_adopted_and_its_guards_set(clients: RegionClients) -> None:
    clients.dynamodb.create_table(
        TableName=TABLE,
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        BillingMode="PAY_PER_REQUEST",
    )
    result = ledger.create_table(clients, TABLE, [WRITER])
    assert not result.created
    assert result.changes[0] == "enabled deletion protection"
    assert clients.dynamodb.describe_table(TableName=TABLE)["Table"]["DeletionProtectionEnabled"] is True


def test_caller_role_arn_from_an_assumed_role_session() -> None:
    assert ledger.role_arn_of("arn:aws:sts::111122223333:assumed-role/Admin/alice") == [
        "arn:aws:iam::111122223333:role/Admin",
        "arn:aws:iam::111122223333:role/*/Admin",
    ]
    assert ledger.role_arn_of("arn:aws:iam::111122223333:user/bob") == ["arn:aws:iam::111122223333:user/bob"]


def test_candidate_and_stages_are_recorded_exactly_once(clients: RegionClients) -> None:
    ledger.create_table(clients, TABLE, [WRITER])
    book = Ledger(clients, TABLE, retention_days=30)
    assert book.record_candidate("ami-1", NOW) == "recorded"
    assert book.record_candidate("ami-1", NOW + timedelta(days=1)) == "already-recorded"
    # A stage out of order, or on an AMI never recorded, is refused.
    assert book.record_stage("ami-1", "disable", NOW, Prior()) == "already-recorded"
    assert book.record_stage("ami-2", "deprecate", NOW, Prior()) == "already-recorded"
    prior = Prior(deprecation=NOW + timedelta(days=400), launch_permissions=("user:111122223333",))
    assert book.record_stage("ami-1", "deprecate", NOW, prior) == "recorded"
    assert book.record_stage("ami-1", "deprecate", NOW, prior) == "already-recorded"
    assert book.record_stage("ami-1", "deregister", NOW, Prior(), previous="deprecate") == "recorded"
    item = book.read_items(["ami-1", "ami-2"])["ami-1"]
    assert item.first_candidate == NOW
    assert item.stages["deprecate"].prior_deprecation == NOW + timedelta(days=400)
    assert item.stages["deprecate"].prior_launch_permissions == ("user:111122223333",)
    assert set(item.stages) == {"deprecate", "deregister"}
    assert item.ttl is None  # a refused DeregisterImage must not let the record expire
    assert book.confirm_deregistered("ami-1", NOW) == "recorded"
    assert book.confirm_deregistered("ami-1", NOW) == "already-recorded"
    item = book.read_items(["ami-1"])["ami-1"]
    assert (item.deregistered, item.ttl) == (NOW, int((NOW + timedelta(days=30)).timestamp()))
    assert book.close("ami-1", NOW, "disable") == "already-recorded"  # not the stage the rescue undid last
    assert book.close("ami-1", NOW, "deregister") == "recorded"
    assert book.close("ami-1", NOW, "deregister") == "already-recorded"
    assert book.reopen("ami-1", "disable") == "already-recorded"  # not the last stage
    assert book.reopen("ami-1", "deregister") == "recorded"
    assert book.read_items(["ami-1"])["ami-1"].is_open
    assert book.close("ami-1", NOW, "deregister") == "recorded"
    # A closed record starts a new clock.
    assert book.record_candidate("ami-1", NOW + timedelta(days=2)) == "recorded"
    fresh = book.read_items(["ami-1"])["ami-1"]
    assert fresh.stages == {} and fresh.closed is None and fresh.ttl is None


def test_a_close_is_refused_over_a_stage_done_again_since_the_rescue_read(clients: RegionClients) -> None:
    """A redo leaves last_stage as it is: the close is conditional on each stage's `redone` as read too."""
    ledger.create_table(clients, TABLE, [WRITER])
    book = Ledger(clients, TABLE)
    assert book.record_candidate("ami-1", NOW) == "recorded"
    assert book.record_stage("ami-1", "deprecate", NOW, Prior()) == "recorded"
    assert book.record_stage("ami-1", "disable", NOW, Prior(), previous="deprecate") == "recorded"
    read = book.read_items(["ami-1"])["ami-1"]  # the rescue's read
    assert book.redo_stage("ami-1", "disable", NOW + timedelta(hours=1), Prior()) == "recorded"
    as_read = {stage: entry.redone for stage, entry in read.stages.items()}
    assert book.close("ami-1", NOW, "disable", as_read) == "already-recorded"
    again = book.read_items(["ami-1"])["ami-1"]
    assert again.is_open and again.stages["disable"].redone == NOW + timedelta(hours=1)
    assert book.close("ami-1", NOW, "disable", {s: e.redone for s, e in again.stages.items()}) == "recorded"


def test_two_runs_racing_on_a_stage_one_wins(clients: RegionClients) -> None:
    """Two runs that both read "deprecated" and both move the AMI to disable. DynamoDB evaluates a
    condition atomically with its write; moto in-process does not lock between the two (a thread race
    would test moto), so the interleaving is written out: both checked, then both write."""
    ledger.create_table(clients, TABLE, [WRITER])
    first, second = Ledger(clients, TABLE), Ledger(RegionClients("us-east-1"), TABLE)
    first.record_candidate("ami-1", NOW)
    first.record_stage("ami-1", "deprecate", NOW, Prior())
    seen = [run.read_items(["ami-1"])["ami-1"] for run in (first, second)]
    assert all(set(item.stages) == {"deprecate"} for item in seen)
    later = NOW + timedelta(days=7)
    outcomes = [run.record_stage("ami-1", "disable", later, Prior()) for run in (second, first)]
    assert outcomes == ["recorded", "already-recorded"]
    assert first.read_items(["ami-1"])["ami-1"].stages["disable"].at == later


def test_grants_are_marked_until_confirmed_made(clients: RegionClients) -> None:
    ledger.create_table(clients, TABLE, [WRITER])
    book = Ledger(clients, TABLE)
    a, b, c = "user:111122223333", "user:444455556666", "org:o-abc123"
    assert book.confirm_grants("ami-1", [a]) == "already-recorded"  # nothing marked
    assert book.record_grants("ami-1", [a, b]) == "recorded"
    item = book.read_items(["ami-1"])["ami-1"]
    assert (item.grants, item.granting) == ((a, b), (a, b))
    assert book.confirm_grants("ami-1", [a]) == "recorded"
    book.record_grants("ami-1", [c])
    item = book.read_items(["ami-1"])["ami-1"]
    assert (item.grants, item.granting) == ((c, a, b), (c, b))
    assert book.forget_grants("ami-1", [b]) == "recorded"  # revoked: neither recorded nor marked
    item = book.read_items(["ami-1"])["ami-1"]
    assert (item.grants, item.granting) == ((c, a), (c,))
    book.confirm_grants("ami-1", [c])
    assert book.read_items(["ami-1"])["ami-1"].granting == ()


def test_grants_found_in_place_are_kept_apart_from_the_janitors_own(clients: RegionClients) -> None:
    ledger.create_table(clients, TABLE, [WRITER])
    book = Ledger(clients, TABLE)
    a, c = "user:111122223333", "user:444455556666"
    assert book.record_found("ami-1", []) == "already-recorded"  # nothing to write
    book.record_grants("ami-1", [a])
    assert book.record_found("ami-1", [c]) == "recorded"
    assert book.record_found("ami-1", [c]) == "recorded"  # a string set: once
    item = book.read_items(["ami-1"])["ami-1"]
    assert (item.grants, item.granting, item.grants_found) == ((a,), (a,), (c,))
    book.record_grants("ami-1", [c])  # gone since (DisableImage), granted by the janitor: its own
    item = book.read_items(["ami-1"])["ami-1"]
    assert (item.grants, item.grants_found) == ((a, c), ())


def test_read_items_pages_by_100_keys(clients: RegionClients) -> None:
    ledger.create_table(clients, TABLE, [WRITER])
    book = Ledger(clients, TABLE)
    ids = [f"ami-{i:04d}" for i in range(230)]
    for image_id in ids:
        book.record_candidate(image_id, NOW)
    calls: list[int] = []
    real = clients.dynamodb.batch_get_item

    def counting(**request: object) -> object:
        calls.append(len(request["RequestItems"][TABLE]["Keys"]))  # type: ignore[index]
        return real(**request)  # type: ignore[arg-type]

    clients.dynamodb.batch_get_item = counting  # type: ignore[method-assign]
    assert set(book.read_items([*ids, "ami-absent"])) == set(ids)
    assert calls == [100, 100, 31]


def test_an_item_that_cannot_be_read_is_named_by_its_key(clients: RegionClients) -> None:
    """One item written by hand with a stage time that is no time: the region's error names its key
    first (an error is cut to 300 characters), so an operator finds it among thousands."""
    from ami_janitor.aws.inventory.ledger_items import read_ledger
    from ami_janitor.aws.inventory.reading import SourceFailed

    ledger.create_table(clients, TABLE, [WRITER])
    book = Ledger(clients, TABLE)
    book.record_candidate("ami-0aaaaaaaaaaaaaaa1", NOW)
    bad = {
        "pk": {"S": "image#ami-0bad"},
        "sk": {"S": "item"},
        "image_id": {"S": "ami-0bad"},
        "stages": {"M": {"deprecate": {"M": {"at": {"S": "not a time"}}}}},
    }
    boto3.client("dynamodb", region_name="us-east-1").put_item(TableName=TABLE, Item=bad)

    with pytest.raises(
        ledger.MalformedItem, match=r"^ledger item image#ami-0bad cannot be read: stages\.deprecate\.at: "
    ):
        book.read_all()
    with pytest.raises(ledger.MalformedItem, match="ledger item image#ami-0bad cannot be read"):
        book.read_items(["ami-0bad"])
    with pytest.raises(SourceFailed) as failed:
        read_ledger(clients, TABLE)
    assert str(failed.value).startswith(
        "dynamodb:Scan: MalformedResponse: MalformedItem: ledger item image#ami-0bad cannot be read: "
        "stages.deprecate.at: "
    )


def test_an_item_whose_time_has_no_zone_is_named_by_its_key(clients: RegionClients) -> None:
    """A candidate clock written by hand without its zone would be read as a naive time, and the plan
    that compares it with `now` would stop on a TypeError naming no AMI: the item is refused when read,
    named by its key, as any item that cannot be read."""
    ledger.create_table(clients, TABLE, [WRITER])
    book = Ledger(clients, TABLE)
    bad = {
        "pk": {"S": "image#ami-0bad"},
        "sk": {"S": "item"},
        "image_id": {"S": "ami-0bad"},
        "first_candidate": {"S": "2026-11-01T03:00:00"},  # no Z
    }
    boto3.client("dynamodb", region_name="us-east-1").put_item(TableName=TABLE, Item=bad)

    with pytest.raises(
        ledger.MalformedItem, match=r"^ledger item image#ami-0bad cannot be read: first_candidate: "
    ):
        book.read_all()
    with pytest.raises(SourceFailed, match="ledger item image#ami-0bad cannot be read: first_candidate: "):
        read_ledger(clients, TABLE)


def test_an_item_whose_image_id_is_not_its_key_is_named_not_filed_under_that_ami(
    clients: RegionClients,
) -> None:
    """Items are filed by their `image_id`: one at image#ami-0bad saying ami-0aaaaaaaaaaaaaaa1 (written
    by hand) would replace that AMI's own record and leave ami-0bad with none. It is refused, named by
    its key."""
    ledger.create_table(clients, TABLE, [WRITER])
    book = Ledger(clients, TABLE)
    book.record_candidate("ami-0aaaaaaaaaaaaaaa1", NOW)
    bad = {
        "pk": {"S": "image#ami-0bad"},
        "sk": {"S": "item"},
        "image_id": {"S": "ami-0aaaaaaaaaaaaaaa1"},
        "first_candidate": {"S": "2020-01-01T00:00:00Z"},
    }
    boto3.client("dynamodb", region_name="us-east-1").put_item(TableName=TABLE, Item=bad)

    with pytest.raises(
        ledger.MalformedItem,
        match=r"^ledger item image#ami-0bad cannot be read: image_id ami-0aaaaaaaaaaaaaaa1 is not the AMI",
    ):
        book.read_all()
    with pytest.raises(ledger.MalformedItem, match="ledger item image#ami-0bad cannot be read"):
        book.read_items(["ami-0bad"])


def test_record_stage_request_is_conditional_on_the_previous_stage(fake_aws_env: None) -> None:
    client = boto3.client("dynamodb", region_name="us-east-1")
    clients = RegionClients("us-east-1", dynamodb=client)
    with Stubber(client) as stub:
        stub.add_response(
            "update_item",
            {},
            {
                "TableName": TABLE,
                "Key": {"pk": {"S": "image#ami-1"}, "sk": {"S": "item"}},
                "UpdateExpression": "SET #last_write = :last_write, stages.#stage = :entry, last_stage = :stage",
                "ConditionExpression": "attribute_exists(first_candidate) AND attribute_not_exists(closed)"
                " AND last_stage = :previous",
                "ExpressionAttributeNames": {"#stage": "disable", "#last_write": "last_write"},
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                "ExpressionAttributeValues": {
                    ":last_write": ANY,  # a fresh id per write: tells a retried write of ours from another's
                    ":stage": {"S": "disable"},
                    ":previous": {"S": "deprecate"},
                    ":entry": {
                        "M": {
                            "at": {"S": "2026-11-25T03:00:00Z"},
                            "prior_launch_permissions": {"L": [{"S": "user:111122223333"}]},
                        }
                    },
                },
            },
        )
        stub.add_client_error("update_item", service_error_code="ConditionalCheckFailedException")
        book = Ledger(clients, TABLE)
        prior = Prior(launch_permissions=("user:111122223333",))
        assert book.record_stage("ami-1", "disable", NOW, prior) == "recorded"
        assert book.record_stage("ami-1", "disable", NOW, prior) == "already-recorded"
        stub.assert_no_pending_responses()


def test_a_stage_recorded_after_a_later_one_leaves_the_last_stage_as_it_is(fake_aws_env: None) -> None:
    # The table's last stage stays the latest by order, as the item is read back: every later write and
    # a rescue's close are conditional on it.
    client = boto3.client("dynamodb", region_name="us-east-1")
    clients = RegionClients("us-east-1", dynamodb=client)
    with Stubber(client) as stub:
        stub.add_response(
            "update_item",
            {},
            {
                "TableName": TABLE,
                "Key": {"pk": {"S": "image#ami-1"}, "sk": {"S": "item"}},
                "UpdateExpression": "SET #last_write = :last_write, stages.#stage = :entry",
                "ConditionExpression": "attribute_exists(first_candidate) AND attribute_not_exists(closed)"
                " AND last_stage = :previous",
                "ExpressionAttributeNames": {"#stage": "deprecate", "#last_write": "last_write"},
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                "ExpressionAttributeValues": {
                    ":last_write": ANY,
                    ":previous": {"S": "disable"},
                    ":entry": {"M": {"at": {"S": "2026-11-25T03:00:00Z"}}},
                },
            },
        )
        book = Ledger(clients, TABLE)
        assert book.record_stage("ami-1", "deprecate", NOW, Prior(), previous="disable") == "recorded"
        stub.assert_no_pending_responses()


def test_close_and_reopen_requests_are_conditional_on_the_last_stage(fake_aws_env: None) -> None:
    client = boto3.client("dynamodb", region_name="us-east-1")
    clients = RegionClients("us-east-1", dynamodb=client)
    open_clock = "attribute_exists(first_candidate) AND attribute_not_exists(closed)"
    with Stubber(client) as stub:
        for condition, values, update in (
            (f"{open_clock} AND last_stage = :seen", {":seen": {"S": "disable"}}, "SET closed = :at"),
            (f"{open_clock} AND attribute_not_exists(last_stage)", {}, "SET closed = :at"),
            (
                "attribute_exists(closed) AND last_stage = :stage",
                {":stage": {"S": "disable"}},
                "REMOVE closed",
            ),
        ):
            at = {":at": {"S": "2026-11-25T03:00:00Z"}} if update.startswith("SET") else {}
            stub.add_response(
                "update_item",
                {},
                {
                    "TableName": TABLE,
                    "Key": {"pk": {"S": "image#ami-1"}, "sk": {"S": "item"}},
                    "UpdateExpression": "SET #last_write = :last_write"
                    + (f", {update[4:]}" if update.startswith("SET") else f" {update}"),
                    "ConditionExpression": condition,
                    "ExpressionAttributeNames": {"#last_write": "last_write"},
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                    "ExpressionAttributeValues": {":last_write": ANY, **at, **values},
                },
            )
        book = Ledger(clients, TABLE)
        assert book.close("ami-1", NOW, "disable") == "recorded"
        assert book.close("ami-1", NOW, None) == "recorded"
        assert book.reopen("ami-1", "disable") == "recorded"
        stub.assert_no_pending_responses()


@pytest.fixture
def retrying(moto_aws: None, monkeypatch: pytest.MonkeyPatch) -> RegionClients:
    """Clients that retry as deployed (the tests' default is one attempt), without the backoff wait."""
    monkeypatch.setenv("AMI_JANITOR_MAX_ATTEMPTS", "3")
    monkeypatch.setattr("botocore.retries.standard.ExponentialBackoff.delay_amount", lambda self, context: 0)
    clients = RegionClients("us-east-1")
    ledger.create_table(clients, TABLE, [WRITER])
    return clients


def test_a_write_whose_answer_was_lost_is_recorded_when_the_sdk_retries_it(retrying: RegionClients) -> None:
    book = Ledger(retrying, TABLE)
    lost = LoseFirstAnswers(retrying.dynamodb, "UpdateItem", count=3)
    # Each retry meets the write its first attempt made: its condition fails, the write is ours.
    assert book.record_candidate("ami-1", NOW) == "recorded"
    prior = Prior(deprecation=NOW + timedelta(days=400))
    assert book.record_stage("ami-1", "deprecate", NOW, prior) == "recorded"
    assert book.confirm_stage("ami-1", "deprecate", NOW) == "recorded"
    assert lost.sent == 6  # three writes, each sent twice by botocore
    item = book.read_items(["ami-1"])["ami-1"]
    assert item.first_candidate == NOW and set(item.stages) == {"deprecate"}
    assert item.stages["deprecate"].prior_deprecation == prior.deprecation
    # Another run's write is still told apart: this clock and this stage were recorded by us.
    assert book.record_candidate("ami-1", NOW + timedelta(days=1)) == "already-recorded"
    assert book.record_stage("ami-1", "deprecate", NOW, prior) == "already-recorded"


def test_every_conditional_write_counts_its_own_retried_write_as_recorded(retrying: RegionClients) -> None:
    book = Ledger(retrying, TABLE)
    book.record_candidate("ami-1", NOW)
    book.record_stage("ami-1", "deprecate", NOW, Prior())
    book.record_stage("ami-1", "disable", NOW, Prior())
    LoseFirstAnswers(retrying.dynamodb, "UpdateItem")
    assert book.record_stage("ami-1", "deregister", NOW, Prior(), snapshots=["snap-1"]) == "recorded"
    assert book.confirm_deregistered("ami-1", NOW) == "recorded"
    assert book.close("ami-1", NOW, "deregister") == "recorded"
    assert book.reopen("ami-1", "deregister") == "recorded"
    assert book.close("ami-1", NOW, "deregister") == "recorded"
    assert book.record_adoption(NOW) == "recorded"
    assert book.record_bake("ami-2", LedgerBake(instance_id="i-1", at=NOW)) == "recorded"
    assert book.forget_grants("ami-3", ["user:111122223333"]) == "already-recorded"  # none recorded
    book.record_grants("ami-3", ["user:111122223333"])
    assert book.confirm_grants("ami-3", ["user:111122223333"]) == "recorded"
    assert book.forget_grants("ami-3", ["user:111122223333"]) == "recorded"
    assert book.adopt(LedgerItem(image_id="ami-4", first_candidate=NOW)) == "recorded"
    items = book.read_items(["ami-1", "ami-2", "ami-3", "ami-4"])
    assert items["ami-1"].deregistered == NOW and items["ami-1"].closed == NOW
    assert items["ami-2"].bakes and items["ami-3"].grants == () and items["ami-4"].first_candidate == NOW
    # A second run after all that: every write is another's now.
    assert book.record_adoption(NOW) == "already-recorded"
    assert book.record_bake("ami-2", LedgerBake(instance_id="i-1", at=NOW)) == "already-recorded"


def test_a_copy_is_confirmed_made_on_its_sources_record(retrying: RegionClients) -> None:
    book = Ledger(retrying, TABLE)
    record = LedgerCopy(source_image_id="ami-1", source_region="us-east-1", region="eu-west-1", token="t-1")
    assert book.record_copy(record) == "recorded"
    LoseFirstAnswers(retrying.dynamodb, "UpdateItem")  # its retry meets its own write: still recorded
    assert book.confirm_copy(record, "ami-9") == "recorded"
    [copy] = book.read_items(["ami-1"])["ami-1"].copies
    assert (copy.generation, copy.token, copy.image_id) == (1, "t-1", "ami-9")
    # A generation never recorded is not made up by its confirmation.
    second = record.model_copy(update={"generation": 2, "token": "t-2"})
    assert book.confirm_copy(second, "ami-8") == "already-recorded"
    assert [c.generation for c in book.read_items(["ami-1"])["ami-1"].copies] == [1]


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


def test_ledger_create_whose_create_and_ttl_answers_were_lost_finishes(
    moto_aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CreateTable's retry meets the table its first attempt made (ResourceInUseException), and
    UpdateTimeToLive's the TTL (DynamoDB refuses to enable it again; moto does not, so that answer is
    given here): `ledger create` goes on and every guard is set."""
    monkeypatch.setenv("AMI_JANITOR_MAX_ATTEMPTS", "3")
    monkeypatch.setattr("botocore.retries.standard.ExponentialBackoff.delay_amount", lambda self, context: 0)
    clients = RegionClients("us-east-1")
    lost = LoseFirstAnswers(clients.dynamodb, "CreateTable", "UpdateTimeToLive")
    refused: list[str] = []

    def already_enabled(request: AWSPreparedRequest, **_: Any) -> AWSResponse | None:
        if request.headers.get("X-Amz-Target") == b"DynamoDB_20120810.UpdateTimeToLive" and lost.lost[
            -1:
        ] == ["UpdateTimeToLive"]:
            refused.append("UpdateTimeToLive")
            body = b'{"__type":"com.amazon.coral.validate#ValidationException","message":"TimeToLive is already enabled"}'
            return AWSResponse(request.url, 400, {}, _Body(body))
        return None

    clients.dynamodb.meta.events.register_first("before-send.dynamodb.UpdateTimeToLive", already_enabled)

    result = ledger.create_table(clients, TABLE, [WRITER])

    assert lost.lost == ["CreateTable", "UpdateTimeToLive"] and refused == ["UpdateTimeToLive"]
    assert not result.created  # read as found: its first attempt's, or another `ledger create`'s
    assert "enabled TTL on ttl" in result.changes
    table = clients.dynamodb.describe_table(TableName=TABLE)["Table"]
    assert table["DeletionProtectionEnabled"] is True
    ttl = clients.dynamodb.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "ttl")


def test_unprocessed_keys_are_asked_again_after_a_growing_wait_then_fail_as_an_aws_error(
    fake_aws_env: None,
) -> None:
    db = boto3.client("dynamodb", region_name="us-east-1")
    waits: list[float] = []
    keys = [ledger.key("ami-1"), ledger.key("ami-2")]
    raw = {**ledger.key("ami-1"), "image_id": {"S": "ami-1"}}
    with Stubber(db) as stub:
        ask = {"RequestItems": {TABLE: {"Keys": keys, "ConsistentRead": True}}}
        left = {TABLE: {"Keys": [ledger.key("ami-2")], "ConsistentRead": True}}
        stub.add_response("batch_get_item", {"Responses": {TABLE: [raw]}, "UnprocessedKeys": left}, ask)
        again = {"RequestItems": {TABLE: {"Keys": [ledger.key("ami-2")], "ConsistentRead": True}}}
        stub.add_response("batch_get_item", {"Responses": {TABLE: []}, "UnprocessedKeys": {}}, again)
        book = Ledger(RegionClients("us-east-1", dynamodb=db), TABLE, sleep=waits.append)
        assert list(book.read_items(["ami-2", "ami-1"])) == ["ami-1"]
        assert len(waits) == 1 and 0 <= waits[0] <= 0.1

        waits.clear()
        for _ in range(5):
            stub.add_response("batch_get_item", {"Responses": {TABLE: []}, "UnprocessedKeys": left}, again)
        with pytest.raises(ClientError) as refused:
            book.read_items(["ami-2"])
    assert refused.value.response["Error"]["Code"] == "ProvisionedThroughputExceededException"
    assert "left 1 keys unprocessed after 5 tries" in str(refused.value)
    assert len(waits) == 4 and all(0 <= w <= 0.1 * 2**n for n, w in enumerate(waits))


def test_a_run_record_edited_by_hand_skips_the_region_naming_it(moto_aws: None) -> None:
    make_ledger()
    key = "run#us-east-1#2026-11-25T03:00:00Z"
    boto3.client("dynamodb", region_name="us-east-1").put_item(
        TableName=DEFAULT_LEDGER_TABLE,
        Item={"pk": {"S": key}, "sk": {"S": "item"}, "slices": {"S": "3"}},  # a number typed as a string
    )
    with pytest.raises(SourceFailed, match=f"ledger item {key} cannot be read: KeyError"):
        read_ledger(RegionClients("us-east-1"), DEFAULT_LEDGER_TABLE)


def test_an_unfinished_run_whose_start_is_no_time_skips_the_region_naming_it(moto_aws: None) -> None:
    """A run is named as unfinished once it is old enough, so a start that is no time, read as none,
    would hide the run from every later report: the region is skipped, naming the record."""
    make_ledger()
    key = "run#us-east-1#2026-11-01T03:00:00Z"
    boto3.client("dynamodb", region_name="us-east-1").put_item(
        TableName=DEFAULT_LEDGER_TABLE,
        Item={
            "pk": {"S": key},
            "sk": {"S": "item"},
            "slices": {"N": "3"},
            "done": {"SS": ["0"]},
            "started": {"S": "01/11/2026 03:00"},
        },
    )
    with pytest.raises(SourceFailed, match=f"ledger item {key} cannot be read: ValueError: started: "):
        read_ledger(RegionClients("us-east-1"), DEFAULT_LEDGER_TABLE)


def test_a_run_record_without_slices_is_no_record_and_a_malformed_one_is_named(moto_aws: None) -> None:
    """An item at a run's key without `slices` (only the summary's confirmation, written after the
    record expired) is no record for every read, as for finish_slice, not a bare KeyError naming
    nothing; a record whose fields cannot be read is a MalformedItem naming its key."""
    make_ledger()
    db = boto3.client("dynamodb", region_name="us-east-1")
    records = RunRecords(db, DEFAULT_LEDGER_TABLE)
    run = "2026-11-01T03:00:00Z"
    records.confirm_summary("us-east-1", run, NOW)  # unconditional: an item without slices
    with pytest.raises(RunNotStarted):
        records.finish_slice("us-east-1", run, 0, {})
    with pytest.raises(RunNotStarted):
        records.read("us-east-1", run)
    with pytest.raises(RunNotStarted):
        records.check_slice("us-east-1", run, 0, "digest")

    db.put_item(
        TableName=DEFAULT_LEDGER_TABLE,
        Item={**run_key("us-east-1", run), "slices": {"N": "3"}, "done": {"SS": ["first"]}},
    )
    with pytest.raises(ledger.MalformedItem, match=f"^ledger item run#us-east-1#{run} cannot be read: "):
        records.read("us-east-1", run)


def test_an_adoption_record_edited_by_hand_skips_the_region_not_adopts_again(moto_aws: None) -> None:
    """Read as "never adopted", every enforce run would adopt the janitor tags again and report no tag
    as tampered: the region is skipped, naming the record."""
    make_ledger()
    boto3.client("dynamodb", region_name="us-east-1").put_item(
        TableName=DEFAULT_LEDGER_TABLE,
        Item={"pk": {"S": "ledger#adoption"}, "sk": {"S": "item"}, "at": {"S": "25/11/2026"}},
    )
    with pytest.raises(SourceFailed, match="ledger item ledger#adoption cannot be read: at: "):
        read_ledger(RegionClients("us-east-1"), DEFAULT_LEDGER_TABLE)
