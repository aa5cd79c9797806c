"""Usage reports between two accounts on the emulator (credentials from sts:AssumeRole on a role of
account N act as account N): the owner shares an AMI, the consumer's launch template uses it and its
scheduled run reports that to the owner's inbox; the owner's plan keeps the AMI while the report is
fresh and says so, keeps it when the report is stale or missing, and lets it retire once the consumer
reports it unused. A report under another account's prefix is not believed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from botocore.session import Session

from ami_janitor import engine
from ami_janitor.aws.clients import ClientFactory
from ami_janitor.core.model import Decision
from ami_janitor.core.policy import Policy, parse_policy
from ami_janitor.core.slices import WorkSlice
from ami_janitor.demo import emulator
from server import make_ledger
from server import now as wall_clock
from sessions import botocore_session

US = "us-east-1"
OWNER = "123456789012"
CONSUMER = "222222222222"
OTHER = "333333333333"
INBOX = "usage-inbox"


def policy(accounts: list[str], *, required: bool = True, units: tuple[str, ...] = ()) -> Policy:
    return parse_policy(
        {
            "mode": "dry-run",
            "regions": [US],
            "defaults": {
                "keep_latest": 1,
                "min_age_days": 7,
                "lifecycle": {"deprecate_after_days": 0, "disable_after_days": 0, "deregister_after_days": 0},
                "limits": {"max_actions_per_run": 100, "max_fraction_per_family": 1.0},
            },
            "families": [
                {
                    "name": "web",
                    "match": {"name": "web-*"},
                    "share_with": {"accounts": accounts, "organizational_units": list(units)},
                }
            ],
            "usage_reports": {"inbox": f"s3://{INBOX}/org", "max_age_hours": 48, "required": required},
        }
    )


def session_of(account: str) -> Session:
    """A session acting as `account`, as the emulator maps an assumed role's credentials."""
    credentials = boto3.client("sts", region_name=US).assume_role(
        RoleArn=f"arn:aws:iam::{account}:role/ami-janitor/scheduled", RoleSessionName="ami-janitor"
    )["Credentials"]
    return botocore_session(
        US, credentials["AccessKeyId"], credentials["SecretAccessKey"], credentials["SessionToken"]
    )


@dataclass
class Accounts:
    owner: ClientFactory
    consumer: ClientFactory
    shared: str  # the owner's oldest AMI, shared with the consumer
    unshared: str  # as old, shared with nobody
    template: str  # the consumer's launch template that uses `shared`


@pytest.fixture
def accounts(endpoint: str) -> Iterator[Accounts]:
    owner = ClientFactory(botocore_session(US))
    ec2 = owner(US).ec2
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    images = [ec2.create_image(InstanceId=instance, Name=f"web-{n:02d}")["ImageId"] for n in range(3)]
    for age, image_id in zip((40, 35, 1), images, strict=True):
        emulator.set_image_fields(US, image_id, creation_date=wall_clock() - timedelta(days=age))
    ec2.terminate_instances(InstanceIds=[instance])
    shared, unshared = images[0], images[1]
    ec2.modify_image_attribute(ImageId=shared, LaunchPermission={"Add": [{"UserId": CONSUMER}]})
    owner(US).s3.create_bucket(Bucket=INBOX)
    consumer = ClientFactory(session_of(CONSUMER))
    template = consumer(US).ec2.create_launch_template(
        LaunchTemplateName="web-fleet", LaunchTemplateData={"ImageId": shared, "InstanceType": "t3.micro"}
    )["LaunchTemplate"]["LaunchTemplateId"]
    yield Accounts(owner, consumer, shared, unshared, template)


def weekly_enforce() -> Policy:
    """The owner's policy, enforced (with its ledger), disabling at once and deregistering a week later."""
    make_ledger((US,))
    weekly = policy([CONSUMER]).model_dump(mode="json", by_alias=True, exclude_none=True)
    weekly["mode"] = "enforce"
    weekly["defaults"]["lifecycle"] = {
        "deprecate_after_days": 0,
        "disable_after_days": 0,
        "deregister_after_days": 7,
    }
    return parse_policy(weekly)


def owner_plan(accounts: Accounts, at: datetime, *, units: tuple[str, ...] = ()) -> dict[str, Decision]:
    result = engine.run(policy([CONSUMER], units=units), [US], accounts.owner, at, apply=False)
    assert [r.status for r in result.plan.regions] == ["ok"]
    return {d.image_id: d for d in result.plan.decisions}


def consumer_run(accounts: Accounts, at: datetime) -> engine.RunResult:
    return engine.run(policy([CONSUMER]), [US], accounts.consumer, at, apply=False, publish_reports=True)


def report_body(accounts: Accounts, account: str) -> dict[str, object]:
    key = f"org/reports/{account}/{US}.json"
    return json.loads(accounts.owner(US).s3.get_object(Bucket=INBOX, Key=key)["Body"].read())  # type: ignore[no-any-return]


def test_the_consumer_reports_what_it_uses_under_its_own_prefix(accounts: Accounts) -> None:
    result = consumer_run(accounts, wall_clock())

    assert result.usage_reports == [f"s3://{INBOX}/org/reports/{CONSUMER}/{US}.json"]
    assert result.usage_problems == [] and result.exit_code == 0
    body = report_body(accounts, CONSUMER)
    assert body["account"] == CONSUMER and body["region"] == US
    uses = body["uses"]
    assert isinstance(uses, dict) and list(uses) == [accounts.shared]
    assert any(accounts.template in detail for detail in uses[accounts.shared])


def test_a_region_read_in_part_sends_no_report_and_the_run_exits_1(accounts: Accounts) -> None:
    """A report written from a partial inventory would leave out what the unread source uses, and its
    owner would retire it: the region sends nothing, and its last report grows stale (fail safe)."""
    consumer_run(accounts, wall_clock())
    before = accounts.owner(US).s3.head_object(Bucket=INBOX, Key=f"org/reports/{CONSUMER}/{US}.json")
    session = session_of(CONSUMER)

    def refuse(**_: object) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "DescribeParameters")

    session.register("before-call.ssm.DescribeParameters", refuse)

    result = engine.run(
        policy([CONSUMER]), [US], ClientFactory(session), wall_clock(), apply=False, publish_reports=True
    )

    assert [r.status for r in result.plan.regions] == ["skipped"]
    assert result.usage_reports == [] and result.exit_code == 1
    after = accounts.owner(US).s3.head_object(Bucket=INBOX, Key=f"org/reports/{CONSUMER}/{US}.json")
    assert after["ETag"] == before["ETag"] and after["LastModified"] == before["LastModified"]
    assert list(report_body(accounts, CONSUMER)["uses"]) == [accounts.shared]


def test_the_owner_keeps_an_ami_a_fresh_report_says_is_used(accounts: Accounts) -> None:
    consumer_run(accounts, wall_clock())

    decisions = owner_plan(accounts, wall_clock())

    kept = decisions[accounts.shared]
    assert kept.action == "keep"
    assert any(
        r.startswith(f"used in account {CONSUMER} by ") and accounts.template in r and "(report of " in r
        for r in kept.reasons
    ), kept.reasons
    # What is shared with nobody retires as before.
    assert decisions[accounts.unshared].action == "deregister"


def test_a_stale_or_missing_report_keeps_the_shared_ami(accounts: Accounts) -> None:
    missing = owner_plan(accounts, wall_clock())[accounts.shared]
    assert missing.action == "keep"
    assert any(f"account {CONSUMER}, which has sent no usage report" in r for r in missing.reasons)

    consumer_run(accounts, wall_clock())
    later = wall_clock() + timedelta(hours=49)
    stale = owner_plan(accounts, later)[accounts.shared]
    assert stale.action == "keep"
    assert any("older than 48 hours: kept (fail safe)" in r for r in stale.reasons), stale.reasons


def test_once_the_consumer_reports_it_unused_the_ami_retires(accounts: Accounts) -> None:
    consumer_run(accounts, wall_clock())
    assert owner_plan(accounts, wall_clock())[accounts.shared].action == "keep"

    accounts.consumer(US).ec2.delete_launch_template(LaunchTemplateId=accounts.template)
    consumer_run(accounts, wall_clock())

    assert report_body(accounts, CONSUMER)["uses"] == {}
    retiring = owner_plan(accounts, wall_clock())[accounts.shared]
    assert retiring.action == "deregister", retiring.reasons


def recipe_builder(recipes: list[dict[str, str]]) -> Session:
    """The consumer's session, its Image Builder answering `recipes` as its own image recipes (moto has
    no Image Builder: the emulator answers it as a partition without it)."""
    session = session_of(CONSUMER)
    lists = {
        "ListImageRecipes": "imageRecipeSummaryList",
        "ListContainerRecipes": "containerRecipeSummaryList",
    }
    for operation, key in lists.items():

        def answer(key: str = key, **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
            return AWSResponse("", 200, {}, None), {key: recipes if key == "imageRecipeSummaryList" else []}

        session.register(f"before-call.imagebuilder.{operation}", answer)
    return session


def test_the_owner_keeps_and_rescues_an_ami_a_consumers_image_builder_recipe_builds_on(
    accounts: Accounts,
) -> None:
    """The consumer's only use of the shared AMI is an Image Builder recipe's parent image: its report
    names it (no reference source lists recipes), and the owner keeps it. Once disabled (its launch
    permission gone, so the consumer no longer sees it), the recipe still names it: the owner rescues it."""
    recipe = {"arn": f"arn:aws:imagebuilder:{US}:{CONSUMER}:image-recipe/web-build/1.0.0"}
    accounts.consumer(US).ec2.delete_launch_template(LaunchTemplateId=accounts.template)
    builds = ClientFactory(recipe_builder([{**recipe, "parentImage": accounts.shared}]))

    def consumer_with_recipe() -> engine.RunResult:
        return engine.run(policy([CONSUMER]), [US], builds, wall_clock(), apply=False, publish_reports=True)

    result = consumer_with_recipe()

    assert result.usage_problems == [] and result.exit_code == 0
    reported = f"referenced by image recipe {recipe['arn']} (parentImage)"
    assert report_body(accounts, CONSUMER)["uses"] == {accounts.shared: [reported]}
    kept = owner_plan(accounts, wall_clock())[accounts.shared]
    assert kept.action == "keep"
    assert any(f"used in account {CONSUMER} by image recipe {recipe['arn']}" in r for r in kept.reasons), (
        kept.reasons
    )
    assert owner_plan(accounts, wall_clock())[accounts.unshared].action == "deregister"

    # Disabled on an earlier report that did not name it (the recipe made since), then reported again.
    enforce = weekly_enforce()
    consumer_run(accounts, wall_clock())  # no recipe yet
    engine.run(enforce, [US], accounts.owner, wall_clock(), apply=True)
    owner_ec2 = accounts.owner(US).ec2
    assert owner_ec2.describe_images(ImageIds=[accounts.shared])["Images"][0]["State"] == "disabled"
    consumer_with_recipe()

    again = engine.run(enforce, [US], accounts.owner, wall_clock() + timedelta(hours=1), apply=True)

    rescued = next(d for d in again.plan.decisions if d.image_id == accounts.shared)
    assert rescued.action == "rescue", rescued.reasons
    assert owner_ec2.describe_images(ImageIds=[accounts.shared])["Images"][0]["State"] == "available"


def test_a_consumer_whose_recipes_cannot_be_read_sends_a_report_that_keeps(accounts: Accounts) -> None:
    """An SCP that denies Image Builder: the report goes out saying so (an account that sent none
    would be taken, without `required`, for one that runs no janitor), and the owner keeps."""
    session = session_of(CONSUMER)

    def deny(**_: Any) -> None:
        raise ClientError(
            {"Error": {"Code": "AccessDeniedException", "Message": "explicit deny"}}, "ListImageRecipes"
        )

    session.register("before-call.imagebuilder.ListImageRecipes", deny)
    accounts.consumer(US).ec2.delete_launch_template(LaunchTemplateId=accounts.template)

    result = engine.run(
        policy([CONSUMER], required=False),
        [US],
        ClientFactory(session),
        wall_clock(),
        apply=False,
        publish_reports=True,
    )

    assert result.usage_reports and result.exit_code == 1
    # Its own recipes and those shared with it: neither could be read.
    assert [p.split(": ")[1:3] for p in result.usage_problems] == [
        ["usage report incomplete (owners keep what they share)", f"imagebuilder:ListImageRecipes ({owner})"]
        for owner in ("Self", "Shared")
    ]
    assert all("AccessDeniedException" in p for p in result.usage_problems)
    owner = engine.run(policy([CONSUMER], required=False), [US], accounts.owner, wall_clock(), apply=False)
    kept = next(d for d in owner.plan.decisions if d.image_id == accounts.shared)
    assert kept.action == "keep"
    assert any(
        "is incomplete: imagebuilder:ListImageRecipes (Self): AccessDeniedException" in r
        for r in kept.reasons
    ), kept.reasons


def test_without_required_a_missing_report_is_noted_not_kept(accounts: Accounts) -> None:
    result = engine.run(policy([CONSUMER], required=False), [US], accounts.owner, wall_clock(), apply=False)

    decision = next(d for d in result.plan.decisions if d.image_id == accounts.shared)
    assert decision.action == "deregister"
    assert any(f"account {CONSUMER} sent no usage report" in n for n in result.plan.notes), result.plan.notes


def test_without_required_a_missing_report_of_an_account_that_reports_elsewhere_keeps(
    accounts: Accounts,
) -> None:
    """The account runs the janitor (it reports for eu-west-1), but sent nothing for us-east-1: its stack
    there failed or is not deployed yet, not "it runs no janitor". The shared AMI is kept."""
    eu = {"account": CONSUMER, "region": "eu-west-1", "generated_at": "2026-12-01T00:00:00Z", "uses": {}}
    accounts.consumer(US).s3.put_object(
        Bucket=INBOX, Key=f"org/reports/{CONSUMER}/eu-west-1.json", Body=json.dumps(eu).encode()
    )

    result = engine.run(policy([CONSUMER], required=False), [US], accounts.owner, wall_clock(), apply=False)

    decision = next(d for d in result.plan.decisions if d.image_id == accounts.shared)
    assert decision.action == "keep"
    assert any(
        f"no report for {US}, though the account reports for other regions" in r for r in decision.reasons
    ), decision.reasons
    assert not any(f"account {CONSUMER} sent no usage report" in n for n in result.plan.notes)


def test_a_report_under_another_accounts_prefix_is_not_believed(accounts: Accounts) -> None:
    """The consumer writes, under the prefix of a third account the AMI is also shared with, a report
    that names the consumer; and under its own prefix a report that names the third account. Neither is
    believed: each keeps the AMI (fail safe)."""
    owner_ec2 = accounts.owner(US).ec2
    owner_ec2.modify_image_attribute(ImageId=accounts.shared, LaunchPermission={"Add": [{"UserId": OTHER}]})
    s3 = accounts.consumer(US).s3
    forged = {"version": 1, "region": US, "generated_at": wall_clock().isoformat(), "uses": {}}
    s3.put_object(
        Bucket=INBOX, Key=f"org/reports/{OTHER}/{US}.json", Body=json.dumps({**forged, "account": CONSUMER})
    )
    s3.put_object(
        Bucket=INBOX, Key=f"org/reports/{CONSUMER}/{US}.json", Body=json.dumps({**forged, "account": OTHER})
    )

    result = engine.run(policy([CONSUMER, OTHER]), [US], accounts.owner, wall_clock(), apply=False)

    kept = next(d for d in result.plan.decisions if d.image_id == accounts.shared)
    assert kept.action == "keep"
    assert any(
        f"account {OTHER}, whose usage report cannot be read" in r and "not believed" in r
        for r in kept.reasons
    )
    assert any(f"account {CONSUMER}, whose usage report cannot be read" in r for r in kept.reasons)


def test_a_slice_holds_back_a_shared_ami_its_consumer_reports_used_since_the_plan(accounts: Accounts) -> None:
    """The plan saw a fresh report saying the AMI is unused and queued its stages; before the slice
    runs, the consumer uses it again and reports so. The slice reads the report again and holds the AMI
    back: the disable stage's brownout never comes before every consumer's fresh word."""
    make_ledger((US,))
    sqs = accounts.owner(US).sqs
    queue = sqs.create_queue(QueueName="work.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    accounts.consumer(US).ec2.delete_launch_template(LaunchTemplateId=accounts.template)
    consumer_run(accounts, wall_clock())
    enforce = policy([CONSUMER]).model_copy(update={"mode": "enforce"})

    planned = engine.run(enforce, [US], accounts.owner, wall_clock(), apply=True, work_queue=queue)

    assert planned.slices_queued == 1
    body = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=1)["Messages"][0]["Body"]
    work = WorkSlice.model_validate_json(body)
    items = {item.image_id: item for item in work.items}
    assert items[accounts.shared].consumers == (CONSUMER,)
    assert items[accounts.unshared].consumers == ()

    accounts.consumer(US).ec2.create_launch_template(
        LaunchTemplateName="web-fleet-2", LaunchTemplateData={"ImageId": accounts.shared}
    )
    consumer_run(accounts, wall_clock())
    outcome = engine.work_slice(enforce, work, accounts.owner(US), wall_clock())

    assert accounts.shared in outcome.held
    assert outcome.held[accounts.shared].startswith(f"used in account {CONSUMER} by launch template")
    assert accounts.unshared not in outcome.held
    images = accounts.owner(US).ec2.describe_images(Owners=["self"])["Images"]
    state = {i["ImageId"]: i["State"] for i in images}
    assert state[accounts.shared] == "available" and accounts.unshared not in state


def organization_unit(accounts: Accounts) -> tuple[dict[str, str], str]:
    """The owner made the organization's management account, with an OU (holding a nested OU, which
    holds one member account) that the owner's `unshared` AMI is shared with: the OU and the member."""
    org = boto3.client("organizations", region_name=US)
    org.create_organization(FeatureSet="ALL")
    root = org.list_roots()["Roots"][0]["Id"]
    unit = org.create_organizational_unit(ParentId=root, Name="workloads")["OrganizationalUnit"]
    nested = org.create_organizational_unit(ParentId=unit["Id"], Name="web")["OrganizationalUnit"]
    member = org.create_account(Email="web@example.com", AccountName="web")["CreateAccountStatus"][
        "AccountId"
    ]
    org.move_account(AccountId=member, SourceParentId=root, DestinationParentId=nested["Id"])
    accounts.owner(US).ec2.modify_image_attribute(
        ImageId=accounts.unshared, LaunchPermission={"Add": [{"OrganizationalUnitArn": unit["Arn"]}]}
    )
    return unit, member


def test_a_slice_item_names_the_ou_its_plan_expanded(accounts: Accounts) -> None:
    """The plan expands the OU into its member and reads that account's report: the queued item names
    both, so that the slice tells that share from an organization or OU granted since (which holds)."""
    unit, member = organization_unit(accounts)
    member_clients = ClientFactory(session_of(member))
    engine.run(policy([CONSUMER]), [US], member_clients, wall_clock(), apply=False, publish_reports=True)
    make_ledger((US,))
    sqs = accounts.owner(US).sqs
    queue = sqs.create_queue(QueueName="work.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    enforce = policy([CONSUMER], units=(unit["Arn"],)).model_copy(update={"mode": "enforce"})

    engine.run(enforce, [US], accounts.owner, wall_clock(), apply=True, work_queue=queue)

    body = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=1)["Messages"][0]["Body"]
    item = next(i for i in WorkSlice.model_validate_json(body).items if i.image_id == accounts.unshared)
    assert item.consumers == (member,)
    assert item.grants == (f"ou:{unit['Arn']}",)


def test_a_share_to_an_organizational_unit_counts_every_account_in_it(accounts: Accounts) -> None:
    """The owner is the organization's management account: a share to an OU (with a nested OU) is
    expanded to its accounts, and each of their reports counts."""
    unit, member = organization_unit(accounts)

    missing = owner_plan(accounts, wall_clock(), units=(unit["Arn"],))[accounts.unshared]
    assert missing.action == "keep"
    assert any(f"account {member}, which has sent no usage report" in r for r in missing.reasons), (
        missing.reasons
    )

    ClientFactory(session_of(member))(US).ec2.run_instances(ImageId=accounts.unshared, MinCount=1, MaxCount=1)
    engine.run(
        policy([CONSUMER]),
        [US],
        ClientFactory(session_of(member)),
        wall_clock(),
        apply=False,
        publish_reports=True,
    )

    used = owner_plan(accounts, wall_clock(), units=(unit["Arn"],))[accounts.unshared]
    assert used.action == "keep"
    assert any(r.startswith(f"used in account {member} by instance i-") for r in used.reasons), used.reasons


def test_where_organizations_cannot_be_read_a_share_to_an_ou_keeps_the_ami(accounts: Accounts) -> None:
    """Without an organization this account may read (it is no management account nor delegated
    administrator), the plan cannot say who an OU holds: the AMI is kept, and the plan says why."""
    ou = "arn:aws:organizations::999999999999:ou/o-abcdefghij/ou-abcd-12345678"
    accounts.owner(US).ec2.modify_image_attribute(
        ImageId=accounts.unshared, LaunchPermission={"Add": [{"OrganizationalUnitArn": ou}]}
    )

    result = engine.run(policy([CONSUMER], units=(ou,)), [US], accounts.owner, wall_clock(), apply=False)

    kept = next(d for d in result.plan.decisions if d.image_id == accounts.unshared)
    assert kept.action == "keep"
    assert any(f"shared with ou:{ou}, whose accounts cannot be listed" in r for r in kept.reasons), (
        kept.reasons
    )
    assert any("organizations: " in n and "kept (fail safe)" in n for n in result.plan.notes), (
        result.plan.notes
    )


@pytest.mark.parametrize("enabled_by_hand", [False, True])
def test_a_disabled_ami_its_recorded_consumer_reports_used_again_is_rescued_with_its_share(
    accounts: Accounts, enabled_by_hand: bool
) -> None:
    """Disabling removed the AMI's launch permissions, so EC2 no longer shows who it was shared with:
    the consumers are those the ledger recorded. The consumer reports it unused, the AMI is disabled;
    then the consumer uses it again and reports so: the next run rescues it, its share restored. So
    too where the owner enabled it by hand meanwhile (EnableImage gives no launch permission back):
    the consumers the ledger recorded still count, and the AMI is not disabled again."""
    enforce = weekly_enforce()
    accounts.consumer(US).ec2.delete_launch_template(LaunchTemplateId=accounts.template)
    consumer_run(accounts, wall_clock())
    owner_ec2 = accounts.owner(US).ec2

    first = engine.run(enforce, [US], accounts.owner, wall_clock(), apply=True)
    assert {d.image_id: d.action for d in first.plan.decisions}[accounts.shared] == "disable"
    assert owner_ec2.describe_images(ImageIds=[accounts.shared])["Images"][0]["State"] == "disabled"

    accounts.consumer(US).ec2.create_launch_template(
        LaunchTemplateName="web-fleet-2", LaunchTemplateData={"ImageId": accounts.shared}
    )
    consumer_run(accounts, wall_clock())
    if enabled_by_hand:
        owner_ec2.enable_image(ImageId=accounts.shared)
    second = engine.run(enforce, [US], accounts.owner, wall_clock() + timedelta(hours=1), apply=True)

    rescued = next(d for d in second.plan.decisions if d.image_id == accounts.shared)
    assert rescued.action == "rescue", rescued.reasons
    assert any(r.startswith(f"used in account {CONSUMER} by launch template") for r in rescued.reasons)
    assert owner_ec2.describe_images(ImageIds=[accounts.shared])["Images"][0]["State"] == "available"
    permissions = owner_ec2.describe_image_attribute(ImageId=accounts.shared, Attribute="launchPermission")
    assert {p.get("UserId") for p in permissions["LaunchPermissions"]} == {CONSUMER}


def test_a_consumer_parameter_named_like_a_latest_pointer_is_reported(accounts: Accounts) -> None:
    """The consumer runs the same policy (one StackSet): a family's Latest pointer name is one it holds
    no AMI of here, and its own parameter of that name, naming the owner's AMI, is a reference."""
    with_pointer = policy([CONSUMER]).model_dump(mode="json", by_alias=True, exclude_none=True)
    with_pointer["families"][0]["latest"] = {"tag": "Latest", "ssm_parameter": "/ami/web/latest"}
    consumer_policy = parse_policy(with_pointer)
    accounts.consumer(US).ec2.delete_launch_template(LaunchTemplateId=accounts.template)
    accounts.consumer(US).ssm.put_parameter(Name="/ami/web/latest", Value=accounts.shared, Type="String")

    result = engine.run(
        consumer_policy, [US], accounts.consumer, wall_clock(), apply=False, publish_reports=True
    )

    assert result.usage_problems == []
    uses = report_body(accounts, CONSUMER)["uses"]
    assert isinstance(uses, dict)
    assert accounts.shared in uses, uses


def test_the_owner_keeps_an_ami_a_consumer_parameter_named_like_a_latest_pointer_holds(
    accounts: Accounts,
) -> None:
    with_pointer = policy([CONSUMER]).model_dump(mode="json", by_alias=True, exclude_none=True)
    with_pointer["families"][0]["latest"] = {"tag": "Latest", "ssm_parameter": "/ami/web/latest"}
    shared_policy = parse_policy(with_pointer)
    accounts.consumer(US).ec2.delete_launch_template(LaunchTemplateId=accounts.template)
    accounts.consumer(US).ssm.put_parameter(Name="/ami/web/latest", Value=accounts.shared, Type="String")
    engine.run(shared_policy, [US], accounts.consumer, wall_clock(), apply=False, publish_reports=True)

    result = engine.run(shared_policy, [US], accounts.owner, wall_clock(), apply=False)

    decision = next(d for d in result.plan.decisions if d.image_id == accounts.shared)
    assert decision.action == "keep", (decision.action, decision.reasons)


def test_a_confirmed_apply_judges_the_reports_at_the_time_it_writes(
    accounts: Accounts, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ami-janitor apply` in a terminal reads the reports again once the operator answers, and judges
    them at that time, not at the question's: a report that went stale while the question waited keeps
    the AMI shared with its account (fail safe), whatever it said. Kept, that AMI is shared again
    (a candidate's shares belong to its stages): a write the question did not show, so nothing is
    written and the operator is asked to run apply again."""
    import io
    import sys

    from ami_janitor import cli
    from ami_janitor.cli import commands

    # The consumer's last report says it uses nothing; its janitor reports no more after it.
    accounts.consumer(US).ec2.delete_launch_template(LaunchTemplateId=accounts.template)
    consumer_run(accounts, wall_clock())
    make_ledger((US,))
    enforce = policy([CONSUMER]).model_dump(mode="json", by_alias=True, exclude_none=True)
    config = tmp_path / "janitor.yaml"
    config.write_text(json.dumps({**enforce, "mode": "enforce"}))
    clock = [wall_clock()]

    class SlowTerminal(io.StringIO):
        """The operator answers yes 49 hours after the question (max_age_hours is 48)."""

        def isatty(self) -> bool:
            return True

        def readline(self, *_: object) -> str:
            clock[0] += timedelta(hours=49)
            return "y\n"

    monkeypatch.setattr(commands, "_now", lambda: clock[0])
    monkeypatch.setattr(sys, "stdin", SlowTerminal())
    out = io.StringIO()
    code = cli.main(["apply", "--config", str(config)], out=out)

    assert code == 3, out.getvalue()
    assert "the plan changed since it was shown" in capsys.readouterr().err
    shared = accounts.owner(US).ec2.describe_images(ImageIds=[accounts.shared])["Images"]
    assert [(i["State"], i.get("DeprecationTime")) for i in shared] == [("available", None)]
