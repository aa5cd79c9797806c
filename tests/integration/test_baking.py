"""Bake on an in-process moto (with the emulator's snapshot tags at CreateImage), and the bake handler.

Exact requests (NoReboot, the snapshot TagSpecification, the Run Command sequence) are checked with
botocore's Stubber in tests/unit/test_bake_requests.py: moto ignores NoReboot and finishes commands at once.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

from ami_janitor import roles
from ami_janitor.aws import baker, ledger
from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.inventory import load_images
from ami_janitor.core import baking
from ami_janitor.core.policy import Family, Policy, parse_policy
from ami_janitor.demo import emulator
from ami_janitor.handlers import bake as bake_handler
from ami_janitor.handlers.events import BadEvent
from lambda_events import Context
from server import make_ledger

REGION = "us-east-1"
NOW = datetime(2026, 11, 25, 3, 0, 0, tzinfo=UTC)
ROLE = {"Role": "pettracker-ml"}


def policy_data(mode: str = "enforce", no_reboot: bool = False) -> dict[str, Any]:
    return {
        "mode": mode,
        "regions": [REGION],
        "families": [
            {
                "name": "pettracker-ml",
                "match": {"tags": {"Project": "PetTracker"}, "name": "pettracker-ml-*"},
                "bake": {"instance_tag": ROLE, "schedule": "cron(0 2 * * ? *)", "no_reboot": no_reboot},
            },
            {"name": "web", "match": {"tags": {"Project": "Web"}}},
        ],
    }


def pinned_family(instance_id: str, *, tags: dict[str, str] | None = ROLE) -> Family:
    bake = {"instance_id": instance_id, "instance_tag": tags, "schedule": "cron(0 2 * * ? *)"}
    data = policy_data()
    data["families"][0]["bake"] = bake
    return parse_policy(data).family("pettracker-ml")


def make_policy(mode: str = "enforce") -> Policy:
    return parse_policy(policy_data(mode))


def family(name: str = "pettracker-ml") -> Family:
    return make_policy().family(name)


@pytest.fixture
def aws(moto_aws: None) -> Iterator[None]:
    emulator.install()
    make_ledger((REGION,))
    yield


@functools.cache
def client(service: str) -> Any:
    # One client per service for the module: loading the service models once keeps these tests fast.
    return boto3.client(service, region_name=REGION)  # type: ignore[call-overload]


def clients() -> RegionClients:
    return RegionClients(REGION, ec2=client("ec2"), ssm=client("ssm"), dynamodb=client("dynamodb"))


def bakes_recorded(image_id: str) -> list[dict[str, str]]:
    """The bakes the ledger records on the AMI's item."""
    item = ledger.Ledger(clients(), "ami-janitor-ledger").read_items([image_id])[image_id]
    return [b.model_dump(mode="json") for b in item.bakes]


def ec2() -> Any:
    return clients().ec2


def launch(tags: dict[str, str] | None = None, *, launched: datetime | None = None) -> str:
    kwargs: dict[str, Any] = {}
    if tags:
        kwargs["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ]
    instance_id: str = ec2().run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, **kwargs)[
        "Instances"
    ][0]["InstanceId"]
    if launched is not None:
        # moto keeps a naive UTC time.
        instance = ec2_backends[DEFAULT_ACCOUNT_ID][REGION].get_instance(instance_id)
        instance.launch_time = launched.astimezone(UTC).replace(tzinfo=None)
    return instance_id


def tags_of(raw: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw.get("Tags") or []}


# ---- bake on moto ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("aws")
def test_bake_names_and_tags_the_image_and_its_snapshot_so_the_family_selects_it() -> None:
    instance_id = launch(ROLE)
    lines: list[str] = []

    result = baker.bake(clients(), family(), instance_id, NOW, no_reboot=False, progress=lines.append)

    assert result == baker.BakeResult(
        family="pettracker-ml",
        instance_id=instance_id,
        image_id=result.image_id,
        name="pettracker-ml-20261125T030000Z",
        state="available",
        warnings=[],
    )
    image = ec2().describe_images(ImageIds=[result.image_id])["Images"][0]
    expected = {
        "Project": "PetTracker",
        "Version": "20261125T030000Z",
        "ami-janitor:baked-from": instance_id,
    }
    assert image["Name"] == "pettracker-ml-20261125T030000Z"
    assert tags_of(image) == expected
    snapshot_id = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    snapshot = ec2().describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
    assert tags_of(snapshot) == expected
    # The family selects what it baked, as the inventory sees it.
    loaded = next(i for i in load_images(clients(), make_policy()).images if i.image_id == result.image_id)
    assert family().match.matches(loaded.name, loaded.tags)
    assert bakes_recorded(result.image_id) == [{"instance_id": instance_id, "at": "2026-11-25T03:00:00Z"}]
    assert lines[0] == f"creating image pettracker-ml-20261125T030000Z from {instance_id}"
    assert lines[-1] == f"{result.image_id}: available (0s)"


@pytest.mark.usefixtures("aws")
def test_no_reboot_without_a_stop_command_warns() -> None:
    result = baker.bake(clients(), family(), launch(ROLE), NOW, no_reboot=True, wait=False)

    assert result.state == "pending"
    assert result.warnings == [baking.NO_REBOOT_WARNING]


@pytest.mark.usefixtures("aws")
def test_stop_and_start_commands_go_through_run_command_around_the_image() -> None:
    instance_id = launch(ROLE)

    result = baker.bake(
        clients(),
        family(),
        instance_id,
        NOW,
        no_reboot=True,
        stop_command="sudo systemctl stop pettracker-ml",
        start_command="sudo systemctl start pettracker-ml",
    )

    assert result.warnings == []
    assert result.state == "available"
    commands = clients().ssm.list_commands()["Commands"]
    sent = sorted(commands, key=lambda c: c["RequestedDateTime"])
    assert [c["Parameters"]["commands"] for c in sent] == [
        ["sudo systemctl stop pettracker-ml"],
        ["sudo systemctl start pettracker-ml"],
    ]
    assert {c["DocumentName"] for c in sent} == {"AWS-RunShellScript"}
    assert all(c["InstanceIds"] == [instance_id] for c in sent)


@pytest.mark.usefixtures("aws")
def test_a_missing_instance_is_a_bake_error() -> None:
    with pytest.raises(baking.BakeError, match="CreateImage from i-0123456789abcdef0 failed"):
        baker.bake(clients(), family(), "i-0123456789abcdef0", NOW, no_reboot=False)


# ---- the build instance -------------------------------------------------------------------------------


@pytest.mark.usefixtures("aws")
def test_find_bake_instance_takes_the_only_running_or_stopped_tagged_instance() -> None:
    builder = launch(ROLE, launched=NOW - timedelta(days=3))
    ec2().stop_instances(InstanceIds=[builder])
    gone = launch(ROLE, launched=NOW)
    ec2().terminate_instances(InstanceIds=[gone])
    launch({"Role": "other"}, launched=NOW)
    launch(launched=NOW)

    assert baker.find_bake_instance(clients(), family()) == builder


@pytest.mark.usefixtures("aws")
def test_find_bake_instance_refuses_several_tagged_instances_naming_them() -> None:
    builder = launch(ROLE, launched=NOW - timedelta(days=3))
    attacker = launch(ROLE, launched=NOW)  # launched (or tagged) later by someone else

    with pytest.raises(baking.BakeError) as refused:
        baker.find_bake_instance(clients(), family())

    assert builder in str(refused.value) and attacker in str(refused.value)
    assert "bake.instance_id" in str(refused.value)


@pytest.mark.usefixtures("aws")
def test_find_bake_instance_takes_the_pinned_instance_only() -> None:
    builder = launch(ROLE, launched=NOW - timedelta(days=3))
    launch(ROLE, launched=NOW)  # a later instance with the same tags
    pinned = pinned_family(builder)

    assert baker.find_bake_instance(clients(), pinned) == builder
    ec2().delete_tags(Resources=[builder], Tags=[{"Key": "Role"}])
    with pytest.raises(baking.BakeError, match=f"{builder} does not carry the tags Role=pettracker-ml"):
        baker.find_bake_instance(clients(), pinned)
    ec2().terminate_instances(InstanceIds=[builder])
    with pytest.raises(baking.BakeError, match=f"{builder} is terminated"):
        baker.find_bake_instance(clients(), pinned_family(builder, tags=None))
    with pytest.raises(baking.BakeError, match=r"bake\.instance_id i-0123456789abcdef0 does not exist"):
        baker.find_bake_instance(clients(), pinned_family("i-0123456789abcdef0"))


@pytest.mark.usefixtures("aws")
def test_find_bake_instance_names_the_tags_when_none_carries_them() -> None:
    launch({"Role": "other"})

    with pytest.raises(
        baking.BakeError,
        match=r"no running or stopped instance in us-east-1 carries the tags Role=pettracker-ml",
    ):
        baker.find_bake_instance(clients(), family())
    with pytest.raises(baking.BakeUsageError, match="family web has no bake section"):
        baker.find_bake_instance(clients(), family("web"))


# ---- the scheduled bake handler -----------------------------------------------------------------------


@pytest.fixture
def lambda_env(aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "ami-janitor")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "AmiJanitor")
    # Powertools reads the namespace when the module is imported, which may be before this fixture.
    monkeypatch.setattr(bake_handler.metrics, "namespace", "AmiJanitor")
    path = tmp_path / "policy.json"
    monkeypatch.setenv("AMI_JANITOR_CONFIG", str(path))
    return path


def write_policy(path: Path, mode: str, *, no_reboot: bool = False, instance_id: str | None = None) -> None:
    data = policy_data(mode, no_reboot)
    if instance_id is not None:
        data["families"][0]["bake"]["instance_id"] = instance_id
    path.write_text(json.dumps(data))


def own_images() -> list[dict[str, Any]]:
    images: list[dict[str, Any]] = ec2().describe_images(Owners=["self"])["Images"]
    return images


def test_handler_in_enforce_bakes_the_tagged_instance_without_waiting(lambda_env: Path) -> None:
    write_policy(lambda_env, "enforce", no_reboot=True)
    instance_id = launch(ROLE)

    result = bake_handler.handler({"family": "pettracker-ml"}, Context())

    assert result["outcome"] == "baked"
    assert result["mode"] == "enforce"
    assert result["region"] == REGION
    assert result["instance_id"] == instance_id
    assert result["state"] == "pending"  # the AMI's available event drives what follows
    assert result["warnings"] == [baking.NO_REBOOT_WARNING]
    [image] = own_images()
    assert image["ImageId"] == result["image_id"]
    assert image["Name"] == result["name"]
    assert image["Name"].startswith("pettracker-ml-")
    assert tags_of(image)["ami-janitor:baked-from"] == instance_id
    [recorded] = bakes_recorded(image["ImageId"])
    assert recorded["instance_id"] == instance_id


# What the bake rule sends: the family and the scheduled event's time.
SCHEDULED_EVENT = {"family": "pettracker-ml", "time": "2026-11-25T02:00:00Z"}
SCHEDULED_NAME = "pettracker-ml-20261125T020000Z"


def test_handler_given_the_same_scheduled_event_twice_makes_one_image(lambda_env: Path) -> None:
    """EventBridge delivers at least once: every delivery of one event names the same image, and a
    repeated delivery answers with the image the first made."""
    write_policy(lambda_env, "enforce")
    instance_id = launch(ROLE)

    first = bake_handler.handler(dict(SCHEDULED_EVENT), Context())
    again = bake_handler.handler(dict(SCHEDULED_EVENT), Context())

    [image] = own_images()
    assert image["Name"] == SCHEDULED_NAME
    assert tags_of(image)["Version"] == "20261125T020000Z"
    assert first["name"] == again["name"] == SCHEDULED_NAME
    assert first["image_id"] == again["image_id"] == image["ImageId"]
    assert again["outcome"] == "baked"
    assert bakes_recorded(image["ImageId"]) == [{"instance_id": instance_id, "at": "2026-11-25T02:00:00Z"}]


def test_handler_retried_after_an_unrecorded_bake_records_it_on_the_image_made(lambda_env: Path) -> None:
    """A delivery whose CreateImage took effect but whose bake was not recorded (the function failed in
    between): the next delivery of the event records the bake on that image and makes no other."""
    write_policy(lambda_env, "enforce")
    instance_id = launch(ROLE)
    made = ec2().create_image(InstanceId=instance_id, Name=SCHEDULED_NAME)["ImageId"]

    result = bake_handler.handler(dict(SCHEDULED_EVENT), Context())

    assert result["outcome"] == "baked" and result["image_id"] == made
    assert [i["ImageId"] for i in own_images()] == [made]
    assert bakes_recorded(made) == [{"instance_id": instance_id, "at": "2026-11-25T02:00:00Z"}]


def test_handler_refuses_a_scheduled_name_taken_by_an_image_of_another_instance(lambda_env: Path) -> None:
    """The image already named for this bake was made from another instance: not this bake's, so it is
    neither answered nor recorded, and the bake fails loudly."""
    write_policy(lambda_env, "enforce")
    launch(ROLE)
    other = ec2().create_image(InstanceId=launch(), Name=SCHEDULED_NAME)["ImageId"]

    with pytest.raises(baking.BakeError, match=r"InvalidAMIName\.Duplicate"):
        bake_handler.handler(dict(SCHEDULED_EVENT), Context())

    assert [i["ImageId"] for i in own_images()] == [other]
    assert other not in ledger.Ledger(clients(), "ami-janitor-ledger").read_items([other])  # no item


def test_handler_in_enforce_without_a_ledger_table_bakes_nothing(lambda_env: Path) -> None:
    write_policy(lambda_env, "enforce")
    launch(ROLE)
    client("dynamodb").update_table(TableName="ami-janitor-ledger", DeletionProtectionEnabled=False)
    client("dynamodb").delete_table(TableName="ami-janitor-ledger")

    with pytest.raises(ledger.LedgerMissing, match="ledger create"):
        bake_handler.handler({"family": "pettracker-ml"}, Context())
    assert own_images() == []  # no CreateImage


def test_handler_in_dry_run_only_says_what_it_would_bake(lambda_env: Path) -> None:
    write_policy(lambda_env, "dry-run")
    instance_id = launch(ROLE)

    result = bake_handler.handler({"family": "pettracker-ml"}, Context())

    assert result["outcome"] == "would-bake"
    assert result["instance_id"] == instance_id
    assert result["name"].startswith("pettracker-ml-")
    assert own_images() == []


def test_handler_when_paused_does_nothing(lambda_env: Path) -> None:
    write_policy(lambda_env, "paused")
    launch(ROLE)

    assert bake_handler.handler({"family": "pettracker-ml"}, Context()) == {
        "mode": "paused",
        "family": "pettracker-ml",
    }
    assert own_images() == []


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ([], "not a JSON object"),
        ({}, "malformed bake event: family: Field required"),
        ({"family": ""}, "malformed bake event: family: String should have at least 1 character"),
        (
            {"family": "pettracker-ml", "extra": 1},
            "malformed bake event: extra: Extra inputs are not permitted",
        ),
        (
            {"family": "pettracker-ml", "time": "tonight"},
            "malformed bake event: time: Input should be a valid",
        ),
        (
            {"family": "pettracker-ml", "time": "2026-11-25T02:00:00"},
            "malformed bake event: time: Input should have timezone info",
        ),
        # Aware, but no UTC time (it raised an OverflowError where the bake is named).
        (
            {"family": "pettracker-ml", "time": "9999-12-31T23:00:00-05:00"},
            "malformed bake event: time: has no UTC time within the years 1 to 9999",
        ),
        (
            {"family": "pettracker-ml", "time": "0001-01-01T00:30:00+01:00"},
            "malformed bake event: time: has no UTC time within the years 1 to 9999",
        ),
        ({"family": "nope"}, "family 'nope' is not in the policy"),
        ({"family": "web"}, "family 'web' has no bake section"),
    ],
)
def test_handler_refuses_a_bad_event_naming_the_field(lambda_env: Path, event: Any, message: str) -> None:
    write_policy(lambda_env, "enforce")
    launch(ROLE)

    with pytest.raises(BadEvent, match=message):
        bake_handler.handler(event, Context())
    assert own_images() == []


@pytest.mark.parametrize(("state", "code"), [("stopping", 64), ("pending", 0)])
def test_handler_bakes_no_lookalike_while_the_build_instance_starts_or_stops(
    lambda_env: Path, state: str, code: int
) -> None:
    """The build instance is starting (for its bake) or stopping, and someone else launched an instance
    and tagged it as the build: counting only running or stopped instances, the lookalike was the only
    one, and became the family's next image."""
    write_policy(lambda_env, "enforce")
    builder, lookalike = launch(ROLE), launch(ROLE)
    held = ec2_backends[DEFAULT_ACCOUNT_ID][REGION].get_instance(builder)
    held._state.name, held._state.code = state, code

    with pytest.raises(
        baking.BakeError,
        match=f"{lookalike} \\(running\\), {builder} \\({state}\\)|{builder} \\({state}\\), {lookalike} \\(running\\)",
    ):
        bake_handler.handler(dict(SCHEDULED_EVENT), Context())
    assert own_images() == []


def test_handler_without_a_build_instance_fails_loudly(lambda_env: Path) -> None:
    write_policy(lambda_env, "enforce")

    with pytest.raises(baking.BakeError, match="carries the tags Role=pettracker-ml"):
        bake_handler.handler({"family": "pettracker-ml"}, Context())


@pytest.mark.parametrize("mode", ["enforce", "dry-run"])
def test_handler_refuses_when_several_instances_carry_the_bake_tag(lambda_env: Path, mode: str) -> None:
    write_policy(lambda_env, mode)
    builder = launch(ROLE, launched=NOW - timedelta(days=3))
    attacker = launch(ROLE, launched=NOW)

    with pytest.raises(baking.BakeError) as refused:
        bake_handler.handler({"family": "pettracker-ml"}, Context())

    assert builder in str(refused.value) and attacker in str(refused.value)
    assert own_images() == []  # no CreateImage


def test_handler_bakes_the_pinned_instance_even_with_a_later_tagged_one(lambda_env: Path) -> None:
    builder = launch(ROLE, launched=NOW - timedelta(days=3))
    write_policy(lambda_env, "enforce", instance_id=builder)
    launch(ROLE, launched=NOW)

    result = bake_handler.handler({"family": "pettracker-ml"}, Context())

    assert result["outcome"] == "baked" and result["instance_id"] == builder
    [image] = own_images()
    assert tags_of(image)["ami-janitor:baked-from"] == builder


@pytest.mark.parametrize("mode", ["enforce", "dry-run"])
def test_handler_in_a_region_the_family_does_not_bake_in_does_nothing(lambda_env: Path, mode: str) -> None:
    """The member template makes the bake rules in each region where some family bakes: a family
    whose build instance lives elsewhere (bake.regions) is not baked here, and that is no failure."""
    launch(ROLE)
    data = policy_data(mode)
    data["regions"] = [REGION, "eu-west-1"]
    data["families"][0]["bake"] |= {"instance_id": "i-0123456789abcdef0", "regions": ["eu-west-1"]}
    lambda_env.write_text(json.dumps(data))

    result = bake_handler.handler(dict(SCHEDULED_EVENT), Context())

    assert result == {"mode": mode, "region": REGION, "family": "pettracker-ml", "outcome": "not-here"}
    assert own_images() == []


def test_handler_permissions_are_the_unattended_bake_only() -> None:
    assert roles.BAKE_PERMISSIONS == [
        "dynamodb:DescribeTable",  # the ledger table is there
        "dynamodb:UpdateItem",  # the bake recorded on the new AMI's item
        "ec2:CreateImage",
        "ec2:CreateTags",
        "ec2:DescribeImages",  # a CreateImage retried after its answer was lost finds its image
        "ec2:DescribeInstances",
    ]
    assert set(roles.BAKE_PERMISSIONS) - {"dynamodb:DescribeTable"} < set(baker.PERMISSIONS)
    assert sorted(baker.PERMISSIONS) == baker.PERMISSIONS
