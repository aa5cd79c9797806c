"""The in-memory EC2 and the services beside it (tests/fake_aws.py) answer a scheduled run's inventory
(aws/inventory.load_inventory) as the fake itself describes the region: its AMIs, what references them
(instances, launch templates, SSM parameters), its retired snapshots and its ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ami_janitor.aws import usage
from ami_janitor.aws.inventory import load_inventory
from ami_janitor.core.model import LedgerItem, Reference
from ami_janitor.core.policy import RETIRED_FROM_TAG, parse_policy
from fake_aws import Inbox, Organization, account_region
from fake_ec2 import FakeDynamoDB, FakeEC2, FakeImage

NOW = datetime(2026, 11, 25, 3, tzinfo=UTC)
POLICY = parse_policy(
    {
        "regions": ["us-east-1"],
        "families": [{"name": "app", "match": {"name": "app-*"}}],
        "usage_reports": {"inbox": "s3://inbox/org"},
    }
)


def region() -> FakeEC2:
    fake = FakeEC2("us-east-1", latency=0.05)
    fake.clock = NOW
    for n in range(5):
        fake.add_image(
            FakeImage(f"ami-{n:017x}", f"app-{n}", NOW - timedelta(days=n), snapshot_ids=(f"snap-{n}",))
        )
    fake.add_snapshot("snap-left", {RETIRED_FROM_TAG: "ami-00000000000000009"})
    fake.references += [
        Reference(image_id="ami-00000000000000001", kind="instance", resource_id="i-1", detail=""),
        Reference(image_id="ami-0000000000000feed", kind="launch-template", resource_id="lt-1", detail=""),
    ]
    fake.ledger.adopted = NOW - timedelta(days=30)
    for n in range(3):
        image_id = f"ami-{n:017x}"
        fake.ledger.items[image_id] = LedgerItem(image_id=image_id, grants=("user:111122223333",))
        fake.images[image_id].permissions.add("user:111122223333")  # granted, as the ledger records
    return fake


def test_the_inventory_reads_what_the_fake_holds() -> None:
    fake = region()
    area = account_region(fake, "222233334444", Inbox(), parameters={"/app/current": "ami-00000000000000002"})

    inventory = load_inventory(area.clients, POLICY)

    assert inventory.error is None
    assert [i.image_id for i in inventory.images] == sorted(fake.images)
    used = {(r.image_id, r.kind, r.resource_id) for r in inventory.references}
    assert used == {
        ("ami-00000000000000001", "instance", "i-1"),
        ("ami-0000000000000feed", "launch-template", "lt-1"),
        ("ami-00000000000000002", "ssm-parameter", "/app/current"),
    }
    assert [s.snapshot_id for s in inventory.retired_snapshots] == ["snap-left"]
    assert inventory.ledger is not None and inventory.ledger.adopted == fake.ledger.adopted
    assert inventory.ledger.items == fake.ledger.items
    # Every call took the fake's latency on its clock, and was counted.
    calls = area.api_calls()
    # The AMIs, then those the account the ledger records grants to may launch: none lost a grant.
    assert (
        calls["ec2:DescribeImages"] == 2 and calls["dynamodb:Scan"] == 1 and calls["ssm:GetParameters"] == 1
    )
    assert calls["ec2:DescribeImageAttribute"] == 0
    assert fake.elapsed == pytest.approx(sum(calls.values()) * 0.05)


def test_a_scan_pages_the_ledger_by_its_limit() -> None:
    fake = region()
    db = FakeDynamoDB(fake)
    first = db.scan(TableName=fake.ledger.table, Limit=2)
    second = db.scan(TableName=fake.ledger.table, Limit=2, ExclusiveStartKey=first["LastEvaluatedKey"])
    assert len(first["Items"]) == len(second["Items"]) == 2 and "LastEvaluatedKey" not in second
    assert first["Items"][0]["pk"] == {"S": "ledger#adoption"}


def test_the_inbox_dates_a_report_by_its_writers_clock_and_the_owner_expands_its_organization() -> None:
    inbox = Inbox()
    org = Organization("o-abcdefghij", "111122223333", ["111122223333", "222233334444", "333344445555"])
    consumer = account_region(region(), "222233334444", inbox)
    owner_ec2 = region()
    owner = account_region(owner_ec2, "111122223333", inbox, organization=org)
    consumer.ec2.advance(60)
    settings = POLICY.usage_reports
    assert settings is not None

    key = usage.publish_report(
        consumer.clients, settings, "222233334444", load_inventory(consumer.clients, POLICY), NOW
    )

    assert inbox.keys("inbox") == [key] == ["org/reports/222233334444/us-east-1.json"]
    report = usage.read_report(owner.clients.s3, settings, "222233334444", "us-east-1")
    assert report is not None and report.problem is None
    assert report.received_at > NOW + timedelta(seconds=60)  # the writer's clock when S3 stored it
    assert "ami-0000000000000feed" in report.uses  # another account's AMI its launch template names
    # Read about some AMIs, the report keeps their uses alone (one may name tens of thousands).
    about = usage.read_report(
        owner.clients.s3,
        settings,
        "222233334444",
        "us-east-1",
        {"ami-0000000000000feed", "ami-00000000000000bad"},
    )
    assert about is not None and list(about.uses) == ["ami-0000000000000feed"]
    none = usage.read_report(
        owner.clients.s3, settings, "222233334444", "us-east-1", {"ami-00000000000000bad"}
    )
    assert none is not None and none.uses == {} and none.problem is None
    assert usage.read_report(owner.clients.s3, settings, "333344445555", "us-east-1") is None
    expansions, notes = usage.expand_grants(owner.clients.organizations, [f"org:{org.arn}"])
    assert expansions == {f"org:{org.arn}": ("111122223333", "222233334444", "333344445555")} and notes == []


def test_an_ami_that_lost_a_recorded_grant_has_its_launch_permissions_read() -> None:
    fake = region()
    fake.images["ami-00000000000000001"].permissions.clear()  # disabled and enabled again
    area = account_region(fake, "222233334444", Inbox())

    inventory = load_inventory(area.clients, POLICY)

    assert inventory.error is None
    read = {i.image_id: i.launch_permissions for i in inventory.images if i.launch_permissions is not None}
    assert read == {"ami-00000000000000001": ()}
    assert area.api_calls()["ec2:DescribeImageAttribute"] == 1


@pytest.mark.parametrize("accounts", [[None], [{"Status": "ACTIVE"}], "no list"])
def test_an_organizations_answer_of_another_shape_keeps_the_shares_it_expands(accounts: Any) -> None:
    """ListAccounts answering an entry that is no account (as botocore parses a JSON null) is no answer:
    the organization's shares are kept, with a note, rather than the run failing."""
    import json

    import botocore.session
    from botocore.awsrequest import AWSResponse

    bodies = {
        "DescribeOrganization": {"Organization": {"Id": "o-abcdefghij"}},
        "ListAccounts": {"Accounts": accounts},
    }

    class Raw:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def stream(self, **_: Any) -> Any:
            yield self.body

    def answer(request: Any, **_: Any) -> AWSResponse:
        body = json.dumps(bodies[request.headers["X-Amz-Target"].decode().rsplit(".", 1)[-1]]).encode()
        response = AWSResponse(request.url, 200, {"content-type": "application/x-amz-json-1.1"}, Raw(body))
        response._content = body
        return response

    organizations = botocore.session.get_session().create_client(
        "organizations", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    organizations.meta.events.register("before-send", answer)
    grant = "org:arn:aws:organizations::111122223333:organization/o-abcdefghij"

    expansions, [note] = usage.expand_grants(organizations, [grant])

    assert expansions == {grant: None}
    assert note.startswith("organizations: ") and note.endswith(
        "shares to organizations and OUs are kept (fail safe)"
    )


@pytest.mark.parametrize(("listed", "kept"), [(0, False), (1, True)])
def test_a_missing_report_without_required_lists_the_accounts_prefix_once(listed: int, kept: bool) -> None:
    """required: false, no report for the region: one ListObjectsV2 of the account's prefix (at most one
    key, the inbox's owner checked) says whether it reports elsewhere, which keeps."""
    import botocore.session
    from botocore.stub import Stubber

    settings = parse_policy(
        {
            "regions": ["us-east-1"],
            "families": [{"name": "web", "match": {"name": "web-*"}}],
            "usage_reports": {"inbox": "s3://inbox/org", "required": False, "inbox_account": "111122223333"},
        }
    ).usage_reports
    assert settings is not None
    s3 = botocore.session.get_session().create_client(
        "s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    owner = {"ExpectedBucketOwner": "111122223333"}
    with Stubber(s3) as stub:
        stub.add_client_error(
            "get_object",
            "NoSuchKey",
            expected_params={"Bucket": "inbox", "Key": "org/reports/222233334444/us-east-1.json", **owner},
        )
        contents = {"Contents": [{"Key": "org/reports/222233334444/eu-west-1.json"}]} if listed else {}
        stub.add_response(
            "list_objects_v2",
            {"KeyCount": listed, **contents},
            {"Bucket": "inbox", "Prefix": "org/reports/222233334444/", "MaxKeys": 1, **owner},
        )
        report = usage.read_report(s3, settings, "222233334444", "us-east-1")
        stub.assert_no_pending_responses()

    assert (report is not None) == kept
    assert report is None or (report.problem or "").startswith("no report for us-east-1, though")


def test_the_recipes_of_the_account_name_the_amis_they_build_on() -> None:
    """Image Builder's image recipes, in pages of at most 100 (the fake's own page size follows
    maxResults): every one read, the AMI ids of other accounts reported."""
    fake = region()
    recipes = {
        f"arn:aws:imagebuilder:us-east-1:222233334444:image-recipe/r{n:03d}/1.0.0": f"ami-{n:017x}"
        for n in range(150)
    }
    area = account_region(fake, "222233334444", Inbox(), recipes=recipes)

    found, unread = usage.recipe_uses(area.clients, "222233334444")

    assert unread == [] and sorted(r.resource_id for r in found) == sorted(recipes)
    assert area.api_calls()["imagebuilder:ListImageRecipes"] == 2 + 1  # its own in 2 pages, none shared
