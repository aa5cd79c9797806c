"""The exact requests of usage reports, through botocore's Stubber: the report written under the
account's own prefix, reports read from each consumer's prefix only, and shares to an organization or
OU expanded at Organizations' largest page size (nested OUs included)."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import EndpointConnectionError
from botocore.response import StreamingBody
from botocore.stub import ANY, Stubber

from ami_janitor import engine
from ami_janitor.aws import usage
from ami_janitor.aws.clients import RegionClients
from ami_janitor.core.model import LaunchPermission, Reference, RegionInventory
from ami_janitor.core.policy import UsageReports, parse_policy
from builders import image

REGION = "us-east-1"
OWNER, CONSUMER = "123456789012", "222222222222"
INBOX = UsageReports(inbox="s3://usage-inbox/org/")
NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
ORG_ID = "o-abcdefghij"
ORG_ARN = f"arn:aws:organizations::{OWNER}:organization/{ORG_ID}"
OU_ARN = f"arn:aws:organizations::{OWNER}:ou/{ORG_ID}/ou-abcd-11111111"


class Stubbed:
    def __init__(self) -> None:
        session = boto3.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
        )
        config = Config(retries={"max_attempts": 1})
        services = ("s3", "sts", "organizations", "imagebuilder", "ssm")
        self.raw = {name: session.client(name, config=config) for name in services}  # type: ignore[call-overload]
        self.stubs = {name: Stubber(client) for name, client in self.raw.items()}
        for stub in self.stubs.values():
            stub.activate()
        self.clients = RegionClients(REGION, read_workers=1, **self.raw)

    def add(self, service: str, method: str, response: dict[str, Any], params: dict[str, Any]) -> None:
        self.stubs[service].add_response(method, response, params)

    def verify(self) -> None:
        for stub in self.stubs.values():
            stub.assert_no_pending_responses()


@pytest.fixture
def stubbed(fake_aws_env: None) -> Iterator[Stubbed]:
    yield (stubs := Stubbed())
    stubs.verify()


def body(data: dict[str, Any]) -> StreamingBody:
    raw = json.dumps(data).encode()
    return StreamingBody(io.BytesIO(raw), len(raw))


# What a consumer asks of Image Builder: its own recipes, at the largest page.
OWN_RECIPES = {"owner": "Self", "maxResults": 100}
SHARED_RECIPES = {"owner": "Shared", "maxResults": 100}  # other accounts', shared with it
NO_IMAGE_RECIPES: dict[str, Any] = {"imageRecipeSummaryList": []}
NO_CONTAINER_RECIPES: dict[str, Any] = {"containerRecipeSummaryList": []}


def _no_recipes(stubbed: Stubbed, *, image: bool = True) -> None:
    """Empty answers to the recipe listings (the image recipes' too, unless `image` is False)."""
    if image:
        stubbed.add("imagebuilder", "list_image_recipes", NO_IMAGE_RECIPES, OWN_RECIPES)
        stubbed.add("imagebuilder", "list_image_recipes", NO_IMAGE_RECIPES, SHARED_RECIPES)
    stubbed.add("imagebuilder", "list_container_recipes", NO_CONTAINER_RECIPES, OWN_RECIPES)
    stubbed.add("imagebuilder", "list_container_recipes", NO_CONTAINER_RECIPES, SHARED_RECIPES)


def _consumer_with_recipes(stubbed: Stubbed, recipes: list[dict[str, Any]]) -> None:
    """The consumer's account, then its own image recipes `recipes`; nothing else to list."""
    stubbed.add("sts", "get_caller_identity", {"Account": CONSUMER}, {})
    stubbed.add("imagebuilder", "list_image_recipes", {"imageRecipeSummaryList": recipes}, OWN_RECIPES)
    stubbed.add("imagebuilder", "list_image_recipes", NO_IMAGE_RECIPES, SHARED_RECIPES)
    _no_recipes(stubbed, image=False)


def _recipe_policy() -> Any:
    return parse_policy(
        {
            "regions": [REGION],
            "families": [{"name": "web", "match": {"name": "web-*"}}],
            "usage_reports": {"inbox": "s3://usage-inbox/org"},
        }
    )


def _put_report(stubbed: Stubbed, sent: dict[str, Any]) -> None:
    stubbed.add(
        "s3",
        "put_object",
        {},
        {
            "Bucket": "usage-inbox",
            "Key": f"org/reports/{CONSUMER}/{REGION}.json",
            "Body": ANY,
            "ContentType": "application/json",
        },
    )
    stubbed.raw["s3"].meta.events.register(
        "before-parameter-build.s3.PutObject", lambda params, **_: sent.update(params)
    )


def test_a_report_is_written_under_the_accounts_own_prefix(stubbed: Stubbed) -> None:
    own = image(image_id="ami-00000000000000000")
    inventory = RegionInventory(
        region=REGION,
        images=(own,),
        references=(
            Reference(
                image_id="ami-0ffffffffffffffff",
                kind="instance",
                resource_id="i-1",
                detail="used by instance i-1",
            ),
            Reference(
                image_id=own.image_id, kind="instance", resource_id="i-2", detail="used by instance i-2"
            ),
        ),
    )
    sent: dict[str, Any] = {}
    _put_report(stubbed, sent)

    key = usage.publish_report(stubbed.clients, INBOX, CONSUMER, inventory, NOW)

    assert key == f"org/reports/{CONSUMER}/{REGION}.json"
    report = json.loads(sent["Body"])
    # Only what other accounts own: the account's own AMI is its own plan's business.
    assert report == {
        "version": 1,
        "account": CONSUMER,
        "region": REGION,
        "generated_at": "2026-11-25T03:00:00Z",
        "uses": {"ami-0ffffffffffffffff": ["used by instance i-1"]},
    }


def _recipe(kind: str, name: str, image: str) -> dict[str, Any]:
    arn = f"arn:aws:imagebuilder:{REGION}:{CONSUMER}:{kind}-recipe/{name}/1.0.0"
    return {"arn": arn, "parentImage" if kind == "image" else "instanceImage": image}


def test_a_report_names_the_amis_the_accounts_image_builder_recipes_build_on(stubbed: Stubbed) -> None:
    """No reference source lists recipes, and DescribeImageReferences is asked about the account's own
    AMIs only: the report reads the image recipes (their parent image) and container recipes (their
    build instance's image) of the account and shared with it, 100 a page, and names each AMI of
    another account there. Read from the recipes, an AMI its owner disabled (no longer shared, so not
    visible) still counts. An image that stands for no other account's AMI is left out: an AWS-managed
    or its own Image Builder image, its own SSM parameter (which the parameter scan reads)."""
    shared, other, theirs, own = (f"ami-0{c * 16}" for c in "abcd")
    web, svc = _recipe("image", "web", shared), _recipe("container", "svc", other)
    from_them = {
        "arn": f"arn:aws:imagebuilder:{REGION}:{OWNER}:image-recipe/golden/2.0.0",
        "parentImage": theirs,
    }
    stubbed.add("sts", "get_caller_identity", {"Account": CONSUMER}, {})
    stubbed.add(
        "imagebuilder",
        "list_image_recipes",
        {"imageRecipeSummaryList": [web, _recipe("image", "mine", own)], "nextToken": "page-2"},
        OWN_RECIPES,
    )
    not_others = [
        f"arn:aws:imagebuilder:{REGION}:aws:image/amazon-linux-2-x86/x.x.x",
        f"arn:aws:imagebuilder:{REGION}:{CONSUMER}:image/base/1.0.0/1",
        "ssm:/base/ami",
        f"ssm:arn:aws:ssm:{REGION}:{CONSUMER}:parameter/base/ami",
        f"ssm:arn:aws:ssm:{REGION}::parameter/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
    ]
    stubbed.add(
        "imagebuilder",
        "list_image_recipes",
        {"imageRecipeSummaryList": [_recipe("image", f"n{n}", i) for n, i in enumerate(not_others)]},
        {**OWN_RECIPES, "nextToken": "page-2"},
    )
    stubbed.add("imagebuilder", "list_image_recipes", {"imageRecipeSummaryList": [from_them]}, SHARED_RECIPES)
    stubbed.add("imagebuilder", "list_container_recipes", {"containerRecipeSummaryList": [svc]}, OWN_RECIPES)
    stubbed.add("imagebuilder", "list_container_recipes", NO_CONTAINER_RECIPES, SHARED_RECIPES)
    sent: dict[str, Any] = {}
    _put_report(stubbed, sent)
    inventory = RegionInventory(region=REGION, images=(image(image_id=own),))

    answer = engine.publish_usage(_recipe_policy(), [inventory], lambda _: stubbed.clients, NOW)

    assert answer == {
        "usage_reports": [f"s3://usage-inbox/org/reports/{CONSUMER}/{REGION}.json"],
        "usage_problems": [],
    }
    report = json.loads(sent["Body"])
    assert report["uses"] == {
        shared: [f"referenced by image recipe {web['arn']} (parentImage)"],
        other: [f"referenced by container recipe {svc['arn']} (instanceImage)"],
        theirs: [f"referenced by image recipe {from_them['arn']} (parentImage)"],
    }
    assert "unread" not in report  # only where something could not be read (older owners refuse it)


def _built(arn: str, amis: dict[str, str]) -> dict[str, Any]:
    """GetImage's answer: the build version `arn`, its AMIs by region."""
    made = [{"region": region, "image": ami, "accountId": OWNER} for region, ami in amis.items()]
    return {"image": {"arn": arn, "outputResources": {"amis": made}}}


def test_another_accounts_image_builder_image_and_ssm_parameter_are_read_for_the_ami_they_stand_for(
    stubbed: Stubbed,
) -> None:
    """A recipe that builds on the golden image of the platform account names its Image Builder image
    (a version with wildcards: its latest available build) or its SSM parameter, not the AMI: the
    report reads each once (GetImage resolves a version as a build would; the parameters ten a call)
    and names the AMI it stands for in this region, so owners keep exactly that."""
    latest = f"arn:aws:imagebuilder:{REGION}:{OWNER}:image/golden/x.x.x"
    pinned = f"arn:aws:imagebuilder:{REGION}:{OWNER}:image/golden/1.0.0/4"
    parameter = f"arn:aws:ssm:{REGION}:{OWNER}:parameter/golden/current"
    newest, older, elsewhere, current = (f"ami-0{c * 16}" for c in "abcd")
    recipes = [
        _recipe("image", "a", latest),
        _recipe("image", "b", pinned),
        _recipe("image", "c", f"ssm:{parameter}"),
        _recipe("image", "d", latest),  # the same image: read once
    ]
    _consumer_with_recipes(stubbed, recipes)
    stubbed.add(
        "ssm",
        "get_parameters",
        {"Parameters": [{"Name": parameter, "Value": current, "DataType": "aws:ec2:image"}]},
        {"Names": [parameter], "WithDecryption": False},
    )
    build = latest.replace("x.x.x", "1.1.0/2")
    stubbed.add(
        "imagebuilder",
        "get_image",
        _built(pinned, {REGION: older}),
        {"imageBuildVersionArn": pinned},
    )
    stubbed.add(
        "imagebuilder",
        "get_image",
        _built(build, {REGION: newest, "eu-west-1": elsewhere}),
        {"imageBuildVersionArn": latest},
    )
    sent: dict[str, Any] = {}
    _put_report(stubbed, sent)

    answer = engine.publish_usage(
        _recipe_policy(), [RegionInventory(region=REGION)], lambda _: stubbed.clients, NOW
    )

    a, b, c, d = (r["arn"] for r in recipes)
    assert answer["usage_problems"] == []
    report = json.loads(sent["Body"])
    assert report["uses"] == {
        newest: [
            f"referenced by image recipe {a} (parentImage {latest})",
            f"referenced by image recipe {d} (parentImage {latest})",
        ],
        older: [f"referenced by image recipe {b} (parentImage {pinned})"],
        current: [f"referenced by image recipe {c} (parentImage ssm:{parameter})"],
    }
    assert "unread" not in report


def test_a_recipe_image_that_cannot_be_resolved_makes_the_report_incomplete(stubbed: Stubbed) -> None:
    """Another account's image or parameter whose AMI could not be read (refused, a build with no AMI
    here yet, missing, a value that is no AMI id, an ARN that is none: not asked, so that it fails no
    other parameter's call), or what is none of the known kinds: the report says so, and owners keep
    what they share with the account."""
    image_arn = f"arn:aws:imagebuilder:{REGION}:{OWNER}:image/golden/1.0.0/4"
    building = f"arn:aws:imagebuilder:{REGION}:{OWNER}:image/golden/2.0.0/1"
    missing = f"arn:aws:ssm:{REGION}:{OWNER}:parameter/golden/gone"
    odd_value = f"arn:aws:ssm:{REGION}:{OWNER}:parameter/golden/name"
    recipes = [
        _recipe("image", "a", image_arn),
        _recipe("image", "b", f"ssm:{missing}"),
        _recipe("image", "c", f"ssm:{odd_value}"),
        _recipe("image", "d", "odd"),
        _recipe("image", "e", building),
        _recipe("image", "f", "ssm:arn:aws"),
    ]
    _consumer_with_recipes(stubbed, recipes)
    stubbed.add(
        "ssm",
        "get_parameters",
        {"Parameters": [{"Name": odd_value, "Value": "golden-2026"}], "InvalidParameters": [missing]},
        {"Names": [missing, odd_value], "WithDecryption": False},
    )
    stubbed.stubs["imagebuilder"].add_client_error(
        "get_image",
        service_error_code="ForbiddenException",
        service_message="not shared with this account",
        http_status_code=403,
        expected_params={"imageBuildVersionArn": image_arn},
    )
    stubbed.add(
        "imagebuilder",
        "get_image",
        {"image": {"arn": building, "state": {"status": "BUILDING"}}},
        {"imageBuildVersionArn": building},
    )
    sent: dict[str, Any] = {}
    _put_report(stubbed, sent)

    answer = engine.publish_usage(
        _recipe_policy(), [RegionInventory(region=REGION)], lambda _: stubbed.clients, NOW
    )

    a, b, c, d, e, f = (r["arn"] for r in recipes)
    unread = [
        f"image recipe {d}: its parentImage 'odd' is neither an AMI id, an SSM parameter nor an Image Builder image",
        f"image recipe {a}: its parentImage {image_arn} is not resolved: imagebuilder:GetImage {image_arn}: "
        "ForbiddenException: not shared with this account",
        f"image recipe {e}: its parentImage {building} is not resolved: build {building} (BUILDING) has no "
        f"AMI in {REGION}",
        f"image recipe {f}: its parentImage ssm:arn:aws is not resolved: not a parameter ARN",
        f"image recipe {b}: its parentImage ssm:{missing} is not resolved: not found, or not shared with the account",
        f"image recipe {c}: its parentImage ssm:{odd_value} is not resolved: its value 'golden-2026' is not an AMI id",
    ]
    assert json.loads(sent["Body"])["unread"] == unread
    assert answer["usage_problems"] == [
        f"{REGION}: usage report incomplete (owners keep what they share): {u}" for u in unread
    ]


def test_a_failed_parameter_read_leaves_every_parameter_unresolved(stubbed: Stubbed) -> None:
    parameter = f"arn:aws:ssm:{REGION}:{OWNER}:parameter/golden/current"
    recipe = _recipe("image", "a", f"ssm:{parameter}")
    _consumer_with_recipes(stubbed, [recipe])
    stubbed.stubs["ssm"].add_client_error(
        "get_parameters",
        service_error_code="AccessDeniedException",
        service_message="no ssm:GetParameters",
        http_status_code=400,
        expected_params={"Names": [parameter], "WithDecryption": False},
    )
    sent: dict[str, Any] = {}
    _put_report(stubbed, sent)

    engine.publish_usage(_recipe_policy(), [RegionInventory(region=REGION)], lambda _: stubbed.clients, NOW)

    assert json.loads(sent["Body"])["unread"] == [
        f"image recipe {recipe['arn']}: its parentImage ssm:{parameter} is not resolved: ssm:GetParameters: "
        "AccessDeniedException: no ssm:GetParameters"
    ]


def test_recipes_that_cannot_be_read_send_a_report_that_says_so(stubbed: Stubbed) -> None:
    """A report without the recipes it should name would let owners retire what they build on; none
    at all would read as an account that runs no janitor where reports are not required. The report
    goes out saying what it could not read, which keeps (below), and the run counts a failure."""
    stubbed.add("sts", "get_caller_identity", {"Account": CONSUMER}, {})
    stubbed.stubs["imagebuilder"].add_client_error(
        "list_image_recipes",
        service_error_code="AccessDeniedException",
        service_message="explicit deny in a service control policy",
        http_status_code=403,
        expected_params=OWN_RECIPES,
    )
    stubbed.add("imagebuilder", "list_image_recipes", NO_IMAGE_RECIPES, SHARED_RECIPES)
    _no_recipes(stubbed, image=False)
    sent: dict[str, Any] = {}
    _put_report(stubbed, sent)

    answer = engine.publish_usage(
        _recipe_policy(), [RegionInventory(region=REGION)], lambda _: stubbed.clients, NOW
    )

    unread = "imagebuilder:ListImageRecipes (Self): AccessDeniedException: explicit deny in a service control policy"
    assert answer["usage_reports"] == [f"s3://usage-inbox/org/reports/{CONSUMER}/{REGION}.json"]
    assert answer["usage_problems"] == [
        f"{REGION}: usage report incomplete (owners keep what they share): {unread}"
    ]
    assert json.loads(sent["Body"])["unread"] == [unread]


def test_an_incomplete_report_keeps_what_is_shared_with_its_account(stubbed: Stubbed) -> None:
    key = f"org/reports/{CONSUMER}/{REGION}.json"
    unread = "imagebuilder:ListImageRecipes: ThrottlingException: Rate exceeded"
    written = {"account": CONSUMER, "region": REGION, "generated_at": "2026-11-25T02:00:00Z"}
    stubbed.add(
        "s3",
        "get_object",
        {"Body": body({**written, "uses": {}, "unread": [unread]}), "LastModified": NOW},
        {"Bucket": "usage-inbox", "Key": key},
    )

    received = usage.read_report(stubbed.raw["s3"], INBOX, CONSUMER, REGION)

    assert received is not None and received.problem == f"{key} is incomplete: {unread}"


def test_an_owner_reads_each_consumers_report_from_its_prefix_and_dates_it_by_s3(stubbed: Stubbed) -> None:
    shared = image(image_id="ami-00000000000000001").model_copy(
        update={"launch_permissions": (LaunchPermission(kind="user", value=CONSUMER),)}
    )
    inventory = RegionInventory(region=REGION, images=(shared,))
    stubbed.add("sts", "get_caller_identity", {"Account": OWNER}, {})
    written = NOW - timedelta(hours=3)
    report = {"version": 1, "account": CONSUMER, "region": REGION, "generated_at": "2026-11-20T00:00:00Z"}
    stubbed.add(
        "s3",
        "get_object",
        {
            "Body": body({**report, "uses": {shared.image_id: ["referenced by launch template lt-1"]}}),
            "LastModified": written,
        },
        {"Bucket": "usage-inbox", "Key": f"org/reports/{CONSUMER}/{REGION}.json"},
    )

    loaded = usage.load_usage(stubbed.clients, INBOX, inventory, [shared.image_id])

    assert loaded.usage is not None
    received = loaded.usage.reports[CONSUMER]
    assert received.received_at == written  # S3's date, not the body's generated_at
    assert received.uses == {shared.image_id: ("referenced by launch template lt-1",)}


def test_a_missing_report_is_none_and_an_unreadable_one_says_why(stubbed: Stubbed) -> None:
    key = f"org/reports/{CONSUMER}/{REGION}.json"
    stubbed.stubs["s3"].add_client_error(
        "get_object",
        service_error_code="NoSuchKey",
        http_status_code=404,
        expected_params={"Bucket": "usage-inbox", "Key": key},
    )
    stubbed.stubs["s3"].add_client_error(
        "get_object",
        service_error_code="AccessDenied",
        http_status_code=403,
        expected_params={"Bucket": "usage-inbox", "Key": key},
    )
    stubbed.add(
        "s3",
        "get_object",
        {"Body": body({"account": CONSUMER}), "LastModified": NOW},
        {"Bucket": "usage-inbox", "Key": key},
    )

    assert usage.read_report(stubbed.raw["s3"], INBOX, CONSUMER, REGION) is None
    denied = usage.read_report(stubbed.raw["s3"], INBOX, CONSUMER, REGION)
    assert denied is not None and denied.problem is not None and "AccessDenied" in denied.problem
    malformed = usage.read_report(stubbed.raw["s3"], INBOX, CONSUMER, REGION)
    assert malformed is not None and malformed.problem is not None and "region" in malformed.problem


def test_shares_to_the_organization_and_an_ou_are_expanded_at_the_largest_page(stubbed: Stubbed) -> None:
    org = "organizations"
    stubbed.add(org, "describe_organization", {"Organization": {"Id": ORG_ID, "Arn": ORG_ARN}}, {})
    stubbed.add(
        org,
        "list_accounts",
        {
            "Accounts": [
                {"Id": "111111111111", "Status": "ACTIVE"},
                {"Id": "444444444444", "Status": "SUSPENDED"},
                {"Id": "777777777777", "State": "PENDING_CLOSURE"},
                {"Id": "888888888888", "State": "CLOSED"},
            ],
            "NextToken": "t",
        },
        {"MaxResults": 20},
    )
    stubbed.add(
        org,
        "list_accounts",
        {"Accounts": [{"Id": CONSUMER, "State": "ACTIVE"}]},
        {"MaxResults": 20, "NextToken": "t"},
    )
    stubbed.add(
        org,
        "list_accounts_for_parent",
        {"Accounts": [{"Id": "555555555555", "Status": "ACTIVE"}]},
        {"ParentId": "ou-abcd-11111111", "MaxResults": 20},
    )
    stubbed.add(
        org,
        "list_children",
        {"Children": [{"Id": "ou-abcd-22222222", "Type": "ORGANIZATIONAL_UNIT"}]},
        {"ParentId": "ou-abcd-11111111", "ChildType": "ORGANIZATIONAL_UNIT", "MaxResults": 20},
    )
    stubbed.add(
        org,
        "list_accounts_for_parent",
        {"Accounts": [{"Id": "666666666666", "Status": "ACTIVE"}]},
        {"ParentId": "ou-abcd-22222222", "MaxResults": 20},
    )
    stubbed.add(
        org,
        "list_children",
        {"Children": []},
        {"ParentId": "ou-abcd-22222222", "ChildType": "ORGANIZATIONAL_UNIT", "MaxResults": 20},
    )

    expansions, notes = usage.expand_grants(
        stubbed.raw[org],
        [
            f"org:{ORG_ARN}",
            f"ou:{OU_ARN}",
            "ou:arn:aws:organizations::999999999999:ou/o-zzzzzzzzzz/ou-zz-zzzzzzzz",
            f"org:arn:aws:organizations::999999999999:organization/{ORG_ID}xy",
        ],
    )

    assert notes == []
    assert expansions == {
        # A suspended account (or one pending closure) may be reinstated: still a consumer. A closed
        # one is gone.
        f"org:{ORG_ARN}": ("111111111111", CONSUMER, "444444444444", "777777777777"),
        f"ou:{OU_ARN}": ("555555555555", "666666666666"),
        # Another organization's OU: its accounts cannot be known here.
        "ou:arn:aws:organizations::999999999999:ou/o-zzzzzzzzzz/ou-zz-zzzzzzzz": None,
        # An organization whose id only begins with ours is another.
        f"org:arn:aws:organizations::999999999999:organization/{ORG_ID}xy": None,
    }


def test_an_account_that_may_not_read_organizations_knows_no_expansion(stubbed: Stubbed) -> None:
    stubbed.stubs["organizations"].add_client_error(
        "describe_organization",
        service_error_code="AccessDeniedException",
        http_status_code=400,
        expected_params={},
    )

    expansions, notes = usage.expand_grants(stubbed.raw["organizations"], [f"ou:{OU_ARN}"])

    assert expansions == {f"ou:{OU_ARN}": None}
    assert notes and "AccessDeniedException" in notes[0]


def test_the_account_and_an_organizations_accounts_are_asked_once_per_run(stubbed: Stubbed) -> None:
    """Two regions of one run (a ClientFactory's regions share their run facts): one GetCallerIdentity,
    one expansion of the organization; each region reads its own reports."""
    facts: dict[str, Any] = {}
    regions = [
        RegionClients(region, read_workers=1, run_facts=facts, **stubbed.raw)
        for region in (REGION, "eu-west-1")
    ]
    shared = image(image_id="ami-00000000000000001").model_copy(
        update={"launch_permissions": (LaunchPermission(kind="org", value=ORG_ARN),)}
    )
    stubbed.add("sts", "get_caller_identity", {"Account": OWNER}, {})
    stubbed.add(
        "organizations", "describe_organization", {"Organization": {"Id": ORG_ID, "Arn": ORG_ARN}}, {}
    )
    stubbed.add(
        "organizations",
        "list_accounts",
        {"Accounts": [{"Id": CONSUMER, "State": "ACTIVE"}]},
        {"MaxResults": 20},
    )
    for clients in regions:
        report = {
            "version": 1,
            "account": CONSUMER,
            "region": clients.region,
            "generated_at": "2026-11-25T00:00:00Z",
        }
        stubbed.add(
            "s3",
            "get_object",
            {"Body": body({**report, "uses": {}}), "LastModified": NOW},
            {"Bucket": "usage-inbox", "Key": f"org/reports/{CONSUMER}/{clients.region}.json"},
        )

    loaded = [
        usage.load_usage(
            clients, INBOX, RegionInventory(region=clients.region, images=(shared,)), [shared.image_id]
        )
        for clients in regions
    ]

    for inventory in loaded:
        assert inventory.usage is not None and inventory.usage.own_account == OWNER
        assert inventory.usage.expansions == {f"org:{ORG_ARN}": (CONSUMER,)}
        assert set(inventory.usage.reports) == {CONSUMER}
    assert usage.own_account(regions[1]) == OWNER  # the run's report publisher asks nothing more


def test_an_expansion_organizations_refused_is_asked_again_in_the_next_region(stubbed: Stubbed) -> None:
    facts: dict[str, Any] = {}
    regions = [
        RegionClients(region, read_workers=1, run_facts=facts, **stubbed.raw)
        for region in (REGION, "eu-west-1")
    ]
    for _ in regions:
        stubbed.stubs["organizations"].add_client_error(
            "describe_organization", service_error_code="AccessDeniedException", http_status_code=400
        )
    expansions = [usage._expansions(clients, {f"org:{ORG_ARN}"}) for clients in regions]
    assert all(found == {f"org:{ORG_ARN}": None} and notes for found, notes in expansions)


# moto does not check ExpectedBucketOwner (it answers a bucket of any account): the Stubber does.
OWNED_INBOX = UsageReports(inbox="s3://usage-inbox/org/", inbox_account="999988887777")
OWNER_CHECK = {"ExpectedBucketOwner": "999988887777"}


def test_with_inbox_account_every_call_on_the_inbox_asks_s3_to_check_its_owner(stubbed: Stubbed) -> None:
    key = f"org/reports/{CONSUMER}/{REGION}.json"
    stubbed.add(
        "s3",
        "put_object",
        {},
        {"Bucket": "usage-inbox", "Key": key, "Body": ANY, "ContentType": "application/json", **OWNER_CHECK},
    )
    report = {"version": 1, "account": CONSUMER, "region": REGION, "generated_at": "2026-11-25T00:00:00Z"}
    stubbed.add(
        "s3",
        "get_object",
        {"Body": body({**report, "uses": {}}), "LastModified": NOW},
        {"Bucket": "usage-inbox", "Key": key, **OWNER_CHECK},
    )

    usage.publish_report(stubbed.clients, OWNED_INBOX, CONSUMER, RegionInventory(region=REGION), NOW)
    received = usage.read_report(stubbed.raw["s3"], OWNED_INBOX, CONSUMER, REGION)

    assert received is not None and received.problem is None


def test_a_bucket_of_another_account_is_an_unreadable_report_naming_the_owner_check(stubbed: Stubbed) -> None:
    shared = image(image_id="ami-00000000000000001").model_copy(
        update={"launch_permissions": (LaunchPermission(kind="user", value=CONSUMER),)}
    )
    stubbed.add("sts", "get_caller_identity", {"Account": OWNER}, {})
    stubbed.stubs["s3"].add_client_error(
        "get_object",
        service_error_code="AccessDenied",
        http_status_code=403,
        expected_params={
            "Bucket": "usage-inbox",
            "Key": f"org/reports/{CONSUMER}/{REGION}.json",
            **OWNER_CHECK,
        },
    )

    loaded = usage.load_usage(
        stubbed.clients, OWNED_INBOX, RegionInventory(region=REGION, images=(shared,)), [shared.image_id]
    )

    assert loaded.usage is not None
    problem = loaded.usage.reports[CONSUMER].problem  # a report with a problem keeps what is shared
    assert problem is not None and "AccessDenied" in problem
    assert "not owned by 999988887777, usage_reports.inbox_account" in problem


def test_a_report_refused_by_the_owner_check_is_a_failed_publish(stubbed: Stubbed) -> None:
    policy = parse_policy(
        {
            "regions": [REGION],
            "families": [{"name": "web", "match": {"name": "web-*"}}],
            "usage_reports": {"inbox": "s3://usage-inbox/org", "inbox_account": "999988887777"},
        }
    )
    stubbed.add("sts", "get_caller_identity", {"Account": CONSUMER}, {})
    _no_recipes(stubbed)
    stubbed.stubs["s3"].add_client_error(
        "put_object",
        service_error_code="AccessDenied",
        http_status_code=403,
        expected_params={
            "Bucket": "usage-inbox",
            "Key": f"org/reports/{CONSUMER}/{REGION}.json",
            "Body": ANY,
            "ContentType": "application/json",
            **OWNER_CHECK,
        },
    )

    sent = engine.publish_usage(policy, [RegionInventory(region=REGION)], lambda _: stubbed.clients, NOW)

    assert sent["usage_reports"] == []
    [problem] = sent["usage_problems"]  # counted as failed: the run exits 1
    assert problem.startswith(f"{REGION}: usage report not sent: s3:PutObject: ")
    assert "not owned by 999988887777, usage_reports.inbox_account" in problem


def test_a_list_accounts_answer_without_its_accounts_is_no_expansion(stubbed: Stubbed) -> None:
    """An organization always holds at least its management account: an answer that lists no
    Accounts key at all says nothing of its members, and must not read as an organization of none."""
    org = "organizations"
    stubbed.add(org, "describe_organization", {"Organization": {"Id": ORG_ID, "Arn": ORG_ARN}}, {})
    stubbed.add(org, "list_accounts", {}, {"MaxResults": 20})

    expansions, notes = usage.expand_grants(stubbed.raw[org], [f"org:{ORG_ARN}"])

    assert expansions == {f"org:{ORG_ARN}": None} and notes, (expansions, notes)


def test_an_ou_listed_again_among_its_own_children_is_read_once(stubbed: Stubbed) -> None:
    """A ListChildren answer naming the OU itself (or an ancestor) is not followed again: it recursed
    until a RecursionError, which nothing caught, and the run crashed."""
    org = "organizations"
    stubbed.add(org, "describe_organization", {"Organization": {"Id": ORG_ID, "Arn": ORG_ARN}}, {})
    stubbed.add(
        org,
        "list_accounts_for_parent",
        {"Accounts": [{"Id": "555555555555", "Status": "ACTIVE"}]},
        {"ParentId": "ou-abcd-11111111", "MaxResults": 20},
    )
    stubbed.add(
        org,
        "list_children",
        {"Children": [{"Id": "ou-abcd-11111111", "Type": "ORGANIZATIONAL_UNIT"}]},
        {"ParentId": "ou-abcd-11111111", "ChildType": "ORGANIZATIONAL_UNIT", "MaxResults": 20},
    )

    expansions, notes = usage.expand_grants(stubbed.raw[org], [f"ou:{OU_ARN}"])

    assert (expansions, notes) == ({f"ou:{OU_ARN}": ("555555555555",)}, [])


class _Unreachable:
    """An Image Builder client whose every call fails to connect, the DNS answering `errno`."""

    def __init__(self, errno: int) -> None:
        self.errno = errno
        self.meta = SimpleNamespace(region_name=REGION)

    def get_paginator(self, operation: str) -> Any:
        return SimpleNamespace(paginate=lambda **_: self._fail())

    def _fail(self) -> Any:
        host = f"imagebuilder.{REGION}.amazonaws.com"
        try:
            raise socket.gaierror(self.errno, "no answer")
        except socket.gaierror as resolution:
            raise EndpointConnectionError(endpoint_url=f"https://{host}/", error=resolution) from None


@pytest.mark.parametrize("errno", [socket.EAI_NONAME, socket.EAI_AGAIN])
def test_only_a_region_whose_image_builder_host_does_not_exist_has_no_recipes(errno: int) -> None:
    """A host that does not resolve (a region without Image Builder) has no recipes to report; a DNS
    that could not answer is a failed read, which makes the report incomplete (and keeps)."""
    clients = RegionClients(REGION, read_workers=1, imagebuilder=_Unreachable(errno))

    found, unread = usage.recipe_uses(clients, CONSUMER)

    assert found == []
    if errno == socket.EAI_NONAME:
        assert unread == []
    else:
        assert len(unread) == 4 and all("EndpointConnectionError" in u for u in unread), unread
