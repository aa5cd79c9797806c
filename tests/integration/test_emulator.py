"""The emulator's additions to moto behave as EC2 does, in process (mock_aws) and through its server."""

from __future__ import annotations

import importlib
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import moto
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from moto import mock_aws

from ami_janitor.core.model import Image
from ami_janitor.demo import emulator

REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture(scope="module")
def emulator_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        server, endpoint = emulator.start_server()
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(params=["in-process", "server"])
def ec2(request: pytest.FixtureRequest, fake_aws_env: None) -> Iterator[Any]:
    if request.param == "in-process":
        emulator.install()
        with mock_aws():
            yield boto3.client("ec2", region_name=REGION, **CREDENTIALS)
        return
    endpoint = request.getfixturevalue("emulator_endpoint")
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    # A call moto cannot do is an HTTP 500 in server mode: no retries, fail at once.
    config = Config(retries={"max_attempts": 1})
    yield boto3.client("ec2", region_name=REGION, endpoint_url=endpoint, config=config, **CREDENTIALS)


def make_image(ec2: Any, name: str, tag_specifications: list[Any] | None = None) -> str:
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
    image_id: str = ec2.create_image(
        InstanceId=instance["InstanceId"], Name=name, TagSpecifications=tag_specifications or []
    )["ImageId"]
    return image_id


def describe(ec2: Any, image_id: str) -> dict[str, Any]:
    image: dict[str, Any] = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    return image


def error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return str(excinfo.value.response["Error"]["Code"])


def test_deprecation_round_trips_rounded_to_the_minute(ec2: Any) -> None:
    image_id = make_image(ec2, "deprecated-1")
    at = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(days=2, seconds=40)
    assert ec2.enable_image_deprecation(ImageId=image_id, DeprecateAt=at)["Return"] is True
    raw = describe(ec2, image_id)
    assert raw["DeprecationTime"] == (at + timedelta(seconds=20)).strftime("%Y-%m-%dT%H:%M:00.000Z")
    assert Image.from_api(REGION, raw).deprecation_time == at + timedelta(seconds=20)

    ec2.disable_image_deprecation(ImageId=image_id)
    assert "DeprecationTime" not in describe(ec2, image_id)


def test_deprecation_refuses_the_past_and_unknown_images(ec2: Any) -> None:
    image_id = make_image(ec2, "deprecated-2")
    with pytest.raises(ClientError) as past:
        ec2.enable_image_deprecation(ImageId=image_id, DeprecateAt=datetime(2020, 1, 1, tzinfo=UTC))
    assert error_code(past) == "InvalidParameterValue"
    with pytest.raises(ClientError) as unknown:
        ec2.enable_image_deprecation(ImageId="ami-0000000000000000f", DeprecateAt=datetime.now(UTC))
    assert error_code(unknown) == "InvalidAMIID.NotFound"


def test_protected_image_refuses_deregistration(ec2: Any) -> None:
    image_id = make_image(ec2, "protected-1")
    ec2.enable_image_deregistration_protection(ImageId=image_id)
    raw = describe(ec2, image_id)
    assert raw["DeregistrationProtection"] == "enabled"
    assert Image.from_api(REGION, raw).deregistration_protection is True
    with pytest.raises(ClientError) as refused:
        ec2.deregister_image(ImageId=image_id)
    assert error_code(refused) == "OperationNotPermitted"

    ec2.disable_image_deregistration_protection(ImageId=image_id)
    assert describe(ec2, image_id)["DeregistrationProtection"] == "disabled"
    ec2.deregister_image(ImageId=image_id)
    assert ec2.describe_images(Owners=["self"])["Images"] == []


def test_protection_with_cooldown_still_protects_after_disabling(ec2: Any) -> None:
    image_id = make_image(ec2, "protected-2")
    ec2.enable_image_deregistration_protection(ImageId=image_id, WithCooldown=True)
    assert describe(ec2, image_id)["DeregistrationProtection"] == "enabled-with-cooldown"
    ec2.disable_image_deregistration_protection(ImageId=image_id)
    raw = describe(ec2, image_id)
    assert raw["DeregistrationProtection"].startswith("disabled-until ")
    assert Image.from_api(REGION, raw).deregistration_protection is True
    with pytest.raises(ClientError) as refused:
        ec2.deregister_image(ImageId=image_id)
    assert error_code(refused) == "OperationNotPermitted"


def test_disable_image_drops_launch_permissions_and_enable_does_not_restore(ec2: Any) -> None:
    image_id = make_image(ec2, "shared-1")
    ec2.modify_image_attribute(
        ImageId=image_id, LaunchPermission={"Add": [{"UserId": "111122223333"}, {"Group": "all"}]}
    )
    assert describe(ec2, image_id)["Public"] is True
    ec2.disable_image(ImageId=image_id)
    assert describe(ec2, image_id)["State"] == "disabled"
    permissions = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    assert permissions["LaunchPermissions"] == []
    ec2.enable_image(ImageId=image_id)
    raw = describe(ec2, image_id)
    assert (raw["State"], raw["Public"]) == ("available", False)


def test_create_image_tags_the_snapshot(ec2: Any) -> None:
    image_id = make_image(
        ec2,
        "tagged-1",
        [
            {"ResourceType": "image", "Tags": [{"Key": "Project", "Value": "PetTracker"}]},
            {"ResourceType": "snapshot", "Tags": [{"Key": "Backup", "Value": "no"}]},
        ],
    )
    raw = describe(ec2, image_id)
    assert raw["Tags"] == [{"Key": "Project", "Value": "PetTracker"}]
    snapshot_id = raw["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    snapshot = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
    assert snapshot["Tags"] == [{"Key": "Backup", "Value": "no"}]


def test_copy_image_honours_tag_specifications_and_client_token(ec2: Any) -> None:
    source = make_image(
        ec2, "source-1", [{"ResourceType": "image", "Tags": [{"Key": "Latest", "Value": "1"}]}]
    )
    specs = [
        {"ResourceType": "image", "Tags": [{"Key": "ami-janitor:source-image", "Value": source}]},
        {"ResourceType": "snapshot", "Tags": [{"Key": "Copy", "Value": "yes"}]},
    ]
    copy = ec2.copy_image(
        SourceImageId=source, SourceRegion=REGION, Name="copy-1", TagSpecifications=specs, ClientToken="tok-1"
    )["ImageId"]
    again = ec2.copy_image(SourceImageId=source, SourceRegion=REGION, Name="copy-1", ClientToken="tok-1")
    assert again["ImageId"] == copy
    # A new token makes a new copy, under a name of its own: names are unique per region.
    with pytest.raises(ClientError, match=r"InvalidAMIName\.Duplicate"):
        ec2.copy_image(SourceImageId=source, SourceRegion=REGION, Name="copy-1", ClientToken="tok-2")
    other = ec2.copy_image(SourceImageId=source, SourceRegion=REGION, Name="copy-2", ClientToken="tok-2")
    assert other["ImageId"] != copy
    # EC2's own record of the source, which DescribeImages filters on.
    found = ec2.describe_images(Owners=["self"], Filters=[{"Name": "source-image-id", "Values": [source]}])
    assert sorted(i["ImageId"] for i in found["Images"]) == sorted([copy, other["ImageId"]])

    raw = describe(ec2, copy)
    assert raw["Tags"] == [{"Key": "ami-janitor:source-image", "Value": source}]  # no source tags copied
    assert (raw["SourceImageId"], raw["SourceImageRegion"]) == (source, REGION)
    snapshot_id = raw["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    assert ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]["Tags"] == [
        {"Key": "Copy", "Value": "yes"}
    ]
    # EC2 remembers the token after the copy is gone: the same token answers with the old id.
    ec2.deregister_image(ImageId=copy)
    assert (
        ec2.copy_image(SourceImageId=source, SourceRegion=REGION, Name="c-1", ClientToken="tok-1")["ImageId"]
        == copy
    )


def test_set_image_fields_ages_an_image_records_a_launch_and_sets_the_architecture(ec2: Any) -> None:
    image_id = make_image(ec2, "aged-1")
    created = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    launched = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    emulator.set_image_fields(
        REGION, image_id, creation_date=created, last_launched=launched, architecture="arm64"
    )
    image = Image.from_api(REGION, describe(ec2, image_id))
    assert (image.created, image.last_launched, image.architecture) == (created, launched, "arm64")


def test_snapshot_shared_by_two_images_cannot_be_deleted(ec2: Any) -> None:
    first, second = make_image(ec2, "pair-1"), make_image(ec2, "pair-2")
    shared = describe(ec2, first)["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    emulator.set_image_fields(REGION, second, snapshot_id=shared)
    assert describe(ec2, second)["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"] == shared

    ec2.deregister_image(ImageId=first)
    with pytest.raises(ClientError) as in_use:
        ec2.delete_snapshot(SnapshotId=shared)
    assert error_code(in_use) == "InvalidSnapshot.InUse"
    ec2.deregister_image(ImageId=second)
    ec2.delete_snapshot(SnapshotId=shared)


def test_deregister_with_delete_associated_snapshots_keeps_moto_behaviour(ec2: Any) -> None:
    # Like a partition that predates the parameter: no DeleteSnapshotResults, the snapshot stays.
    image_id = make_image(ec2, "old-partition-1")
    snapshot_id = describe(ec2, image_id)["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    answer = ec2.deregister_image(ImageId=image_id, DeleteAssociatedSnapshots=True)
    assert "DeleteSnapshotResults" not in answer
    assert ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]


def test_an_action_moto_lacks_is_answered_invalid_action_like_ec2(ec2: Any) -> None:
    # EC2's answer where an action is not offered (an older partition): HTTP 400, InvalidAction in
    # EC2's error document. Never an HTML 500 page, which the janitor reads as a failing source.
    answers: list[tuple[int, bytes]] = []

    def record(http_response: Any, **_: Any) -> None:
        answers.append((http_response.status_code, http_response.content))

    ec2.meta.events.register("after-call.ec2.DescribeImageReferences", record)
    with pytest.raises(ClientError) as refused:
        ec2.describe_image_references(ImageIds=["ami-12345678"], IncludeAllResourceTypes=True)

    assert error_code(refused) == "InvalidAction"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    [(status, body)] = answers
    assert status == 400
    assert b"<Errors><Error><Code>InvalidAction</Code><Message>" in body
    assert b"<RequestID>" in body


def test_image_block_public_access_is_on_until_disabled(ec2: Any) -> None:
    assert ec2.get_image_block_public_access_state()["ImageBlockPublicAccessState"] == "block-new-sharing"
    assert ec2.disable_image_block_public_access()["ImageBlockPublicAccessState"] == "unblocked"
    assert ec2.get_image_block_public_access_state()["ImageBlockPublicAccessState"] == "unblocked"
    with pytest.raises(ClientError) as refused:
        ec2.enable_image_block_public_access(ImageBlockPublicAccessState="unblocked")
    assert error_code(refused) == "InvalidParameterValue"
    enabled = ec2.enable_image_block_public_access(ImageBlockPublicAccessState="block-new-sharing")
    assert enabled["ImageBlockPublicAccessState"] == "block-new-sharing"


def test_an_action_moto_implements_but_cannot_do_still_fails(ec2: Any) -> None:
    # Only a missing action is answered InvalidAction: moto's gaps inside an action stay visible.
    image_id = make_image(ec2, "reset-1")
    with pytest.raises(Exception) as failed:  # moto: NotImplementedError, or an HTML 500 from its server
        ec2.reset_image_attribute(ImageId=image_id, Attribute="launchPermission")
    assert not (isinstance(failed.value, ClientError) and error_code(failed) == "InvalidAction")


ABSENT_CALLS = {
    "rbin": ("list_rules", {"ResourceType": "EC2_IMAGE"}),
    "imagebuilder": ("list_image_recipes", {"owner": "Self"}),
}


@pytest.mark.parametrize("service", sorted(ABSENT_CALLS))
@pytest.mark.parametrize("mode", ["in-process", "server"])
def test_a_service_moto_lacks_is_answered_unknown_operation(
    mode: str, service: str, fake_aws_env: None, request: pytest.FixtureRequest
) -> None:
    # moto has no Recycle Bin nor Image Builder at all: the answer of a service that does not know the
    # operation (which the janitor reads as not offered here).
    config = Config(retries={"max_attempts": 1})
    operation, params = ABSENT_CALLS[service]
    if mode == "in-process":
        emulator.install()
        with mock_aws():
            client = boto3.client(service, region_name=REGION, config=config, **CREDENTIALS)  # type: ignore[call-overload]
            with pytest.raises(ClientError) as refused:
                getattr(client, operation)(**params)
    else:
        endpoint = request.getfixturevalue("emulator_endpoint")
        client = boto3.client(
            service, region_name=REGION, endpoint_url=endpoint, config=config, **CREDENTIALS
        )  # type: ignore[call-overload]
        with pytest.raises(ClientError) as refused:
            getattr(client, operation)(**params)

    assert error_code(refused) == "UnknownOperationException"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_install_is_idempotent() -> None:
    from moto.ec2.models.amis import AmiBackend

    emulator.install()
    wrapped = AmiBackend.deregister_image
    emulator.install()
    assert AmiBackend.deregister_image is wrapped


def test_other_moto_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moto, "__version__", "5.9.0")
    with pytest.raises(RuntimeError, match=r"moto 5\.2\.5.*5\.9\.0"):
        importlib.reload(emulator)
    monkeypatch.undo()
    importlib.reload(emulator)
