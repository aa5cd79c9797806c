"""Shares on the emulator (grant, revoke, un-public, foreign grants untouched, the ledger's record of
grants and its mirror across tags) and the exact ModifyImageAttribute, CreateTags and DeleteTags requests
through botocore's Stubber, in order with the ledger's writes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ReadTimeoutError
from botocore.stub import Stubber
from moto import mock_aws

from ami_janitor import engine
from ami_janitor.aws import ledger
from ami_janitor.aws.clients import ClientFactory, RegionClients
from ami_janitor.aws.executor import apply_plan, rescue_image
from ami_janitor.aws.inventory import load_images
from ami_janitor.aws.sharer import PERMISSIONS, apply_shares
from ami_janitor.core import sharing as core_sharing
from ami_janitor.core.model import (
    Decision,
    Image,
    LedgerItem,
    LedgerView,
    Plan,
    RegionInventory,
    RegionStatus,
    Share,
    iso,
)
from ami_janitor.core.policy import SHARED_BY_JANITOR_TAG, Policy, parse_policy
from ami_janitor.core.sharing import plan_shares
from ami_janitor.demo import emulator
from server import make_ledger
from sessions import botocore_session

US = "us-east-1"
A, B, C = "111111111111", "222222222222", "333333333333"
ORG = "arn:aws:organizations::123456789012:organization/o-abc123"
NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def sharing(accounts: list[str], organizations: tuple[str, ...] = (), public: bool = False) -> Policy:
    return parse_policy(
        {
            "mode": "enforce",
            "regions": [US],
            "families": [
                {
                    "name": "web",
                    "match": {"name": "web-*"},
                    "share_with": {"accounts": accounts, "organizations": list(organizations)},
                    "public": public,
                }
            ],
        }
    )


@pytest.fixture
def aws(fake_aws_env: None) -> Iterator[ClientFactory]:
    emulator.install()
    with mock_aws():
        make_ledger((US,))
        yield ClientFactory(botocore_session())  # a full SDK: the tests make resources the janitor never does


def bake(factory: ClientFactory, name: str) -> str:
    ec2 = factory(US).ec2
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
    return str(ec2.create_image(InstanceId=instance["InstanceId"], Name=name)["ImageId"])


def grants(factory: ClientFactory, image_id: str) -> set[str]:
    answer = factory(US).ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    keys = {"UserId": "user", "Group": "group", "OrganizationArn": "org", "OrganizationalUnitArn": "ou"}
    return {f"{keys[k]}:{v}" for p in answer["LaunchPermissions"] for k, v in p.items()}


def tags(factory: ClientFactory, image_id: str) -> dict[str, str]:
    raw = factory(US).ec2.describe_images(ImageIds=[image_id])["Images"][0]
    return {t["Key"]: t["Value"] for t in raw.get("Tags") or []}


def recorded(factory: ClientFactory, image_id: str) -> dict[str, Any]:
    """The AMI's ledger item as stored."""
    answer = factory(US).dynamodb.get_item(
        TableName="ami-janitor-ledger", Key=ledger.key(image_id), ConsistentRead=True
    )
    stored = dict(answer.get("Item") or {})
    stored.pop(ledger.WRITE_ID_ATTRIBUTE, None)  # which write was last: not a record
    return stored


def reconcile(factory: ClientFactory, policy: Policy) -> list[Share]:
    inventories = [load_images(factory(US), policy)]
    shares = plan_shares(inventories, policy, NOW)
    results = apply_shares(factory, shares, inventories, ledger.ledgers(factory, policy.ledger))
    assert [r.status for r in results] == ["ok"] * len(shares), results
    return shares


def disabling(image_id: str, name: str) -> Plan:
    """A plan whose one decision is the web family's AMI's disable stage."""
    decision = {
        "region": US,
        "family": "web",
        "architecture": "x86_64",
        "image_id": image_id,
        "name": name,
        "created": "2026-01-01T00:00:00Z",
        "action": "disable",
        "reasons": [],
        "stages": ["disable"],
    }
    return Plan(
        mode="enforce",
        generated_at=iso(NOW) or "",
        regions=[RegionStatus(region=US, status="ok")],
        decisions=[Decision.model_validate(decision)],
    )


def test_grants_are_made_revoked_and_recorded_and_foreign_ones_are_left(aws: ClientFactory) -> None:
    image_id = bake(aws, "web-1")
    reconcile(aws, sharing([A, B], (ORG,)))
    assert grants(aws, image_id) == {f"user:{A}", f"user:{B}", f"org:{ORG}"}
    assert recorded(aws, image_id) == {
        "pk": {"S": f"image#{image_id}"},
        "sk": {"S": "item"},
        "image_id": {"S": image_id},
        "grants": {"SS": [f"org:{ORG}", f"user:{A}", f"user:{B}"]},
    }
    assert tags(aws, image_id)[SHARED_BY_JANITOR_TAG] == f"org:{ORG},user:{A},user:{B}"
    # Somebody shares with C by hand; the policy drops A and the organization.
    aws(US).ec2.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": [{"UserId": C}]})
    shares = reconcile(aws, sharing([B]))
    assert shares == [Share(image_id=image_id, region=US, remove=[f"org:{ORG}", f"user:{A}"])]
    assert grants(aws, image_id) == {f"user:{B}", f"user:{C}"}
    assert recorded(aws, image_id)["grants"] == {"SS": [f"user:{B}"]}
    assert tags(aws, image_id)[SHARED_BY_JANITOR_TAG] == f"user:{B}"
    # The steady state: nothing planned, nothing called.
    assert reconcile(aws, sharing([B])) == []
    # Nothing left to share: the janitor revokes its own grant and drops the record.
    reconcile(aws, sharing([]))
    assert grants(aws, image_id) == {f"user:{C}"}
    assert "grants" not in recorded(aws, image_id)  # the set goes with its last grant
    assert SHARED_BY_JANITOR_TAG not in tags(aws, image_id)


def test_replicate_by_hand_grants_nothing_to_a_candidate(aws: ClientFactory) -> None:
    """`ami-janitor replicate` shares as a scheduled run does: not on an AMI whose clock runs in the
    ledger (its permissions belong to the stages), while its family's other AMIs get share_with."""
    candidate, kept = bake(aws, "web-1"), bake(aws, "web-2")
    ledger.Ledger(aws(US), "ami-janitor-ledger").record_candidate(candidate, NOW - timedelta(days=3))
    policy = sharing([A])

    planned = engine.replicate(policy, [US], aws, NOW, apply=True)

    assert [s.image_id for s in planned.shares] == [kept]
    assert grants(aws, kept) == {f"user:{A}"} and grants(aws, candidate) == set()


def test_a_share_made_by_hand_before_share_with_lists_it_is_never_revoked(aws: ClientFactory) -> None:
    """design.md: the janitor removes only grants it made and reports any other share. C was shared by
    hand before the family listed it: the janitor finds it in place, does not record it as its own,
    and leaves it when the family drops C (it is then reported, and keeps the AMI)."""
    image_id = bake(aws, "web-1")
    aws(US).ec2.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": [{"UserId": C}]})
    reconcile(aws, sharing([A, C]))
    assert grants(aws, image_id) == {f"user:{A}", f"user:{C}"}
    item = recorded(aws, image_id)
    assert (item["grants"], item["grants_found"]) == ({"SS": [f"user:{A}"]}, {"SS": [f"user:{C}"]})
    assert tags(aws, image_id)[SHARED_BY_JANITOR_TAG] == f"user:{A}"
    assert reconcile(aws, sharing([A, C])) == []  # not planned again
    reconcile(aws, sharing([A]))
    assert grants(aws, image_id) == {f"user:{A}", f"user:{C}"}, "the hand-made share with C was revoked"


def test_a_region_without_a_ledger_table_is_not_shared(aws: ClientFactory) -> None:
    image_id = bake(aws, "web-4")
    aws(US).dynamodb.update_table(TableName="ami-janitor-ledger", DeletionProtectionEnabled=False)
    aws(US).dynamodb.delete_table(TableName="ami-janitor-ledger")
    policy = sharing([A])
    inventories = [load_images(aws(US), policy)]
    shares = plan_shares(inventories, policy, NOW)
    [result] = apply_shares(aws, shares, inventories, ledger.ledgers(aws, policy.ledger))
    assert (result.status, result.error) == (
        "failed",
        "no ledger table in us-east-1: not shared (every grant is recorded first)",
    )
    assert grants(aws, image_id) == set()


def test_a_public_ami_is_made_private_unless_its_family_says_public(aws: ClientFactory) -> None:
    image_id = bake(aws, "web-2")
    aws(US).ec2.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": [{"Group": "all"}]})
    reconcile(aws, sharing([A], public=True))
    assert grants(aws, image_id) == {"group:all", f"user:{A}"}
    reconcile(aws, sharing([A]))
    assert grants(aws, image_id) == {f"user:{A}"}
    assert aws(US).ec2.describe_images(ImageIds=[image_id])["Images"][0]["Public"] is False


def test_a_long_record_spans_numbered_tags_and_shrinks_back(aws: ClientFactory) -> None:
    image_id = bake(aws, "web-3")
    many = [f"{n:012d}" for n in range(100000000001, 100000000031)]
    reconcile(aws, sharing(many))
    recorded = tags(aws, image_id)
    assert sorted(k for k in recorded if k.startswith(SHARED_BY_JANITOR_TAG)) == [
        SHARED_BY_JANITOR_TAG,
        f"{SHARED_BY_JANITOR_TAG}:2",
        f"{SHARED_BY_JANITOR_TAG}:3",
    ]
    assert len(grants(aws, image_id)) == 30
    reconcile(aws, sharing(many[:2]))
    assert [k for k in tags(aws, image_id) if k.startswith(SHARED_BY_JANITOR_TAG)] == [SHARED_BY_JANITOR_TAG]
    assert grants(aws, image_id) == {f"user:{a}" for a in many[:2]}


def test_share_with_grants_come_back_after_the_owner_disables_and_enables_an_ami(aws: ClientFactory) -> None:
    """EC2's DisableImage removes every launch permission and EnableImage restores none, while the ledger
    still records the janitor's grants as made: the AMI's `available` event reads its launch permissions
    and grants what share_with lists and EC2 does not show."""
    image_id = bake(aws, "web-2")
    policy = sharing([A])
    reconcile(aws, policy)
    assert grants(aws, image_id) == {f"user:{A}"}
    aws(US).ec2.disable_image(ImageId=image_id)
    aws(US).ec2.enable_image(ImageId=image_id)
    assert grants(aws, image_id) == set()  # as EC2 does
    # The `available` event of the enable, then the scheduled run's share reconciliation.
    engine.handle_ami_event(image_id, "available", aws(US), policy, NOW)
    reconcile(aws, policy)
    assert grants(aws, image_id) == {f"user:{A}"}, "the available member stays unshared with share_with"


def test_a_scheduled_run_grants_again_what_a_disable_and_enable_removed_when_the_event_is_lost(
    aws: ClientFactory,
) -> None:
    """The same, with no `available` event: the scheduled run asks EC2 which of the family's AMIs each
    account the ledger records a grant to may launch (one DescribeImages per account), reads the launch
    permissions of the AMIs that lost one, and grants back what share_with lists."""
    kept, lost = bake(aws, "web-3"), bake(aws, "web-4")
    policy = sharing([A, B])
    engine.run(policy, [US], aws, NOW, apply=True)
    assert grants(aws, kept) == grants(aws, lost) == {f"user:{A}", f"user:{B}"}
    aws(US).ec2.disable_image(ImageId=lost)
    aws(US).ec2.enable_image(ImageId=lost)
    asked: list[tuple[str, dict[str, Any]]] = []
    aws(US).ec2.meta.events.register(
        "provide-client-params.ec2.*", lambda params, model, **_: asked.append((model.name, params))
    )
    result = engine.run(policy, [US], aws, NOW, apply=True)
    run_asked = list(asked)
    assert [(s.image_id, s.add) for s in result.replicated.shares] == [(lost, [f"user:{A}", f"user:{B}"])]
    assert grants(aws, lost) == {f"user:{A}", f"user:{B}"}
    assert grants(aws, kept) == {f"user:{A}", f"user:{B}"}
    # One DescribeImages per account recorded, at the largest page; the launch permissions of the one
    # AMI that lost its grants.
    executable = [p for name, p in run_asked if name == "DescribeImages" and "ExecutableUsers" in p]
    executable.sort(key=lambda p: p["ExecutableUsers"])  # asked side by side
    assert executable == [
        {"Owners": ["self"], "ExecutableUsers": [account], "MaxResults": 1000} for account in (A, B)
    ]
    assert [p["ImageId"] for name, p in run_asked if name == "DescribeImageAttribute"] == [lost]
    # The steady state: the accounts asked again, no AMI's launch permissions read.
    asked.clear()
    assert engine.run(policy, [US], aws, NOW, apply=True).replicated.shares == []
    assert not [name for name, _ in asked if name == "DescribeImageAttribute"]


def test_a_scheduled_run_grants_again_a_listed_grant_it_found_in_place_that_a_disable_and_enable_removed(
    aws: ClientFactory,
) -> None:
    """A grant share_with lists that somebody else made first (recorded as found, never as the janitor's)
    goes with a disable and enable too: with the event lost, the scheduled run looks for it as for its
    own grants (one DescribeImages for its account) and grants it again, as the event would have."""
    image_id = bake(aws, "web-1")
    aws(US).ec2.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": [{"UserId": C}]})
    policy = sharing([C])
    engine.run(policy, [US], aws, NOW, apply=True)
    book = ledger.Ledger(aws(US), "ami-janitor-ledger")
    item = book.read_items([image_id])[image_id]
    assert (item.grants_found, item.grants) == ((f"user:{C}",), ())
    aws(US).ec2.disable_image(ImageId=image_id)
    aws(US).ec2.enable_image(ImageId=image_id)
    assert grants(aws, image_id) == set()
    asked: list[tuple[str, dict[str, Any]]] = []
    aws(US).ec2.meta.events.register(
        "provide-client-params.ec2.*", lambda params, model, **_: asked.append((model.name, params))
    )

    result = engine.run(policy, [US], aws, NOW, apply=True)
    run_asked = list(asked)

    assert [(s.image_id, s.add) for s in result.replicated.shares] == [(image_id, [f"user:{C}"])]
    assert grants(aws, image_id) == {f"user:{C}"}
    executable = [p for name, p in run_asked if name == "DescribeImages" and "ExecutableUsers" in p]
    assert [p["ExecutableUsers"] for p in executable] == [[C]]
    assert [p["ImageId"] for name, p in run_asked if name == "DescribeImageAttribute"] == [image_id]


def test_a_scheduled_run_grants_an_organization_again_what_a_disable_and_enable_removed(
    aws: ClientFactory,
) -> None:
    """The same for an organization's grant when the event is lost: EC2 says which AMIs an account may
    launch, not an organization, so the scheduled run reads the launch permissions of the AMIs the
    janitor granted one (at most sharing.ORGANIZATION_CHECKS_PER_RUN a run, in turns) and grants back
    what EC2 no longer shows."""
    kept, lost = bake(aws, "web-3"), bake(aws, "web-4")
    policy = sharing([], (ORG,))
    engine.run(policy, [US], aws, NOW, apply=True)
    assert grants(aws, kept) == grants(aws, lost) == {f"org:{ORG}"}
    aws(US).ec2.disable_image(ImageId=lost)
    aws(US).ec2.enable_image(ImageId=lost)
    assert grants(aws, lost) == set()
    asked: list[tuple[str, dict[str, Any]]] = []
    aws(US).ec2.meta.events.register(
        "provide-client-params.ec2.*", lambda params, model, **_: asked.append((model.name, params))
    )
    result = engine.run(policy, [US], aws, NOW, apply=True)
    run_asked = list(asked)
    assert [(s.image_id, s.add) for s in result.replicated.shares] == [(lost, [f"org:{ORG}"])]
    assert grants(aws, lost) == grants(aws, kept) == {f"org:{ORG}"}
    # No account recorded: no DescribeImages by account. Each AMI granted the organization read once.
    assert not [p for name, p in run_asked if name == "DescribeImages" and "ExecutableUsers" in p]
    read = [p for name, p in run_asked if name == "DescribeImageAttribute"]
    assert sorted(read, key=lambda p: p["ImageId"]) == [
        {"ImageId": image_id, "Attribute": "launchPermission"} for image_id in sorted([kept, lost])
    ]
    # The steady state: both read again, nothing planned.
    asked.clear()
    assert engine.run(policy, [US], aws, NOW, apply=True).replicated.shares == []
    assert sorted(p["ImageId"] for name, p in asked if name == "DescribeImageAttribute") == sorted(
        [kept, lost]
    )


def test_an_ami_whose_grants_were_read_early_has_its_references_read_before_it_retires(
    aws: ClientFactory,
) -> None:
    """The organization checks read the launch permissions of the AMIs the janitor granted one before
    the plan: a candidate among them is asked about all the same (DescribeImageReferences, which alone
    sees an Image Builder recipe), and kept for what it finds."""
    old, new = bake(aws, "web-1"), bake(aws, "web-2")
    for image_id in (old, new):
        emulator.set_image_fields(US, image_id, creation_date=NOW - timedelta(days=1))
    policy = parse_policy(
        {
            "mode": "enforce",
            "regions": [US],
            "defaults": {"keep_latest": 1, "min_age_days": 7, "lifecycle": {"deprecate_after_days": 0}},
            "families": [{"name": "web", "match": {"name": "web-*"}, "share_with": {"organizations": [ORG]}}],
        }
    )
    engine.run(policy, [US], aws, NOW, apply=True)
    assert grants(aws, old) == {f"org:{ORG}"}
    emulator.set_image_fields(US, old, creation_date=NOW - timedelta(days=100))
    recipe = "arn:aws:imagebuilder:us-east-1:123456789012:image-recipe/web/1.0.0"
    asked: list[str] = []

    def ask(params: dict[str, Any], **_: Any) -> None:
        asked.extend(params["ImageIds"])

    def answer(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        # moto lacks the call: answered here as EC2 would, before any request is sent.
        found = [{"ImageId": old, "ResourceType": "imagebuilder:ImageRecipe", "Arn": recipe}]
        return AWSResponse("", 200, {}, None), {"ImageReferences": found if old in asked else []}

    events = aws(US).ec2.meta.events
    events.register("before-parameter-build.ec2.DescribeImageReferences", ask)
    events.register("before-call.ec2.DescribeImageReferences", answer)

    plan, _ = engine.build_plan(policy, [US], aws, NOW)

    assert old in asked
    kept = next(d for d in plan.decisions if d.image_id == old)
    assert kept.action == "keep", kept.reasons
    assert kept.reasons == [f"referenced by imagebuilder:ImageRecipe {recipe} (DescribeImageReferences)"]


def test_grants_in_a_family_matched_by_tags_alone_are_not_looked_for(aws: ClientFactory) -> None:
    """The janitor changes no launch permission of an AMI in a family matched by tags alone (a tag may
    have brought it there): a grant it recorded before, lost since, is not granted again, so neither the
    AMI's event nor the scheduled run reads its launch permissions or which AMIs the account may launch."""
    image_id = bake(aws, "web-4")
    engine.run(sharing([A]), [US], aws, NOW, apply=True)
    assert grants(aws, image_id) == {f"user:{A}"}
    aws(US).ec2.create_tags(Resources=[image_id], Tags=[{"Key": "Project", "Value": "Web"}])
    by_tags = parse_policy(
        {
            "mode": "enforce",
            "regions": [US],
            "families": [{"name": "web", "match": {"tags": {"Project": "Web"}}}],
        }
    )
    aws(US).ec2.disable_image(ImageId=image_id)
    aws(US).ec2.enable_image(ImageId=image_id)
    asked: list[tuple[str, dict[str, Any]]] = []
    aws(US).ec2.meta.events.register(
        "provide-client-params.ec2.*", lambda params, model, **_: asked.append((model.name, params))
    )

    engine.handle_ami_event(image_id, "available", aws(US), by_tags, NOW)
    result = engine.run(by_tags, [US], aws, NOW, apply=True)

    assert result.replicated.shares == []
    assert not [name for name, _ in asked if name == "DescribeImageAttribute"], asked
    assert not [p for name, p in asked if name == "DescribeImages" and "ExecutableUsers" in p]
    assert grants(aws, image_id) == set()


def test_the_organization_checks_take_their_turn_from_the_run_s_date(
    aws: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past sharing.ORGANIZATION_CHECKS_PER_RUN AMIs, which ones a run reads depends on its day: the
    scheduled run gives the inventory its own time, so consecutive days take consecutive turns."""
    bake(aws, "web-5")
    policy = sharing([], (ORG,))
    engine.run(policy, [US], aws, NOW, apply=True)
    days: list[int] = []
    checks = core_sharing.organization_checks

    def recording(images: Any, day: int, *args: Any) -> list[str]:
        days.append(day)
        return checks(images, day, *args)

    monkeypatch.setattr(core_sharing, "organization_checks", recording)
    for later in (NOW, NOW + timedelta(days=1)):
        engine.run(policy, [US], aws, later, apply=True)
    assert days == [NOW.toordinal(), NOW.toordinal() + 1]


def test_a_region_whose_accounts_launch_rights_cannot_be_read_is_skipped(aws: ClientFactory) -> None:
    """Which AMIs a recorded account may launch is part of the region's inventory: where EC2 will not
    say, the region is skipped (no decision on a partial inventory), not planned as if nothing was lost."""
    image_id = bake(aws, "web-5")
    policy = sharing([A])
    engine.run(policy, [US], aws, NOW, apply=True)

    def refuse(params: dict[str, Any], **_: Any) -> Any:
        if any(key.startswith("ExecutableBy") for key in params.get("body") or {}):
            error = {"Error": {"Code": "UnauthorizedOperation", "Message": "not authorized"}}
            return AWSResponse("https://ec2.us-east-1.amazonaws.com/", 403, {}, None), error
        return None

    aws(US).ec2.meta.events.register("before-call.ec2.DescribeImages", refuse)
    result = engine.run(policy, [US], aws, NOW, apply=True)
    assert [(r.region, r.status) for r in result.plan.regions] == [(US, "skipped")]
    assert "ec2:DescribeImages" in (result.plan.regions[0].error or "")
    assert "UnauthorizedOperation" in (result.plan.regions[0].error or "")
    assert result.replicated.shares == [] and grants(aws, image_id) == {f"user:{A}"}


def test_an_account_share_with_drops_and_lists_again_around_a_rescue_is_granted_again(
    aws: ClientFactory,
) -> None:
    """The rescue does not restore a grant share_with dropped while the AMI was disabled; it forgets it
    (DisableImage removed it), so that share_with listing the account again grants it."""
    clients = aws(US)
    image_id = bake(aws, "web-6")
    reconcile(aws, sharing([A, B]))
    book = ledger.Ledger(clients, "ami-janitor-ledger")
    image = Image.from_api(US, clients.ec2.describe_images(ImageIds=[image_id])["Images"][0])
    image = image.model_copy(update={"ledger": book.read_items([image_id]).get(image_id)})
    plan = disabling(image_id, "web-6")
    inventory = RegionInventory(region=US, images=(image,), ledger=book.read_all())
    assert apply_plan(plan, {US: inventory}, aws, NOW, ledger_for=lambda _r: book).failed == 0
    image = Image.from_api(US, clients.ec2.describe_images(ImageIds=[image_id])["Images"][0])
    [result] = rescue_image(clients, book, image, NOW, shared={f"user:{A}"})
    assert result.status == "ok", result
    assert grants(aws, image_id) == {f"user:{A}"}
    assert book.read_items([image_id])[image_id].grants == (f"user:{A}",)
    reconcile(aws, sharing([A, B]))
    assert grants(aws, image_id) == {f"user:{A}", f"user:{B}"}


# ---- a rescue under image block public access -----------------------------------------------------


def _refuse_public_grants(client: Any) -> list[str]:
    """Image block public access: EC2 refuses a public launch permission (and only that)."""
    refused: list[str] = []

    def before_call(params: dict[str, Any], **_: Any) -> Any:
        body = params.get("body") or {}
        if any(k.startswith("LaunchPermission.Add") and v == "all" for k, v in body.items()):
            refused.append("group:all")
            error = {"Error": {"Code": "OperationNotPermitted", "Message": "block public access"}}
            return AWSResponse("https://ec2.us-east-1.amazonaws.com/", 400, {}, None), error
        return None

    client.meta.events.register("before-call.ec2.ModifyImageAttribute", before_call)
    return refused


def test_a_rescue_whose_public_grant_is_refused_restores_the_rest_and_closes_its_clock(
    aws: ClientFactory,
) -> None:
    """A rescue restores permissions as a share grants them: the public group in a call of its own, whose
    refusal (a `public: true` family under image block public access) takes nothing else with it. The
    rescue enables the AMI, grants the account back, closes its clock and reports the refusal; left
    open, the clock would fail the same rescue at every run, and resume once nothing keeps the AMI
    (disabling it again at once instead of starting a new clock)."""
    clients = aws(US)
    ec2 = clients.ec2
    image_id = bake(aws, "web-5")
    ec2.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": [{"UserId": A}, {"Group": "all"}]})
    book = ledger.Ledger(clients, "ami-janitor-ledger")
    book.record_grants(image_id, [f"user:{A}", "group:all"])
    book.confirm_grants(image_id, [f"user:{A}", "group:all"])
    view = book.read_all()
    image = Image.from_api(US, ec2.describe_images(ImageIds=[image_id])["Images"][0])
    image = image.model_copy(update={"ledger": view.items.get(image_id)})
    inventory = RegionInventory(region=US, images=(image,), ledger=view)
    plan = disabling(image_id, "web-5")
    disabled = apply_plan(plan, {US: inventory}, aws, NOW, ledger_for=lambda _r: book)
    assert disabled.failed == 0, disabled.results
    assert grants(aws, image_id) == set()

    refused = _refuse_public_grants(ec2)
    image = Image.from_api(US, ec2.describe_images(ImageIds=[image_id])["Images"][0])
    [result] = rescue_image(clients, book, image, NOW, shared={f"user:{A}", "group:all"})
    assert refused == ["group:all"]
    assert ec2.describe_images(ImageIds=[image_id])["Images"][0]["State"] == "available"
    assert grants(aws, image_id) == {f"user:{A}"}
    item = book.read_items([image_id])[image_id]
    assert item.closed is not None, (
        f"rescue {result.status}: {result.error}; the candidate clock is left open"
    )
    assert (result.status, result.error) == (
        "failed",
        "public launch permission not restored: OperationNotPermitted: block public access",
    )
    assert result.detail is not None and "candidate clock closed in the ledger" in result.detail


# ---- exact requests (Stubber) -------------------------------------------------------------------


@pytest.fixture
def stubbed(fake_aws_env: None) -> Iterator[tuple[Any, Stubber]]:
    client = boto3.client("ec2", region_name=US, **CREDENTIALS)
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


class RecordingLedger:
    """The ledger's grant writes, in one list with the EC2 calls (so their order shows)."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def record_grants(self, image_id: str, grants: list[str]) -> str:
        self.calls.append(f"ledger: {image_id} +{','.join(grants)}")
        return "recorded"

    def confirm_grants(self, image_id: str, grants: list[str]) -> str:
        if not grants:
            return "already-recorded"  # as the table's: no write
        self.calls.append(f"ledger: {image_id} made {','.join(grants)}")
        return "recorded"

    def forget_grants(self, image_id: str, grants: list[str]) -> str:
        if not grants:
            return "already-recorded"  # as the table's: no write
        self.calls.append(f"ledger: {image_id} -{','.join(grants)}")
        return "recorded"


def calls_of(client: Any) -> list[str]:
    calls: list[str] = []
    client.meta.events.register(
        "before-parameter-build.ec2.*", lambda model, **_: calls.append(f"ec2: {model.name}")
    )
    return calls


def stub_image(grants: tuple[str, ...] = (), **tags: str) -> Image:
    image = Image(
        image_id="ami-0aaaaaaaaaaaaaaa1",
        region=US,
        name="web-1",
        architecture="x86_64",
        state="available",
        created=NOW,
        tags=tags,
    )
    return image.model_copy(update={"ledger": LedgerItem(image_id=image.image_id, grants=grants)})


def with_ledger(*images: Image) -> RegionInventory:
    items = {i.image_id: i.ledger for i in images if i.ledger is not None}
    return RegionInventory(
        region=US, images=images, ledger=LedgerView(table="ami-janitor-ledger", items=items)
    )


def test_exact_requests_of_a_share_change(stubbed: tuple[Any, Stubber]) -> None:
    client, stub = stubbed
    calls = calls_of(client)
    image = stub_image(
        (f"org:{ORG}", f"user:{A}"),
        **{SHARED_BY_JANITOR_TAG: f"user:{A}", f"{SHARED_BY_JANITOR_TAG}:2": f"org:{ORG}"},
    )
    share = Share(image_id=image.image_id, region=US, add=["group:all", f"user:{B}"], remove=[f"org:{ORG}"])
    # What EC2 shows first: a grant already there is somebody else's, neither made nor recorded as the
    # janitor's.
    stub.add_response(
        "describe_image_attribute",
        {"ImageId": image.image_id, "LaunchPermissions": [{"UserId": A}]},
        {"ImageId": image.image_id, "Attribute": "launchPermission"},
    )
    # The accounts first, then the public group in a call of its own.
    stub.add_response(
        "modify_image_attribute",
        {},
        {"ImageId": image.image_id, "LaunchPermission": {"Add": [{"UserId": B}]}},
    )
    stub.add_response(
        "modify_image_attribute",
        {},
        {"ImageId": image.image_id, "LaunchPermission": {"Add": [{"Group": "all"}]}},
    )
    stub.add_response(
        "modify_image_attribute",
        {},
        {"ImageId": image.image_id, "LaunchPermission": {"Remove": [{"OrganizationArn": ORG}]}},
    )
    # New parts first, then the stale one.
    stub.add_response(
        "create_tags",
        {},
        {
            "Resources": [image.image_id],
            "Tags": [{"Key": SHARED_BY_JANITOR_TAG, "Value": f"group:all,user:{A},user:{B}"}],
        },
    )
    stub.add_response(
        "delete_tags", {}, {"Resources": [image.image_id], "Tags": [{"Key": f"{SHARED_BY_JANITOR_TAG}:2"}]}
    )
    [result] = apply_shares(
        lambda region: RegionClients(region, ec2=client),
        [share],
        [with_ledger(image)],
        lambda region: RecordingLedger(calls),  # type: ignore[arg-type,return-value]
    )
    assert (result.status, result.added, result.removed) == ("ok", ["group:all", f"user:{B}"], [f"org:{ORG}"])
    assert result.detail == f"granted user:{B}; granted group:all; revoked org:{ORG}; record updated"
    # Recorded before the grant and confirmed after it, forgotten after the revoke, mirrored last.
    assert calls == [
        "ec2: DescribeImageAttribute",
        f"ledger: {image.image_id} +user:{B}",
        "ec2: ModifyImageAttribute",
        f"ledger: {image.image_id} made user:{B}",
        f"ledger: {image.image_id} +group:all",
        "ec2: ModifyImageAttribute",
        f"ledger: {image.image_id} made group:all",
        "ec2: ModifyImageAttribute",
        f"ledger: {image.image_id} -org:{ORG}",
        "ec2: CreateTags",
        "ec2: DeleteTags",
    ]


def test_a_refused_grant_fails_that_ami_and_is_taken_back_so_the_next_run_grants_it_again(
    stubbed: tuple[Any, Stubber],
) -> None:
    """EC2 refused it, and the launch permissions read back do not show it: the record goes too (a
    record without the grant would never be granted again). The public group refused under image block
    public access takes neither the accounts' grants, made in the call before it, nor their mirror with it."""
    client, stub = stubbed
    image = stub_image()
    second = stub_image().model_copy(update={"image_id": "ami-0aaaaaaaaaaaaaaa2"})
    stub.add_response("describe_image_attribute", {"ImageId": image.image_id, "LaunchPermissions": []})
    stub.add_response("modify_image_attribute", {})  # user:B on the first AMI
    stub.add_client_error(
        "modify_image_attribute", "OperationNotPermitted", "Image block public access is enabled"
    )
    # Read back after the refusal: the account's grant is there, the public group is not.
    stub.add_response(
        "describe_image_attribute",
        {"ImageId": image.image_id, "LaunchPermissions": [{"UserId": B}]},
        {"ImageId": image.image_id, "Attribute": "launchPermission"},
    )
    stub.add_response(
        "create_tags",
        {},
        {"Resources": [image.image_id], "Tags": [{"Key": SHARED_BY_JANITOR_TAG, "Value": f"user:{B}"}]},
    )
    stub.add_response("describe_image_attribute", {"ImageId": second.image_id, "LaunchPermissions": []})
    stub.add_response("modify_image_attribute", {})
    stub.add_response("create_tags", {})
    shares = [
        Share(image_id=image.image_id, region=US, add=["group:all", f"user:{B}"]),
        Share(image_id=second.image_id, region=US, add=[f"user:{A}"]),
    ]
    calls: list[str] = []
    recording = lambda region: RecordingLedger(calls)  # type: ignore[arg-type,return-value] # noqa: E731
    results = apply_shares(
        lambda region: RegionClients(region, ec2=client), shares, [with_ledger(image, second)], recording
    )
    assert [(r.status, r.error) for r in results] == [
        ("failed", "OperationNotPermitted: Image block public access is enabled"),
        ("ok", None),
    ]
    assert not results[0].passing  # refused for good: the AMI event does not try again for it
    assert results[0].detail == f"granted user:{B}; record updated"
    assert calls[:6] == [
        f"ledger: {image.image_id} +user:{B}",
        f"ledger: {image.image_id} made user:{B}",
        f"ledger: {image.image_id} +group:all",
        f"ledger: {image.image_id} -group:all",
        f"ledger: {second.image_id} +user:{A}",
        f"ledger: {second.image_id} made user:{A}",
    ]
    missing = apply_shares(
        lambda region: RegionClients(region, ec2=client),
        [Share(image_id="ami-0gone", region=US)],
        [with_ledger()],
        recording,
    )
    assert (missing[0].status, missing[0].error) == ("failed", "not in the region's inventory")


def test_a_refused_public_grant_stops_no_revocation(stubbed: tuple[Any, Stubber]) -> None:
    """Image block public access refuses a `public: true` family's public group at every run while it is
    on: an account the family no longer lists is revoked all the same, and the mirror follows."""
    client, stub = stubbed
    image = stub_image((f"user:{A}", f"user:{B}"), **{SHARED_BY_JANITOR_TAG: f"user:{A},user:{B}"})
    stub.add_response(
        "describe_image_attribute",
        {"ImageId": image.image_id, "LaunchPermissions": [{"UserId": A}, {"UserId": B}]},
        {"ImageId": image.image_id, "Attribute": "launchPermission"},
    )
    stub.add_client_error(
        "modify_image_attribute",
        "OperationNotPermitted",
        "Image block public access is enabled",
        expected_params={"ImageId": image.image_id, "LaunchPermission": {"Add": [{"Group": "all"}]}},
    )
    stub.add_response(
        "describe_image_attribute",
        {"ImageId": image.image_id, "LaunchPermissions": [{"UserId": A}, {"UserId": B}]},
        {"ImageId": image.image_id, "Attribute": "launchPermission"},
    )
    stub.add_response(
        "modify_image_attribute",
        {},
        {"ImageId": image.image_id, "LaunchPermission": {"Remove": [{"UserId": B}]}},
    )
    stub.add_response(
        "create_tags",
        {},
        {"Resources": [image.image_id], "Tags": [{"Key": SHARED_BY_JANITOR_TAG, "Value": f"user:{A}"}]},
    )
    calls = calls_of(client)
    [result] = apply_shares(
        lambda region: RegionClients(region, ec2=client),
        [Share(image_id=image.image_id, region=US, add=["group:all"], remove=[f"user:{B}"])],
        [with_ledger(image)],
        lambda region: RecordingLedger(calls),  # type: ignore[arg-type,return-value]
    )
    assert (result.status, result.error) == (
        "failed",
        "OperationNotPermitted: Image block public access is enabled",
    )
    assert result.detail == f"revoked user:{B}; record updated"
    assert f"ledger: {image.image_id} -user:{B}" in calls


def test_a_grant_whose_answer_was_lost_is_read_back_and_kept_recorded(stubbed: tuple[Any, Stubber]) -> None:
    """ModifyImageAttribute took effect and its answer was lost (a read timeout, which botocore raises
    as no ClientError): the launch permissions read back show the grant, so it is confirmed in the
    ledger, and can be revoked once the family no longer lists the account."""
    client, stub = stubbed
    image = stub_image()
    stub.add_response("describe_image_attribute", {"ImageId": image.image_id, "LaunchPermissions": []})
    stub.add_response("modify_image_attribute", {})
    lost = iter([True])

    def lose_the_answer(**_: Any) -> None:
        if next(lost, False):
            raise ReadTimeoutError(endpoint_url="https://ec2.us-east-1.amazonaws.com/")

    client.meta.events.register("after-call.ec2.ModifyImageAttribute", lose_the_answer)
    stub.add_response(
        "describe_image_attribute",
        {"ImageId": image.image_id, "LaunchPermissions": [{"UserId": B}]},
        {"ImageId": image.image_id, "Attribute": "launchPermission"},
    )
    calls: list[str] = []
    [result] = apply_shares(
        lambda region: RegionClients(region, ec2=client),
        [Share(image_id=image.image_id, region=US, add=[f"user:{B}"])],
        [with_ledger(image)],
        lambda region: RecordingLedger(calls),  # type: ignore[arg-type,return-value]
    )
    assert result.status == "failed" and result.passing  # a lost answer: the AMI event tries again
    assert calls == [f"ledger: {image.image_id} +user:{B}", f"ledger: {image.image_id} made user:{B}"]
    stub.assert_no_pending_responses()


def test_permissions_name_what_the_code_calls() -> None:
    assert PERMISSIONS == [
        "dynamodb:UpdateItem",
        "ec2:CreateTags",
        "ec2:DeleteTags",
        "ec2:DescribeImageAttribute",
        "ec2:ModifyImageAttribute",
    ]
