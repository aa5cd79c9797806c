"""The AWS adapter: moto for what it implements, botocore's Stubber for exact requests and what moto lacks."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import botocore.exceptions
import botocore.parsers
import botocore.session
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.session import Session
from botocore.stub import Stubber
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

from ami_janitor.aws import rotator
from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.inventory import (
    IMAGE_PERMISSIONS,
    count_calls,
    describe_image,
    load_details,
    load_images,
    load_inventory,
    load_launch_permissions,
    read_ledger_items,
)
from ami_janitor.aws.inventory.copy_sources import read_copy_sources
from ami_janitor.aws.inventory.pointers import ARCHITECTURES
from ami_janitor.aws.inventory.reading import SourceFailed
from ami_janitor.core.model import LaunchPermission, Reference, RegionInventory, RetiredSnapshot
from ami_janitor.core.planner import plan
from ami_janitor.core.policy import RETIRED_FROM_TAG, parse_policy
from ami_janitor.demo import emulator
from ami_janitor.roles import IMAGE_REFERENCES_DEPENDENCIES, INVENTORY_CALLED, INVENTORY_PERMISSIONS
from builders import image, policy
from sessions import botocore_session

REGION = "us-east-1"
ACCOUNT = "123456789012"
APP = {"Project": "App"}
IMAGE_REFERENCES_NOTE = (
    "DescribeImageReferences is not available in us-east-1; the other reference sources were used"
)
RECYCLE_BIN_NOTE = "Recycle Bin is not available in us-east-1; freed storage assumes no retention rule"
BLOCK_PUBLIC_ACCESS_NOTE = (
    "image block public access is off: anyone who may call ModifyImageAttribute can make an AMI public; "
    "`aws ec2 enable-image-block-public-access --region us-east-1 "
    "--image-block-public-access-state block-new-sharing`"
)


def refs(inventory: RegionInventory, kind: str | None = None) -> set[tuple[str, str, str, str]]:
    return {
        (r.image_id, r.kind, r.resource_id, r.detail)
        for r in inventory.references
        if kind is None or r.kind == kind
    }


# ---- moto --------------------------------------------------------------------------------------------


@functools.cache
def shared_botocore_session() -> botocore.session.Session:
    # Loading the service models once per module keeps these tests fast.
    return botocore.session.get_session()


def session() -> Session:
    return botocore_session(REGION, "testing", "testing", base=shared_botocore_session())


def moto_clients() -> RegionClients:
    return RegionClients(REGION, session())


def make_ami(name: str, *, tags: dict[str, str] | None = None, arch: str | None = None) -> str:
    ec2 = boto3.client("ec2", region_name=REGION)
    image_id = ec2.register_image(Name=name)["ImageId"]
    if tags:
        ec2.create_tags(Resources=[image_id], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
    if arch:
        # moto's register_image drops Architecture; its model field is what DescribeImages reports.
        ec2_backends[DEFAULT_ACCOUNT_ID][REGION].amis[image_id].architecture = arch
    return image_id


def family_ami() -> str:
    """An AMI of the policy's family: a region's references are read only where the plan has an AMI to
    decide on."""
    return make_ami("app-0", tags=APP)


def make_template(name: str, image_ids: list[str]) -> str:
    """A launch template whose version n (from 1) names image_ids[n-1]; the default stays version 1."""
    ec2 = boto3.client("ec2", region_name=REGION)
    template_id = ec2.create_launch_template(
        LaunchTemplateName=name, LaunchTemplateData={"ImageId": image_ids[0]}
    )["LaunchTemplate"]["LaunchTemplateId"]
    for image_id in image_ids[1:]:
        ec2.create_launch_template_version(
            LaunchTemplateId=template_id, LaunchTemplateData={"ImageId": image_id}
        )
    return template_id


def group(name: str, **source: Any) -> None:
    boto3.client("autoscaling", region_name=REGION).create_auto_scaling_group(
        AutoScalingGroupName=name,
        MinSize=0,
        MaxSize=1,
        DesiredCapacity=0,
        AvailabilityZones=["us-east-1a"],
        **source,
    )


@pytest.mark.usefixtures("moto_aws")
def test_images_are_every_self_owned_ami_with_tags_architecture_and_snapshots() -> None:
    app = make_ami("app-1", tags=APP, arch="arm64")
    other = make_ami("other-1")
    raw = boto3.client("ec2", region_name=REGION).describe_images(ImageIds=[app])["Images"][0]

    inventory = load_inventory(moto_clients(), policy())

    assert inventory.error is None
    assert {i.image_id for i in inventory.images} == {app, other}  # not only the family's
    loaded = next(i for i in inventory.images if i.image_id == app)
    assert loaded.region == REGION
    assert loaded.name == "app-1"
    assert loaded.tags == APP
    assert loaded.architecture == "arm64"
    assert loaded.snapshot_ids == (raw["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"],)
    assert loaded.size_gib == 15
    # moto implements neither DescribeImageReferences nor Recycle Bin: both are notes, not failures;
    # DescribeImageReferences is asked only about the AMIs a plan chose, after it.
    assert inventory.notes == (RECYCLE_BIN_NOTE,)
    detailed = load_details(moto_clients(), policy(), inventory, [app])
    assert detailed.error is None
    assert detailed.notes == (RECYCLE_BIN_NOTE, IMAGE_REFERENCES_NOTE)
    assert next(i for i in detailed.images if i.image_id == app).launch_permissions == ()


@pytest.mark.usefixtures("moto_aws")
def test_instances_in_any_state_but_terminated_are_references() -> None:
    ec2 = boto3.client("ec2", region_name=REGION)
    family_ami()
    running, stopped, terminated = make_ami("run-1"), make_ami("stop-1"), make_ami("term-1")

    def launch(image_id: str, name: str | None = None) -> str:
        tags: list[Any] = (
            [{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}] if name else []
        )
        answer = ec2.run_instances(ImageId=image_id, MinCount=1, MaxCount=1, TagSpecifications=tags)
        return str(answer["Instances"][0]["InstanceId"])

    first, second, third = launch(running), launch(stopped, "web-1"), launch(terminated)
    ec2.stop_instances(InstanceIds=[second])
    ec2.terminate_instances(InstanceIds=[third])

    inventory = load_inventory(moto_clients(), policy())

    assert refs(inventory, "instance") == {
        (running, "instance", first, f"used by instance {first} (running)"),
        (stopped, "instance", second, f"used by instance {second} (web-1, stopped)"),
    }


@pytest.mark.usefixtures("moto_aws")
@pytest.mark.parametrize(
    ("mode", "versions"),
    [("all", {1, 2, 3, 4}), ("default-and-latest", {1, 4}), (1, {1, 4}), (2, {1, 3, 4})],
)
def test_launch_template_versions_follow_the_policy_mode(mode: str | int, versions: set[int]) -> None:
    family_ami()
    images = [make_ami(f"web-{n}") for n in range(1, 5)]
    web = make_template("web", images)
    single = make_ami("db-1")
    db = make_template("db", [single])

    inventory = load_inventory(moto_clients(), policy(references={"launch_template_versions": mode}))

    expected = {
        (images[n - 1], "launch-template", web, f"referenced by launch template {web} (web) version {n}")
        for n in versions
    }
    expected.add((single, "launch-template", db, f"referenced by launch template {db} (db) version 1"))
    assert refs(inventory, "launch-template") == expected


@pytest.mark.usefixtures("moto_aws")
def test_resolve_ssm_aliases_are_resolved_by_the_adapter() -> None:
    ssm = boto3.client("ssm", region_name=REGION)
    family_ami()
    old, new = make_ami("golden-1"), make_ami("golden-2")
    ssm.put_parameter(Name="/golden/ami", Value=old, Type="String")
    ssm.put_parameter(Name="/golden/ami", Value=new, Type="String", Overwrite=True)
    aliases = ["resolve:ssm:/golden/ami", "resolve:ssm:/golden/ami:1", "resolve:ssm:/missing/ami"]
    ec2 = boto3.client("ec2", region_name=REGION)
    template = ec2.create_launch_template(
        LaunchTemplateName="web", LaunchTemplateData={"ImageId": aliases[0]}
    )
    web = template["LaunchTemplate"]["LaunchTemplateId"]
    for alias in aliases[1:]:
        ec2.create_launch_template_version(LaunchTemplateId=web, LaunchTemplateData={"ImageId": alias})

    inventory = load_inventory(moto_clients(), policy())

    assert inventory.error is None
    subject = f"launch template {web} (web) version"
    assert refs(inventory, "launch-template") == {
        (new, "launch-template", web, f"{subject} 1 resolves resolve:ssm:/golden/ami to it"),
        (old, "launch-template", web, f"{subject} 2 resolves resolve:ssm:/golden/ami:1 to it"),
    }
    assert (
        f"{subject} 3 names resolve:ssm:/missing/ami, a parameter that does not exist or cannot be read"
        in inventory.notes
    )


@pytest.mark.usefixtures("moto_aws")
def test_auto_scaling_groups_pinned_versions_mixed_instances_and_launch_configurations() -> None:
    family_ami()
    images = [make_ami(f"web-{n}") for n in range(1, 4)]
    web = make_template("web", images)
    configured = make_ami("legacy-1")
    boto3.client("autoscaling", region_name=REGION).create_launch_configuration(
        LaunchConfigurationName="lc-1", ImageId=configured, InstanceType="t3.micro"
    )
    group("pinned", LaunchTemplate={"LaunchTemplateId": web, "Version": "2"})
    mixed = {
        "LaunchTemplateSpecification": {"LaunchTemplateName": "web", "Version": "$Latest"},
        "Overrides": [
            {
                "InstanceType": "t3.micro",
                "LaunchTemplateSpecification": {"LaunchTemplateId": web, "Version": "1"},
            }
        ],
    }
    group("mixed", MixedInstancesPolicy={"LaunchTemplate": mixed})
    group("legacy", LaunchConfigurationName="lc-1")
    clients = moto_clients()
    calls = count_calls(clients.ec2)

    # default-and-latest does not list version 2: the pinned version must be fetched, not missed.
    inventory = load_inventory(clients, policy(references={"launch_template_versions": "default-and-latest"}))

    assert inventory.error is None
    assert calls["ec2:DescribeLaunchTemplateVersions"] == 2  # the listing, then the pinned version
    by = "referenced by Auto Scaling group"
    assert refs(inventory, "auto-scaling-group") == {
        (images[1], "auto-scaling-group", "pinned", f"{by} pinned (launch template {web} version 2)"),
        (images[2], "auto-scaling-group", "mixed", f"{by} mixed (launch template {web} version 3)"),
        (images[0], "auto-scaling-group", "mixed", f"{by} mixed (launch template {web} version 1)"),
        (configured, "auto-scaling-group", "legacy", f"{by} legacy (launch configuration lc-1)"),
    }
    assert refs(inventory, "launch-configuration") == {
        (configured, "launch-configuration", "lc-1", "referenced by launch configuration lc-1")
    }


@pytest.mark.usefixtures("moto_aws")
def test_ssm_parameters_naming_an_ami_are_references_and_secure_strings_are_never_read() -> None:
    ssm = boto3.client("ssm", region_name=REGION)
    family_ami()
    one, two, three, secret = (make_ami(f"p-{n}") for n in range(4))
    ssm.put_parameter(Name="/app/ami", Value=one, Type="String", DataType="aws:ec2:image")
    ssm.put_parameter(Name="/app/amis", Value=f"{two},{three}", Type="StringList")
    ssm.put_parameter(Name="/app/secret", Value=secret, Type="SecureString")
    ssm.put_parameter(Name="/app/greeting", Value="hello", Type="String")

    inventory = load_inventory(moto_clients(), policy())

    assert refs(inventory, "ssm-parameter") == {
        (one, "ssm-parameter", "/app/ami", "value of SSM parameter /app/ami"),
        (two, "ssm-parameter", "/app/amis", "value of SSM parameter /app/amis"),
        (three, "ssm-parameter", "/app/amis", "value of SSM parameter /app/amis"),
    }


@pytest.mark.usefixtures("moto_aws")
def test_latest_pointer_parameters_are_read_per_architecture_and_are_not_references() -> None:
    ssm = boto3.client("ssm", region_name=REGION)
    x86 = make_ami("app-x86", tags=APP, arch="x86_64")
    make_ami("app-arm", tags=APP, arch="arm64")
    ssm.put_parameter(Name="/ami/app/x86_64/latest", Value=x86, Type="String")
    ssm.put_parameter(Name="/ami/app/i386/latest", Value=x86, Type="String")  # a pointer, if stale
    # A user's parameter whose name would fit `{arch}` as a pattern: it is no pointer, so a reference.
    pinned = make_ami("app-pinned", tags=APP, arch="x86_64")
    ssm.put_parameter(Name="/ami/app/prod/latest", Value=pinned, Type="String")
    clients = moto_clients()
    calls = count_calls(clients.ssm)
    family = {"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/{arch}/latest"}}

    inventory = load_inventory(clients, policy(family))

    assert inventory.parameters == {"/ami/app/x86_64/latest": x86}  # arm64's is absent, so left out
    assert refs(inventory, "ssm-parameter") == {
        (pinned, "ssm-parameter", "/ami/app/prod/latest", "value of SSM parameter /ami/app/prod/latest")
    }
    assert calls["ssm:GetParameters"] == 2  # the scan's batch, then the absent arm64 pointer


@pytest.mark.usefixtures("moto_aws")
def test_a_copy_the_ledger_does_not_record_counts_from_its_sources_creation() -> None:
    """A copy made by hand of an old AMI: its source's CreationDate, asked in the source's region (one
    call for all such copies there), or this region's own AMI; a source nobody can see leaves a note."""
    old = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    source = make_ami("app-old", tags=APP)
    emulator.set_image_fields(REGION, source, creation_date=old)
    west = boto3.client("ec2", region_name="eu-west-1")
    late = west.copy_image(SourceImageId=source, SourceRegion=REGION, Name="app-old-copy")["ImageId"]
    here = west.register_image(Name="app-west")["ImageId"]
    emulator.set_image_fields("eu-west-1", here, creation_date=old)
    local = west.copy_image(SourceImageId=here, SourceRegion="eu-west-1", Name="app-west-copy")["ImageId"]
    gone = make_ami("app-gone", tags=APP)
    orphan = west.copy_image(SourceImageId=gone, SourceRegion=REGION, Name="app-gone-copy")["ImageId"]
    boto3.client("ec2", region_name=REGION).deregister_image(ImageId=gone)
    west.create_tags(Resources=[late, here, local, orphan], Tags=[{"Key": "Project", "Value": "App"}])
    clients = RegionClients("eu-west-1", session())
    elsewhere = count_calls(clients.ec2_in(REGION))

    inventory = load_inventory(clients, policy())

    assert inventory.error is None
    images = {i.image_id: i for i in inventory.images}
    assert images[late].copied_from_created == old and images[late].order_time == old
    assert images[local].order_time == old
    assert images[orphan].copied_from_created is None
    assert images[orphan].order_time == images[orphan].created
    assert (
        f"{orphan} is a copy of {gone} ({REGION}), which is not visible: it counts from its own creation"
        in (inventory.notes)
    )
    assert elsewhere == {"ec2:DescribeImages": 1}


def test_the_sources_of_copies_exact_request_and_a_region_that_cannot_be_read() -> None:
    """A source region the account may not read (a region-deny SCP) leaves its copies counting from
    their own creation, with a note: it does not stop the region's plans and events."""
    source_ec2 = botocore.session.get_session().create_client(
        "ec2", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    copy = image(copied_from="ami-0123456789abcdef0", copied_from_region=REGION, region="eu-west-1")
    request = {
        "Filters": [{"Name": "image-id", "Values": ["ami-0123456789abcdef0"]}],
        "IncludeDeprecated": True,
        "IncludeDisabled": True,
        "MaxResults": 1000,
    }
    created = {"ImageId": "ami-0123456789abcdef0", "CreationDate": "2025-01-02T03:04:05.000Z"}
    with Stubber(source_ec2) as stub:
        stub.add_response("describe_images", {"Images": [created]}, request)
        stub.add_client_error(
            "describe_images", "UnauthorizedOperation", "denied by a policy", expected_params=request
        )
        [aged], notes = read_copy_sources((copy,), "eu-west-1", policy(), lambda _region: source_ec2)
        assert aged.order_time == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC) and notes == []
        [unread], notes = read_copy_sources((copy,), "eu-west-1", policy(), lambda _region: source_ec2)
    assert unread.order_time == copy.created
    [note] = notes
    assert note.startswith(
        f"{copy.image_id} is a copy of ami-0123456789abcdef0 ({REGION}), which is not readable "
        f"(ec2:DescribeImages (the sources of copies, in {REGION}): UnauthorizedOperation"
    )
    assert note.endswith(": it counts from its own creation")


@pytest.mark.parametrize(
    ("code", "status"), [("RequestLimitExceeded", 503), ("InternalError", 500), ("Unavailable", 503)]
)
def test_a_passing_failure_of_the_source_region_stops_the_region(code: str, status: int) -> None:
    """Throttling or a 5xx in the source region is no lasting deny: the copy's order is not known (it
    would count as newer than it is, and could take a keep slot or Latest), so the read fails."""
    source_ec2 = botocore.session.get_session().create_client(
        "ec2", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    copy = image(copied_from="ami-0123456789abcdef0", copied_from_region=REGION, region="eu-west-1")
    with Stubber(source_ec2) as stub:
        stub.add_client_error("describe_images", code, "try again", http_status_code=status)
        with pytest.raises(SourceFailed, match=f"the sources of copies, in {REGION}\\): {code}"):
            read_copy_sources((copy,), "eu-west-1", policy(), lambda _region: source_ec2)


@pytest.mark.parametrize("creation_date", ["2025-01-0", "Thu, 02 Jan 2025 03:04:05 GMT", "", None])
def test_a_copy_source_listed_without_a_readable_creation_date_stops_the_region(
    creation_date: str | None,
) -> None:
    """A source listed with a CreationDate that is no time (or none) is a malformed answer, not a
    source gone: counted from its own creation, a late copy of an old AMI would take a keep slot."""
    source_ec2 = botocore.session.get_session().create_client(
        "ec2", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    copy = image(copied_from="ami-0123456789abcdef0", copied_from_region=REGION, region="eu-west-1")
    listed: dict[str, Any] = {"ImageId": "ami-0123456789abcdef0"}
    if creation_date is not None:
        listed["CreationDate"] = creation_date
    with Stubber(source_ec2) as stub:
        stub.add_response("describe_images", {"Images": [listed]})
        with pytest.raises(SourceFailed, match="MalformedResponse: ValueError: image ami-0123456789abcdef0"):
            read_copy_sources((copy,), "eu-west-1", policy(), lambda _region: source_ec2)


@pytest.mark.usefixtures("moto_aws")
def test_a_region_whose_copy_sources_cannot_be_read_is_not_planned() -> None:
    """The inventory of a region with a hand-made copy of an AMI in a region that answers throttled:
    the region's error, and no images to plan from."""
    source = make_ami("app-old", tags=APP)
    west = boto3.client("ec2", region_name="eu-west-1")
    late = west.copy_image(SourceImageId=source, SourceRegion=REGION, Name="app-old-copy")["ImageId"]
    west.create_tags(Resources=[late], Tags=[{"Key": "Project", "Value": "App"}])
    source_ec2 = botocore.session.get_session().create_client(
        "ec2", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    clients = RegionClients("eu-west-1", session(), **{f"ec2 in {REGION}": source_ec2})
    with Stubber(source_ec2) as stub:
        stub.add_client_error("describe_images", "RequestLimitExceeded", "slow down", http_status_code=503)
        inventory = load_inventory(clients, policy())
        stub.assert_no_pending_responses()
    assert inventory.images == ()
    assert inventory.error is not None
    assert inventory.error.startswith(
        f"ec2:DescribeImages (the sources of copies, in {REGION}): RequestLimitExceeded"
    )


@pytest.mark.usefixtures("moto_aws")
def test_snapshots_tagged_retired_from_are_listed() -> None:
    ec2 = boto3.client("ec2", region_name=REGION)
    make_ami("plain-1")
    image_id = make_ami("gone-1")
    snapshot = ec2.describe_images(ImageIds=[image_id])["Images"][0]["BlockDeviceMappings"][0]["Ebs"][
        "SnapshotId"
    ]
    ec2.create_tags(Resources=[snapshot], Tags=[{"Key": RETIRED_FROM_TAG, "Value": image_id}])

    inventory = load_inventory(moto_clients(), policy())

    assert inventory.retired_snapshots == (RetiredSnapshot(snapshot_id=snapshot, image_id=image_id),)


@pytest.mark.usefixtures("moto_aws")
def test_the_inventory_makes_no_call_per_ami() -> None:
    for n in range(3):
        make_ami(f"app-{n}", tags=APP)
    clients = moto_clients()
    few = count_calls(clients.ec2, clients.ssm, clients.autoscaling, clients.batch, clients.emr, clients.rbin)
    load_inventory(clients, policy())
    few_calls = dict(few)
    for n in range(3, 15):
        make_ami(f"app-{n}", tags=APP)
    many = count_calls(
        clients.ec2, clients.ssm, clients.autoscaling, clients.batch, clients.emr, clients.rbin
    )

    load_inventory(clients, policy())

    assert dict(many) == few_calls


@pytest.mark.usefixtures("moto_aws")
def test_launch_permissions_are_read_only_for_the_requested_amis() -> None:
    ec2 = boto3.client("ec2", region_name=REGION)
    shared, private = make_ami("shared-1"), make_ami("private-1")
    ec2.modify_image_attribute(ImageId=shared, LaunchPermission={"Add": [{"UserId": "210987654321"}]})
    clients = moto_clients()
    inventory = load_inventory(clients, policy())
    calls = count_calls(clients.ec2)

    loaded = load_launch_permissions(clients, inventory, [shared, shared, "ami-0000000000000dead"])

    assert calls == {"ec2:DescribeImageAttribute": 1}
    by_id = {i.image_id: i for i in loaded.images}
    assert by_id[shared].launch_permissions == (LaunchPermission(kind="user", value="210987654321"),)
    assert by_id[private].launch_permissions is None


@pytest.mark.usefixtures("moto_aws")
def test_load_images_reads_only_the_amis_and_the_latest_pointers() -> None:
    x86 = make_ami("app-x86", tags=APP, arch="x86_64")
    boto3.client("ssm", region_name=REGION).put_parameter(
        Name="/ami/app/x86_64/latest", Value=x86, Type="String"
    )
    boto3.client("ec2", region_name=REGION).run_instances(ImageId=x86, MinCount=1, MaxCount=1)
    clients = moto_clients()
    calls = count_calls(
        clients.ec2, clients.ssm, clients.autoscaling, clients.batch, clients.emr, clients.rbin
    )
    family = {"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/{arch}/latest"}}

    inventory = load_images(clients, policy(family))

    assert inventory.error is None
    assert [i.image_id for i in inventory.images] == [x86]
    assert inventory.parameters == {"/ami/app/x86_64/latest": x86}
    assert inventory.references == ()
    assert set(calls) <= set(IMAGE_PERMISSIONS) <= set(INVENTORY_PERMISSIONS)


@pytest.mark.usefixtures("moto_aws")
def test_build_instances_are_the_live_instances_a_bake_names() -> None:
    ec2 = boto3.client("ec2", region_name=REGION)
    base = make_ami("base-1")

    def launch(tags: dict[str, str]) -> str:
        spec = [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
        answer = ec2.run_instances(ImageId=base, MinCount=1, MaxCount=1, TagSpecifications=spec)
        return str(answer["Instances"][0]["InstanceId"])

    tagged, pinned, other, gone = (
        launch({"Role": "build", "Name": "b"}),
        launch({"Name": "p"}),
        launch({"Role": "other"}),
        launch({"Role": "build"}),
    )
    ec2.stop_instances(InstanceIds=[tagged])
    ec2.terminate_instances(InstanceIds=[gone])
    bakes = parse_policy(
        {
            "regions": [REGION],
            "families": [
                {"name": "app", "match": {"tags": APP}, "bake": {"instance_tag": {"Role": "build"}}},
                {"name": "pinned", "match": {"name": "pinned-*"}, "bake": {"instance_id": pinned}},
            ],
        }
    )

    inventory = load_inventory(moto_clients(), bakes)

    assert inventory.error is None
    recorded = {i.instance_id: i for i in inventory.build_instances}
    assert sorted(recorded) == sorted([tagged, pinned])
    assert other not in recorded and gone not in recorded
    assert (recorded[tagged].state, recorded[tagged].tags) == ("stopped", {"Role": "build", "Name": "b"})
    assert recorded[pinned].launched is not None


@pytest.mark.usefixtures("moto_aws")
def test_describe_image_finds_one_ami_or_none() -> None:
    image_id = make_ami("app-1", tags=APP)
    boto3.client("ec2", region_name=REGION).disable_image(ImageId=image_id)

    found = describe_image(moto_clients(), image_id)

    assert found is not None and found.image_id == image_id and found.tags == APP
    assert describe_image(moto_clients(), ami(0xDEAD)) is None


# ---- Stubber -----------------------------------------------------------------------------------------

SERVICES = ("ec2", "ssm", "autoscaling", "batch", "emr", "rbin", "dynamodb")
BLOCK_PUBLIC_ACCESS_CALL: tuple[str, str, dict[str, Any]] = ("ec2", "get_image_block_public_access_state", {})
BLOCKED = {"ImageBlockPublicAccessState": "block-new-sharing", "ManagedBy": "account"}
LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]
IMAGES = {"Owners": ["self"], "IncludeDeprecated": True, "IncludeDisabled": True, "MaxResults": 1000}
INSTANCES = {"Filters": [{"Name": "instance-state-name", "Values": LIVE_STATES}], "MaxResults": 1000}
PARAMETERS = {
    "ParameterFilters": [{"Key": "Type", "Option": "Equals", "Values": ["String", "StringList"]}],
    "MaxResults": 50,
}
EMR_STATES = {"ClusterStates": ["STARTING", "BOOTSTRAPPING", "RUNNING", "WAITING"]}
SNAPSHOTS = {
    "OwnerIds": ["self"],
    "Filters": [{"Name": "tag-key", "Values": [RETIRED_FROM_TAG]}],
    "MaxResults": 1000,
}
LT = "lt-0aaaaaaaaaaaaaaaa"
TABLE = "ami-janitor-ledger"
CREATED = datetime(2026, 1, 1, tzinfo=UTC)


def ami(n: int) -> str:
    return f"ami-{n:017x}"


class Stubbed:
    """Real boto3 clients, each behind a Stubber that checks every request's exact parameters."""

    def __init__(self) -> None:
        config = Config(retries={"max_attempts": 1})
        self.raw = {name: session().create_client(name, config=config) for name in SERVICES}
        self.stubs = {name: Stubber(client) for name, client in self.raw.items()}
        self.clients = RegionClients(REGION, read_workers=1, **self.raw)  # the Stubber answers in order
        for stub in self.stubs.values():
            stub.activate()

    def add(self, service: str, method: str, response: dict[str, Any], params: dict[str, Any]) -> None:
        self.stubs[service].add_response(method, response, params)

    def fail(self, service: str, method: str, code: str, params: dict[str, Any], status: int = 400) -> None:
        self.stubs[service].add_client_error(
            method,
            service_error_code=code,
            service_message=f"{code} here",
            http_status_code=status,
            expected_params=params,
        )

    def fail_after_answer(
        self, service: str, method: str, error: Callable[[Any], Exception], params: dict[str, Any]
    ) -> None:
        """The call is answered (an empty stubbed answer), then raises `error(operation model)`: for
        failures the Stubber cannot queue (parse errors, exceptions from the HTTP layer)."""
        self.add(service, method, {}, params)
        client = self.raw[service]
        operation = client.meta.method_to_api_mapping[method]

        def fail(model: Any, **_: Any) -> None:
            raise error(model)

        client.meta.events.register(
            f"after-call.{client.meta.service_model.service_id.hyphenize()}.{operation}", fail
        )

    def permissions(self, *image_ids: str) -> None:
        """Empty launch permissions of `image_ids`, read after DescribeImageReferences."""
        for image_id in image_ids:
            self.add(
                "ec2",
                "describe_image_attribute",
                {"LaunchPermissions": []},
                {"ImageId": image_id, "Attribute": "launchPermission"},
            )

    def verify(self) -> None:
        for stub in self.stubs.values():
            stub.assert_no_pending_responses()

    def _no_recycle_bin_rules(self) -> None:
        for kind in ("EC2_IMAGE", "EBS_SNAPSHOT"):
            self.add("rbin", "list_rules", {"Rules": []}, {"ResourceType": kind, "MaxResults": 1000})

    def queue(self, **steps: Callable[[], Any] | None) -> None:
        """Queues a whole inventory's calls, each source empty unless a step replaces it."""
        defaults: dict[str, Callable[[], Any] | None] = {
            # One AMI of the family: where there is none, no reference source is read.
            "images": lambda: self.add("ec2", "describe_images", {"Images": [FAMILY_IMAGE]}, IMAGES),
            "instances": lambda: self.add("ec2", "describe_instances", {"Reservations": []}, INSTANCES),
            "parameters": lambda: self.add("ssm", "describe_parameters", {"Parameters": []}, PARAMETERS),
            "templates": lambda: self.add(
                "ec2", "describe_launch_templates", {"LaunchTemplates": []}, {"MaxResults": 200}
            ),
            "configurations": lambda: self.add(
                "autoscaling",
                "describe_launch_configurations",
                {"LaunchConfigurations": []},
                {"MaxRecords": 100},
            ),
            "groups": lambda: self.add(
                "autoscaling", "describe_auto_scaling_groups", {"AutoScalingGroups": []}, {"MaxRecords": 100}
            ),
            "spot": lambda: self.add(
                "ec2", "describe_spot_fleet_requests", {"SpotFleetRequestConfigs": []}, {"MaxResults": 1000}
            ),
            "spot_requests": lambda: self.add(
                "ec2", "describe_spot_instance_requests", {"SpotInstanceRequests": []}, {"MaxResults": 1000}
            ),
            "fleets": lambda: self.add("ec2", "describe_fleets", {"Fleets": []}, {"MaxResults": 1000}),
            "batch": lambda: self.add(
                "batch", "describe_compute_environments", {"computeEnvironments": []}, {"maxResults": 100}
            ),
            "emr": lambda: self.add("emr", "list_clusters", {"Clusters": []}, EMR_STATES),
            "missing_versions": None,
            "batch_versions": None,
            "aliases": None,
            "pointers": None,
            "snapshots": lambda: self.add("ec2", "describe_snapshots", {"Snapshots": []}, SNAPSHOTS),
            "rbin": self._no_recycle_bin_rules,
            "block_public_access": lambda: self.add(
                *BLOCK_PUBLIC_ACCESS_CALL[:2], BLOCKED, BLOCK_PUBLIC_ACCESS_CALL[2]
            ),
            # The Scan itself says the table is missing (no DescribeTable first).
            "ledger": lambda: self.fail("dynamodb", "scan", "ResourceNotFoundException", SCAN),
        }
        unknown = set(steps) - set(defaults)
        assert not unknown, f"unknown steps {unknown}"
        for name, default in defaults.items():
            step = steps.get(name, default)
            if step is not None:
                step()


@pytest.fixture
def stubbed(fake_aws_env: None) -> Iterator[Stubbed]:
    yield Stubbed()


SCAN = {"TableName": TABLE, "ConsistentRead": True, "Limit": 1000}


def raw_image(image_id: str, name: str, tags: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "ImageId": image_id,
        "Name": name,
        "Architecture": "x86_64",
        "CreationDate": "2026-01-01T00:00:00.000Z",
        "State": "available",
        "RootDeviceType": "ebs",
        "Public": False,
        "Tags": [{"Key": k, "Value": v} for k, v in (tags or {}).items()],
        "BlockDeviceMappings": [
            {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": f"snap-{image_id[4:]}", "VolumeSize": 8}}
        ],
        **extra,
    }


FAMILY_IMAGE = raw_image(ami(0xFA), "app-0", APP)


def raw_version(number: int, image_id: str, *, default: bool = False, template: str = LT) -> dict[str, Any]:
    return {
        "LaunchTemplateId": template,
        "LaunchTemplateName": "web",
        "VersionNumber": number,
        "DefaultVersion": default,
        "LaunchTemplateData": {"ImageId": image_id},
    }


def raw_template(default: int, latest: int) -> dict[str, Any]:
    return {
        "LaunchTemplateId": LT,
        "LaunchTemplateName": "web",
        "DefaultVersionNumber": default,
        "LatestVersionNumber": latest,
    }


def raw_group(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "AutoScalingGroupName": name,
        "MinSize": 0,
        "MaxSize": 1,
        "DesiredCapacity": 0,
        "DefaultCooldown": 300,
        "AvailabilityZones": ["us-east-1a"],
        "HealthCheckType": "EC2",
        "CreatedTime": CREATED,
        **fields,
    }


def web_template_all(s: Stubbed, versions: list[dict[str, Any]], default: int = 1) -> Callable[[], None]:
    """The 'all' listing of one template 'web' whose versions are given."""

    def step() -> None:
        latest = max(v["VersionNumber"] for v in versions)
        s.add(
            "ec2",
            "describe_launch_templates",
            {"LaunchTemplates": [raw_template(default, latest)]},
            {"MaxResults": 200},
        )
        s.add(
            "ec2",
            "describe_launch_template_versions",
            {"LaunchTemplateVersions": versions},
            {"LaunchTemplateId": LT, "MaxResults": 200},
        )

    return step


def test_describe_images_asks_for_every_self_owned_ami_including_deprecated_and_disabled(
    stubbed: Stubbed,
) -> None:
    s = stubbed
    launched = "2026-11-20T10:00:00.000Z"
    first = raw_image(ami(1), "app-1", APP, LastLaunchedTime=launched, DeprecationTime="2026-12-01T00:00:00Z")
    second = raw_image(ami(2), "other-1", State="disabled")

    def two_pages() -> None:
        s.add("ec2", "describe_images", {"Images": [first], "NextToken": "page-2"}, IMAGES)
        s.add("ec2", "describe_images", {"Images": [second]}, {**IMAGES, "NextToken": "page-2"})

    s.queue(images=two_pages)  # DescribeImageReferences waits for the plan (load_details)

    inventory = load_inventory(s.clients, policy())

    s.verify()
    assert inventory.error is None
    assert [i.image_id for i in inventory.images] == [ami(1), ami(2)]
    assert inventory.images[0].last_launched == datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
    assert inventory.images[0].deprecation_time == datetime(2026, 12, 1, tzinfo=UTC)
    assert inventory.images[1].state == "disabled"


def test_image_references_are_asked_in_batches_and_skip_terminated_instances(stubbed: Stubbed) -> None:
    s = stubbed
    family = [raw_image(ami(n), f"app-{n}", APP) for n in range(1, 13)]
    ids = sorted(ami(n) for n in range(1, 13))
    arn = f"arn:aws:ec2:{REGION}:{ACCOUNT}"
    recipe = f"arn:aws:imagebuilder:{REGION}:{ACCOUNT}:image-recipe/web/1.0.0"
    live = {"InstanceId": "i-0live", "ImageId": ami(1), "State": {"Code": 16, "Name": "running"}}
    first_page = [
        {"ImageId": ami(1), "ResourceType": "ec2:Instance", "Arn": f"{arn}:instance/i-0live"},
        {"ImageId": ami(2), "ResourceType": "ec2:Instance", "Arn": f"{arn}:instance/i-0dead"},
        {"ImageId": ami(3), "ResourceType": "imagebuilder:ImageRecipe", "Arn": recipe},
        {"ImageId": ami(4), "ResourceType": "ec2:LaunchTemplate", "Arn": f"{arn}:launch-template/{LT}"},
    ]
    second_page = [
        {
            "ImageId": ami(5),
            "ResourceType": "ssm:Parameter",
            "Arn": f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/app/ami",
        }
    ]
    asked = {"IncludeAllResourceTypes": True}

    def image_references() -> None:
        s.add(
            "ec2",
            "describe_image_references",
            {"ImageReferences": first_page, "NextToken": "more"},
            {"ImageIds": ids[:10], **asked},
        )
        s.add(
            "ec2",
            "describe_image_references",
            {"ImageReferences": second_page},
            {"ImageIds": ids[:10], **asked, "NextToken": "more"},
        )
        s.add("ec2", "describe_image_references", {"ImageReferences": []}, {"ImageIds": ids[10:], **asked})

    s.queue(
        images=lambda: s.add("ec2", "describe_images", {"Images": family}, IMAGES),
        instances=lambda: s.add(
            "ec2", "describe_instances", {"Reservations": [{"Instances": [live]}]}, INSTANCES
        ),
    )
    image_references()
    s.permissions(*ids)

    scanned = load_inventory(s.clients, policy())
    inventory = load_details(s.clients, policy(), scanned, ids)

    s.verify()
    assert refs(inventory) == {
        (ami(1), "instance", "i-0live", "used by instance i-0live (running)"),  # once: already known
        (
            ami(3),
            "image-builder-recipe",
            recipe,
            f"referenced by imagebuilder:ImageRecipe {recipe} (DescribeImageReferences)",
        ),
        (ami(4), "launch-template", LT, f"referenced by ec2:LaunchTemplate {LT} (DescribeImageReferences)"),
        (
            ami(5),
            "ssm-parameter",
            "/app/ami",
            "referenced by ssm:Parameter /app/ami (DescribeImageReferences)",
        ),
    }


@pytest.mark.parametrize(("code", "status"), [("InvalidAction", 400), ("UnsupportedOperation", 400)])
def test_image_references_missing_api_is_a_note_and_the_other_sources_count(
    stubbed: Stubbed, code: str, status: int
) -> None:
    s = stubbed
    live = {"InstanceId": "i-0live", "ImageId": ami(1), "State": {"Code": 80, "Name": "stopped"}}
    s.queue(
        images=lambda: s.add("ec2", "describe_images", {"Images": [raw_image(ami(1), "app-1", APP)]}, IMAGES),
        instances=lambda: s.add(
            "ec2", "describe_instances", {"Reservations": [{"Instances": [live]}]}, INSTANCES
        ),
    )
    s.fail(
        "ec2",
        "describe_image_references",
        code,
        {"ImageIds": [ami(1)], "IncludeAllResourceTypes": True},
        status,
    )
    s.permissions(ami(1))

    inventory = load_details(s.clients, policy(), load_inventory(s.clients, policy()), [ami(1)])

    s.verify()
    assert inventory.error is None
    assert inventory.notes == (IMAGE_REFERENCES_NOTE,)
    assert refs(inventory) == {(ami(1), "instance", "i-0live", "used by instance i-0live (stopped)")}


def test_image_references_other_failure_skips_the_region(stubbed: Stubbed) -> None:
    s = stubbed
    s.queue(
        images=lambda: s.add("ec2", "describe_images", {"Images": [raw_image(ami(1), "app-1", APP)]}, IMAGES)
    )
    s.fail(
        "ec2",
        "describe_image_references",
        "UnauthorizedOperation",
        {"ImageIds": [ami(1)], "IncludeAllResourceTypes": True},
    )

    inventory = load_details(s.clients, policy(), load_inventory(s.clients, policy()), [ami(1)])

    assert inventory == RegionInventory(
        region=REGION, error="ec2:DescribeImageReferences: UnauthorizedOperation: UnauthorizedOperation here"
    )


HTML_500_PAGE = (
    b"<!doctype html>\n<html lang=en>\n<title>500 Internal Server Error</title>\n"
    b"<h1>Internal Server Error</h1>\n<p>The server encountered an internal error.</p>\n"
)


def html_500_page(model: Any) -> Exception:
    """What botocore makes of an HTML 500 page (a load balancer's, an emulator's) for this operation."""
    parser = botocore.parsers.create_parser(model.service_model.protocol)
    response = {"status_code": 500, "headers": {"content-type": "text/html"}, "body": HTML_500_PAGE}
    try:
        parsed = parser.parse(response, model.output_shape)
    except botocore.parsers.ResponseParserError as error:
        return error  # the query protocol (EC2): the page is not XML
    return ClientError(parsed, model.name)  # REST-JSON (Recycle Bin): code "500", the page as message


def parse_error(model: Any) -> Exception:
    return botocore.parsers.ResponseParserError(f"Unable to parse response for {model.name}: invalid XML")


def not_implemented(model: Any) -> Exception:
    return NotImplementedError(f"The {model.name} action has not been implemented")


REFERENCES_CALL = (
    "ec2",
    "describe_image_references",
    {"ImageIds": [ami(1)], "IncludeAllResourceTypes": True},
)
RULES_CALL = ("rbin", "list_rules", {"ResourceType": "EC2_IMAGE", "MaxResults": 1000})
# An optional source: the Stubber step that makes its call fail, and where its failure shows.
OPTIONAL_SOURCES = {
    "ec2:DescribeImageReferences": ("image_references", REFERENCES_CALL),
    "rbin:ListRules": ("rbin", RULES_CALL),
    "ec2:GetImageBlockPublicAccessState": ("block_public_access", BLOCK_PUBLIC_ACCESS_CALL),
}


@pytest.mark.parametrize("source", sorted(OPTIONAL_SOURCES))
@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(
            lambda s, call: s.fail_after_answer(*call[:2], html_500_page, call[2]), id="html-500-page"
        ),
        pytest.param(lambda s, call: s.fail_after_answer(*call[:2], parse_error, call[2]), id="parse-error"),
        pytest.param(
            lambda s, call: s.fail_after_answer(*call[:2], not_implemented, call[2]), id="not-implemented"
        ),
        pytest.param(lambda s, call: s.fail(*call[:2], "503", call[2], 503), id="numeric-code-503"),
        pytest.param(lambda s, call: s.fail(*call[:2], "InternalError", call[2], 500), id="internal-error"),
    ],
)
def test_an_optional_source_that_fails_without_saying_it_is_unsupported_skips_the_region(
    stubbed: Stubbed, source: str, failure: Callable[[Stubbed, tuple[str, str, dict[str, Any]]], None]
) -> None:
    s = stubbed
    step, call = OPTIONAL_SOURCES[source]
    steps: dict[str, Callable[[], Any]] = {
        "images": lambda: s.add(
            "ec2", "describe_images", {"Images": [raw_image(ami(1), "app-1", APP)]}, IMAGES
        )
    }
    if step == "image_references":  # read after the plan, for the AMIs it chose
        s.queue(**steps)
        failure(s, call)
        inventory = load_details(s.clients, policy(), load_inventory(s.clients, policy()), [ami(1)])
    else:
        steps[step] = lambda: failure(s, call)
        s.queue(**steps)
        inventory = load_inventory(s.clients, policy())
        if inventory.error is None:
            s.add("ec2", "describe_image_references", {"ImageReferences": []}, REFERENCES_CALL[2])
            inventory = load_details(s.clients, policy(), inventory, [ami(1)])

    assert inventory.error is not None and inventory.error.startswith(f"{source}: "), inventory.error
    assert inventory.images == () and inventory.notes == ()


@pytest.mark.parametrize(
    ("code", "status"),
    [("InvalidAction", 400), ("UnsupportedOperation", 400), ("UnknownOperationException", 404)],
)
def test_recycle_bin_answering_it_is_not_offered_is_a_note(stubbed: Stubbed, code: str, status: int) -> None:
    s = stubbed
    s.queue(rbin=lambda: s.fail(*RULES_CALL[:2], code, RULES_CALL[2], status))

    inventory = load_inventory(s.clients, policy())

    s.verify()
    assert inventory.error is None
    assert inventory.notes == (RECYCLE_BIN_NOTE,)


@pytest.mark.parametrize(
    "missing",
    [
        botocore.exceptions.EndpointConnectionError(endpoint_url="https://rbin.us-iso-east-1.c2s.ic.gov/"),
        botocore.exceptions.UnknownEndpointError(service_name="rbin", region_name="us-iso-east-1"),
    ],
    ids=["endpoint-connection-error", "unknown-endpoint"],
)
def test_recycle_bin_without_an_endpoint_in_the_partition_is_a_note(
    stubbed: Stubbed, missing: Exception
) -> None:
    s = stubbed
    s.queue(rbin=lambda: s.fail_after_answer(*RULES_CALL[:2], lambda _: missing, RULES_CALL[2]))

    inventory = load_inventory(s.clients, policy())

    assert inventory.error is None
    assert inventory.notes == (RECYCLE_BIN_NOTE,)


@pytest.mark.parametrize(
    ("state", "notes"),
    [("unblocked", (BLOCK_PUBLIC_ACCESS_NOTE,)), ("block-new-sharing", ())],
)
def test_image_block_public_access_off_is_a_note(
    stubbed: Stubbed, state: str, notes: tuple[str, ...]
) -> None:
    s = stubbed
    answer = {"ImageBlockPublicAccessState": state, "ManagedBy": "account"}
    s.queue(
        block_public_access=lambda: s.add(*BLOCK_PUBLIC_ACCESS_CALL[:2], answer, BLOCK_PUBLIC_ACCESS_CALL[2])
    )

    inventory = load_inventory(s.clients, policy())

    s.verify()
    assert inventory.error is None
    assert inventory.notes == notes


@pytest.mark.parametrize("code", ["InvalidAction", "UnsupportedOperation"])
def test_image_block_public_access_not_offered_says_nothing(stubbed: Stubbed, code: str) -> None:
    s = stubbed
    s.queue(
        block_public_access=lambda: s.fail(*BLOCK_PUBLIC_ACCESS_CALL[:2], code, BLOCK_PUBLIC_ACCESS_CALL[2])
    )

    inventory = load_inventory(s.clients, policy())

    s.verify()
    assert inventory.error is None
    assert inventory.notes == ()


def test_image_block_public_access_refused_skips_the_region(stubbed: Stubbed) -> None:
    s = stubbed
    s.queue(
        block_public_access=lambda: s.fail(
            *BLOCK_PUBLIC_ACCESS_CALL[:2], "UnauthorizedOperation", BLOCK_PUBLIC_ACCESS_CALL[2], 403
        )
    )

    inventory = load_inventory(s.clients, policy())

    assert inventory.error is not None
    assert inventory.error.startswith("ec2:GetImageBlockPublicAccessState: UnauthorizedOperation: ")


@pytest.mark.usefixtures("moto_aws")
def test_image_block_public_access_on_the_emulator() -> None:
    # On as for a new account; turned off in one region, only that region's inventory says so, once it
    # holds an AMI (before, there is nothing to make public there).
    boto3.client("ec2", region_name=REGION).disable_image_block_public_access()
    assert BLOCK_PUBLIC_ACCESS_NOTE not in load_inventory(moto_clients(), policy()).notes
    make_ami("other-1")
    assert BLOCK_PUBLIC_ACCESS_NOTE in load_inventory(moto_clients(), policy()).notes
    boto3.client("ec2", region_name=REGION).enable_image_block_public_access(
        ImageBlockPublicAccessState="block-new-sharing"
    )
    assert BLOCK_PUBLIC_ACCESS_NOTE not in load_inventory(moto_clients(), policy()).notes
    boto3.client("ec2", region_name=REGION).disable_image_block_public_access()

    assert BLOCK_PUBLIC_ACCESS_NOTE in load_inventory(moto_clients(), policy()).notes
    other = boto3.client("ec2", region_name="eu-west-1").get_image_block_public_access_state()
    assert other["ImageBlockPublicAccessState"] == "block-new-sharing"


def test_image_references_without_an_endpoint_skip_the_region(stubbed: Stubbed) -> None:
    # EC2 always has an endpoint: only Recycle Bin may lack one.
    s = stubbed
    missing = botocore.exceptions.EndpointConnectionError(endpoint_url="https://ec2.us-east-1.amazonaws.com/")
    s.queue(
        images=lambda: s.add("ec2", "describe_images", {"Images": [raw_image(ami(1), "app-1", APP)]}, IMAGES)
    )
    s.fail_after_answer(*REFERENCES_CALL[:2], lambda _: missing, REFERENCES_CALL[2])

    inventory = load_details(s.clients, policy(), load_inventory(s.clients, policy()), [ami(1)])

    assert inventory.error is not None and inventory.error.startswith("ec2:DescribeImageReferences: ")


def test_recycle_bin_rules_for_images_and_snapshots_are_described(stubbed: Stubbed) -> None:
    s = stubbed

    def rules() -> None:
        image_rule = {
            "Identifier": "abc",
            "RetentionPeriod": {"RetentionPeriodValue": 7, "RetentionPeriodUnit": "DAYS"},
        }
        snapshot_rule = {
            "Identifier": "def",
            "RetentionPeriod": {"RetentionPeriodValue": 14, "RetentionPeriodUnit": "DAYS"},
            "LockState": "locked",
        }
        s.add(
            "rbin", "list_rules", {"Rules": [image_rule]}, {"ResourceType": "EC2_IMAGE", "MaxResults": 1000}
        )
        s.add(
            "rbin",
            "list_rules",
            {"Rules": [snapshot_rule]},
            {"ResourceType": "EBS_SNAPSHOT", "MaxResults": 1000},
        )

    s.queue(rbin=rules)

    inventory = load_inventory(s.clients, policy())

    s.verify()
    assert inventory.recycle_bin_rules == (
        "Recycle Bin rule abc retains EC2_IMAGE for 7 days",
        "Recycle Bin rule def retains EBS_SNAPSHOT for 14 days (locked)",
    )


def test_spot_instance_requests_that_may_still_launch_are_references(stubbed: Stubbed) -> None:
    """Open (waiting, or a persistent request reopened after an interruption), active and disabled
    requests may launch from their image; closed, cancelled and failed ones never will."""
    s = stubbed
    requests = [
        {"SpotInstanceRequestId": f"sir-{state}", "State": state, "LaunchSpecification": {"ImageId": ami(n)}}
        for n, state in enumerate(["open", "active", "disabled", "closed", "cancelled", "failed"], start=1)
    ]
    requests.append({"SpotInstanceRequestId": "sir-none", "State": "open", "LaunchSpecification": {}})
    s.queue(
        spot_requests=lambda: s.add(
            "ec2",
            "describe_spot_instance_requests",
            {"SpotInstanceRequests": requests},
            {"MaxResults": 1000},
        )
    )

    inventory = load_inventory(s.clients, policy())

    s.verify()
    assert inventory.error is None
    assert refs(inventory, "spot-request") == {
        (ami(n), "spot-request", f"sir-{state}", f"referenced by Spot Instance request sir-{state}")
        for n, state in [(1, "open"), (2, "active"), (3, "disabled")]
    }


def test_a_persistent_spot_request_reopened_after_an_interruption_keeps_its_ami(moto_aws: None) -> None:
    """Its instance terminated, a reopened persistent request names its image nowhere else (no instance,
    no template): the plan keeps the AMI it will launch from when capacity returns."""
    ec2 = boto3.client("ec2", region_name=REGION)
    old = datetime(2025, 1, 1, tzinfo=UTC)
    spot_ami = make_ami("app-1", tags=APP)  # the oldest of three: not among keep_latest 2
    for name in ("app-2", "app-3"):
        emulator.set_image_fields(REGION, make_ami(name, tags=APP), creation_date=old.replace(month=3))
    emulator.set_image_fields(REGION, spot_ami, creation_date=old)
    request_id = ec2.request_spot_instances(
        SpotPrice="0.50",
        InstanceCount=1,
        Type="persistent",
        InstanceInterruptionBehavior="terminate",
        LaunchSpecification={"ImageId": spot_ami, "InstanceType": "c5.large"},
    )["SpotInstanceRequests"][0]["SpotInstanceRequestId"]
    request = ec2_backends[DEFAULT_ACCOUNT_ID][REGION].spot_instance_requests[request_id]
    ec2.terminate_instances(InstanceIds=[request.instance.id])
    request.state = "open"  # what EC2 does to a persistent request whose instance was interrupted

    inventory = load_inventory(moto_clients(), policy())

    assert inventory.error is None
    assert refs(inventory, "spot-request") == {
        (spot_ami, "spot-request", request_id, f"referenced by Spot Instance request {request_id}")
    }
    decisions = plan([inventory], policy(), datetime(2026, 6, 1, tzinfo=UTC)).decisions
    kept = next(d for d in decisions if d.image_id == spot_ami)
    assert kept.action == "keep", kept.reasons


def test_spot_fleets_and_ec2_fleets_that_may_still_launch_are_references(stubbed: Stubbed) -> None:
    s = stubbed
    spot = [
        {
            "SpotFleetRequestId": "sfr-1",
            "SpotFleetRequestState": "active",
            "SpotFleetRequestConfig": {
                "IamFleetRole": f"arn:aws:iam::{ACCOUNT}:role/fleet",
                "TargetCapacity": 1,
                "LaunchSpecifications": [{"ImageId": ami(3)}],
                "LaunchTemplateConfigs": [
                    {"LaunchTemplateSpecification": {"LaunchTemplateId": LT, "Version": "2"}}
                ],
            },
        },
        {
            "SpotFleetRequestId": "sfr-2",
            "SpotFleetRequestState": "cancelled",
            "SpotFleetRequestConfig": {
                "IamFleetRole": f"arn:aws:iam::{ACCOUNT}:role/fleet",
                "TargetCapacity": 1,
                "LaunchSpecifications": [{"ImageId": ami(9)}],
            },
        },
    ]
    fleets = [
        {
            "FleetId": "fleet-1",
            "FleetState": "active",
            "LaunchTemplateConfigs": [
                {
                    "LaunchTemplateSpecification": {"LaunchTemplateName": "web", "Version": "$Latest"},
                    "Overrides": [{"ImageId": ami(4)}],
                }
            ],
        },
        {
            "FleetId": "fleet-2",
            "FleetState": "deleted",
            "LaunchTemplateConfigs": [{"Overrides": [{"ImageId": ami(9)}]}],
        },
    ]
    s.queue(
        templates=web_template_all(s, [raw_version(1, ami(1), default=True), raw_version(2, ami(2))]),
        spot=lambda: s.add(
            "ec2", "describe_spot_fleet_requests", {"SpotFleetRequestConfigs": spot}, {"MaxResults": 1000}
        ),
        fleets=lambda: s.add("ec2", "describe_fleets", {"Fleets": fleets}, {"MaxResults": 1000}),
    )

    inventory = load_inventory(s.clients, policy())

    s.verify()
    assert refs(inventory, "spot-fleet") | refs(inventory, "ec2-fleet") == {
        (ami(3), "spot-fleet", "sfr-1", "referenced by Spot Fleet request sfr-1"),
        (
            ami(2),
            "spot-fleet",
            "sfr-1",
            f"referenced by Spot Fleet request sfr-1 (launch template {LT} version 2)",
        ),
        (ami(2), "ec2-fleet", "fleet-1", f"referenced by EC2 Fleet fleet-1 (launch template {LT} version 2)"),
        (ami(4), "ec2-fleet", "fleet-1", "referenced by EC2 Fleet fleet-1 (override)"),
    }


def batch_environment(s: Stubbed, **resources: Any) -> Callable[[], None]:
    """The step answering DescribeComputeEnvironments with one environment 'jobs' of these resources."""
    environment = {
        "computeEnvironmentName": "jobs",
        "computeEnvironmentArn": f"arn:aws:batch:{REGION}:{ACCOUNT}:compute-environment/jobs",
        "computeResources": {"type": "EC2", "maxvCpus": 4, "subnets": ["subnet-1"], **resources},
    }
    return lambda: s.add(
        "batch", "describe_compute_environments", {"computeEnvironments": [environment]}, {"maxResults": 100}
    )


def test_batch_compute_environments_are_references(stubbed: Stubbed) -> None:
    s = stubbed
    s.queue(
        templates=web_template_all(s, [raw_version(1, ami(1), default=True), raw_version(2, ami(2))]),
        batch=batch_environment(
            s,
            imageId=ami(5),
            ec2Configuration=[{"imageType": "ECS_AL2", "imageIdOverride": ami(6)}],
            launchTemplate={"launchTemplateName": "web", "version": "$Default"},
        ),
    )

    inventory = load_inventory(s.clients, policy())

    s.verify()
    by = "referenced by Batch compute environment jobs"
    assert refs(inventory, "batch-compute-environment") == {
        (ami(5), "batch-compute-environment", "jobs", f"{by} (imageId)"),
        (ami(6), "batch-compute-environment", "jobs", f"{by} (ECS_AL2 imageIdOverride)"),
        (ami(1), "batch-compute-environment", "jobs", f"{by} (launch template {LT} version 1)"),
    }


def every_version_of_web(s: Stubbed, versions: list[dict[str, Any]]) -> Callable[[], None]:
    """The step reading every version of the template 'web', by its name (Batch's symbolic versions)."""
    return lambda: s.add(
        "ec2",
        "describe_launch_template_versions",
        {"LaunchTemplateVersions": versions},
        {"LaunchTemplateName": "web", "MaxResults": 200},
    )


def test_a_batch_environment_naming_default_keeps_every_version_of_its_template(stubbed: Stubbed) -> None:
    """Batch resolves `$Default` (and `$Latest`) when the environment is made or its infrastructure
    updated, and launches from that version's image since: any version of the template may be the one.
    Where the policy counts only the default and latest versions, every version is read for it."""
    s = stubbed
    every = [raw_version(1, ami(1)), raw_version(2, ami(2), default=True), raw_version(3, ami(3))]
    s.queue(
        templates=lambda: s.add(
            "ec2",
            "describe_launch_template_versions",
            {"LaunchTemplateVersions": [every[2], every[1]]},
            {"Versions": ["$Latest", "$Default"], "MaxResults": 200},
        ),
        batch=batch_environment(s, launchTemplate={"launchTemplateName": "web", "version": "$Default"}),
        batch_versions=every_version_of_web(s, every),
    )

    inventory = load_inventory(
        s.clients, policy(references={"launch_template_versions": "default-and-latest"})
    )

    s.verify()
    assert inventory.error is None
    batch = {r.image_id for r in inventory.references if r.kind == "batch-compute-environment"}
    assert batch == {ami(1), ami(2), ami(3)}
    assert {r.image_id for r in inventory.references if r.kind == "launch-template"} == {ami(2), ami(3)}


def test_a_template_batch_names_twice_is_read_once(stubbed: Stubbed) -> None:
    """An environment's template and its override naming the same template (`$Default`, `$Latest`): its
    versions are read once (the Stubber refuses a call not queued), each use claims every image."""
    s = stubbed
    every = [raw_version(1, ami(1)), raw_version(2, ami(2), default=True)]
    template = {
        "launchTemplateName": "web",
        "version": "$Default",
        "overrides": [
            {"launchTemplateName": "web", "version": "$Latest", "targetInstanceTypes": ["c5.large"]}
        ],
    }
    s.queue(
        templates=lambda: s.add(
            "ec2",
            "describe_launch_template_versions",
            {"LaunchTemplateVersions": [every[1]]},
            {"Versions": ["$Latest", "$Default"], "MaxResults": 200},
        ),
        batch=batch_environment(s, launchTemplate=template),
        batch_versions=every_version_of_web(s, every),
    )

    inventory = load_inventory(
        s.clients, policy(references={"launch_template_versions": "default-and-latest"})
    )

    s.verify()
    assert inventory.error is None
    claimed = [r for r in inventory.references if r.kind == "batch-compute-environment"]
    assert {r.image_id for r in claimed} == {ami(1), ami(2)}
    assert {("$Default" in r.detail, "$Latest" in r.detail) for r in claimed if r.image_id == ami(1)} == {
        (True, False),
        (False, True),
    }


def emr_clusters(s: Stubbed) -> Callable[[], None]:
    """Two live clusters: instance groups with their own AMI, and an instance fleet."""

    def step() -> None:
        status = {"State": "WAITING"}
        s.add("emr", "list_clusters", {"Clusters": [{"Id": "j-1"}, {"Id": "j-2"}]}, EMR_STATES)
        groups_cluster = {
            "Id": "j-1",
            "Name": "groups",
            "Status": status,
            "CustomAmiId": ami(7),
            "InstanceCollectionType": "INSTANCE_GROUP",
        }
        s.add("emr", "describe_cluster", {"Cluster": groups_cluster}, {"ClusterId": "j-1"})
        groups = [{"Id": "ig-1", "CustomAmiId": ami(8)}, {"Id": "ig-2", "CustomAmiId": ami(7)}]
        s.add("emr", "list_instance_groups", {"InstanceGroups": groups}, {"ClusterId": "j-1"})
        fleet_cluster = {
            "Id": "j-2",
            "Name": "fleet",
            "Status": status,
            "InstanceCollectionType": "INSTANCE_FLEET",
        }
        s.add("emr", "describe_cluster", {"Cluster": fleet_cluster}, {"ClusterId": "j-2"})
        fleets = [
            {
                "Id": "if-1",
                "InstanceTypeSpecifications": [{"InstanceType": "m5.xlarge", "CustomAmiId": ami(9)}],
            }
        ]
        s.add("emr", "list_instance_fleets", {"InstanceFleets": fleets}, {"ClusterId": "j-2"})

    return step


def test_emr_clusters_custom_ami_ids_are_references(stubbed: Stubbed) -> None:
    s = stubbed
    s.queue(emr=emr_clusters(s))

    inventory = load_inventory(s.clients, policy())

    s.verify()
    assert refs(inventory, "emr-cluster") == {
        (ami(7), "emr-cluster", "j-1", "referenced by EMR cluster j-1 (CustomAmiId)"),
        (ami(8), "emr-cluster", "j-1", "referenced by EMR cluster j-1 (instance group ig-1 CustomAmiId)"),
        (ami(9), "emr-cluster", "j-2", "referenced by EMR cluster j-2 (instance fleet if-1 CustomAmiId)"),
    }


def test_a_pinned_version_outside_default_and_latest_is_fetched_exactly(stubbed: Stubbed) -> None:
    s = stubbed
    listing = [raw_version(3, ami(3)), raw_version(1, ami(1), default=True)]
    groups = [
        raw_group(
            "web-asg",
            LaunchTemplate={"LaunchTemplateId": LT, "Version": "2"},
            MixedInstancesPolicy={
                "LaunchTemplate": {
                    "LaunchTemplateSpecification": {"LaunchTemplateId": LT, "Version": "$Latest"},
                    "Overrides": [{"InstanceType": "m6g.large", "ImageId": ami(4)}],
                }
            },
        )
    ]
    s.queue(
        templates=lambda: s.add(
            "ec2",
            "describe_launch_template_versions",
            {"LaunchTemplateVersions": listing},
            {"Versions": ["$Latest", "$Default"], "MaxResults": 200},
        ),
        groups=lambda: s.add(
            "autoscaling", "describe_auto_scaling_groups", {"AutoScalingGroups": groups}, {"MaxRecords": 100}
        ),
        missing_versions=lambda: s.add(
            "ec2",
            "describe_launch_template_versions",
            {"LaunchTemplateVersions": [raw_version(2, ami(2))]},
            {"LaunchTemplateId": LT, "Versions": ["2"]},
        ),
    )

    inventory = load_inventory(
        s.clients, policy(references={"launch_template_versions": "default-and-latest"})
    )

    s.verify()
    by = "referenced by Auto Scaling group web-asg"
    assert refs(inventory, "auto-scaling-group") == {
        (ami(2), "auto-scaling-group", "web-asg", f"{by} (launch template {LT} version 2)"),
        (ami(3), "auto-scaling-group", "web-asg", f"{by} (launch template {LT} version 3)"),
        (ami(4), "auto-scaling-group", "web-asg", f"{by} (mixed instances override)"),
    }
    assert {r.image_id for r in inventory.references if r.kind == "launch-template"} == {ami(1), ami(3)}


def test_a_pinned_version_that_is_gone_is_a_note(stubbed: Stubbed) -> None:
    s = stubbed
    groups = [raw_group("web-asg", LaunchTemplate={"LaunchTemplateId": LT, "Version": "7"})]
    s.queue(
        templates=web_template_all(s, [raw_version(1, ami(1), default=True)]),
        groups=lambda: s.add(
            "autoscaling", "describe_auto_scaling_groups", {"AutoScalingGroups": groups}, {"MaxRecords": 100}
        ),
        missing_versions=lambda: s.fail(
            "ec2",
            "describe_launch_template_versions",
            "InvalidLaunchTemplateId.VersionNotFound",
            {"LaunchTemplateId": LT, "Versions": ["7"]},
        ),
    )

    inventory = load_inventory(s.clients, policy())

    s.verify()
    assert inventory.error is None
    assert (
        f"Auto Scaling group web-asg names launch template {LT} version 7, which does not exist"
        in inventory.notes
    )


def test_newest_versions_reach_back_past_deleted_versions(stubbed: Stubbed) -> None:
    s = stubbed

    def templates() -> None:
        s.add(
            "ec2", "describe_launch_templates", {"LaunchTemplates": [raw_template(1, 5)]}, {"MaxResults": 200}
        )
        # Version 4 was deleted; 3 comes along where EC2 reads MinVersion as inclusive: it is no newest.
        s.add(
            "ec2",
            "describe_launch_template_versions",
            {"LaunchTemplateVersions": [raw_version(3, ami(3)), raw_version(5, ami(5))]},
            {"LaunchTemplateId": LT, "MinVersion": "3", "MaxResults": 200},
        )
        older = [raw_version(n, ami(n), default=n == 1) for n in (1, 2, 3)]
        s.add(
            "ec2",
            "describe_launch_template_versions",
            {"LaunchTemplateVersions": older},
            {"LaunchTemplateId": LT, "MaxVersion": "4", "MaxResults": 200},
        )

    s.queue(templates=templates)

    inventory = load_inventory(s.clients, policy(references={"launch_template_versions": 2}))

    s.verify()  # the default came with the older versions: no further call
    assert {r.image_id for r in inventory.references} == {ami(5), ami(3), ami(1)}


def test_newest_versions_are_asked_one_wider_at_each_end(stubbed: Stubbed) -> None:
    """EC2's reference calls MinVersion "the version number after which" to describe versions: asked one
    lower, the oldest of the newest is read whichever way EC2 reads it (here as exclusive: 3 asked, 4
    and 5 answered), and the latest the listing said is no upper bound (a version made since counts)."""
    s = stubbed

    def templates() -> None:
        s.add(
            "ec2", "describe_launch_templates", {"LaunchTemplates": [raw_template(4, 5)]}, {"MaxResults": 200}
        )
        s.add(
            "ec2",
            "describe_launch_template_versions",
            {"LaunchTemplateVersions": [raw_version(4, ami(4), default=True), raw_version(5, ami(5))]},
            {"LaunchTemplateId": LT, "MinVersion": "3", "MaxResults": 200},
        )

    s.queue(templates=templates)

    inventory = load_inventory(s.clients, policy(references={"launch_template_versions": 2}))

    s.verify()
    assert {r.image_id for r in inventory.references} == {ami(4), ami(5)}


# The steps of Stubbed.queue that read a reference source (none where no AMI is in a family).
REFERENCE_SOURCE_STEPS = (
    "instances",
    "parameters",
    "templates",
    "configurations",
    "groups",
    "spot",
    "spot_requests",
    "fleets",
    "batch",
    "emr",
)


def test_a_region_without_a_family_ami_reads_no_reference_source_and_no_pointer(stubbed: Stubbed) -> None:
    """No AMI matches a family: the plan decides nothing here, so no reference source is read and no
    Latest pointer either (not even a name without {arch}); what the plan reports beside its decisions
    is read as in any region."""
    s = stubbed
    no_reference = dict.fromkeys(REFERENCE_SOURCE_STEPS)
    s.queue(
        images=lambda: s.add("ec2", "describe_images", {"Images": [raw_image(ami(1), "other-1")]}, IMAGES),
        **no_reference,
    )
    calls = count_calls(*s.raw.values())

    inventory = load_inventory(s.clients, policy({"latest": {"tag": "Latest", "ssm_parameter": "/ami/app"}}))

    s.verify()
    assert inventory.error is None
    assert [i.image_id for i in inventory.images] == [ami(1)]
    assert inventory.references == () and inventory.parameters == {}
    assert sorted(calls) == [
        "dynamodb:Scan",
        "ec2:DescribeImages",
        "ec2:DescribeSnapshots",
        "ec2:GetImageBlockPublicAccessState",
        "rbin:ListRules",
    ]


@pytest.mark.parametrize("ledger_items", [0, 1])
def test_an_empty_region_asks_recycle_bin_only_when_the_ledger_names_an_ami(
    stubbed: Stubbed, ledger_items: int
) -> None:
    """No AMI, no retired snapshot: no snapshot can be deleted here, so Recycle Bin is not asked, unless
    the ledger has an item (its snapshots may still be deleted). Image block public access is never
    asked: with no AMI, there is nothing to make public (the Stubber refuses a call not queued)."""
    s = stubbed
    no_reference = dict.fromkeys(REFERENCE_SOURCE_STEPS)
    item = {"pk": {"S": f"image#{ami(1)}"}, "sk": {"S": "item"}, "image_id": {"S": ami(1)}}
    items = [item][:ledger_items]
    s.queue(
        images=lambda: s.add("ec2", "describe_images", {"Images": []}, IMAGES),
        ledger=lambda: s.add("dynamodb", "scan", {"Items": items}, SCAN),
        rbin=s._no_recycle_bin_rules if ledger_items else None,
        block_public_access=None,
        **no_reference,
    )
    calls = count_calls(*s.raw.values())

    inventory = load_inventory(s.clients, policy())

    s.verify()
    assert inventory.error is None and inventory.ledger is not None
    expected = ["dynamodb:Scan", "ec2:DescribeImages", "ec2:DescribeSnapshots"]
    assert sorted(calls) == sorted(expected + ["rbin:ListRules"] * ledger_items)


@pytest.mark.parametrize(
    ("failing", "family_ami"),
    [
        (["dynamodb:Scan"], False),
        (["ec2:DescribeImages", "dynamodb:Scan"], False),
        (["ssm:DescribeParameters", "autoscaling:DescribeAutoScalingGroups", "dynamodb:Scan"], True),
        (["elasticmapreduce:ListClusters"], True),
    ],
)
def test_sources_read_side_by_side_still_fail_in_the_recipes_order(
    moto_aws: None, failing: list[str], family_ami: bool
) -> None:
    """The sources that depend on no other are read on threads side by side: a failure among them still
    skips the region, and where an earlier source in the recipe fails too, the earlier one names the
    error, as when every source is read one after another."""
    from ami_janitor.aws import ledger

    ledger.create_table(RegionClients("us-east-1"), "ami-janitor-ledger", ["arn:aws:iam::123456789012:root"])
    if family_ami:
        ec2 = boto3.client("ec2", region_name="us-east-1")
        image_id = ec2.register_image(Name="app-1")["ImageId"]
        ec2.create_tags(Resources=[image_id], Tags=[{"Key": "Project", "Value": "App"}])
    session = botocore_session("us-east-1")

    def deny(model: Any, **_: Any) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "denied here"}}, model.name)

    services = {"elasticmapreduce": "emr", "autoscaling": "auto-scaling"}  # the SDK's event names
    for call in failing:
        service, operation = call.split(":")
        session.register(f"before-call.{services.get(service, service)}.{operation}", deny)
    clients = RegionClients("us-east-1", session)
    assert clients.read_workers > 1

    inventory = load_inventory(clients, policy())

    assert inventory.error == f"{failing[0]}: AccessDenied: denied here"
    assert inventory.images == () and inventory.ledger is None


def _recording_clients(session: Session, made: list[tuple[str, str]], failing: str | None = None) -> None:
    """`session` made to record each client it makes (service, thread), and to refuse `failing`'s."""
    create = session.create_client

    def recording(service: str, *args: Any, **kwargs: Any) -> Any:
        made.append((service, threading.current_thread().name))
        if service == failing:
            raise botocore.exceptions.InvalidEndpointConfigurationError(msg=f"no endpoint for {service}")
        return create(service, *args, **kwargs)

    session.create_client = recording  # type: ignore[method-assign]


@pytest.mark.parametrize("family_ami", [False, True])
def test_the_clients_of_the_reads_side_by_side_are_made_before_they_start(
    moto_aws: None, family_ami: bool
) -> None:
    """Made on the reading threads, the clients' making (CPU work under the session's lock) contends
    with the other threads' calls: they are made on the calling thread, one after the other, first
    (the reference sources' too, where an AMI is in a family)."""
    if family_ami:
        ec2 = boto3.client("ec2", region_name="us-east-1")
        image_id = ec2.register_image(Name="app-1")["ImageId"]
        ec2.create_tags(Resources=[image_id], Tags=[{"Key": "Project", "Value": "App"}])
    session = botocore_session("us-east-1")
    made: list[tuple[str, str]] = []
    _recording_clients(session, made)
    clients = RegionClients("us-east-1", session)
    assert clients.read_workers > 1

    inventory = load_inventory(clients, policy())

    assert inventory.error is None and len(inventory.images) == int(family_ami)
    here = threading.current_thread().name
    first = ["ec2", "dynamodb", *(["ssm", "autoscaling", "batch", "emr"] if family_ami else [])]
    assert [service for service, _ in made[: len(first)]] == first
    assert {thread for _, thread in made} == {here}  # Recycle Bin's too, after, where AMIs are


def test_a_client_that_cannot_be_made_still_names_its_source(moto_aws: None) -> None:
    """Made first, a client that cannot be made is left to its reader: the region's error names the
    source that reads with it, as when the reader made it."""
    session = botocore_session("us-east-1")
    made: list[tuple[str, str]] = []
    _recording_clients(session, made, failing="dynamodb")

    inventory = load_inventory(RegionClients("us-east-1", session), policy())

    assert inventory.error == (
        "dynamodb:Scan: InvalidEndpointConfigurationError: Invalid endpoint configuration: no endpoint for dynamodb"
    )
    assert [service for service, _ in made].count("dynamodb") == 2  # first here, then by its reader


def test_a_failing_source_skips_the_region_with_no_images(stubbed: Stubbed) -> None:
    s = stubbed
    s.add("ec2", "describe_images", {"Images": [raw_image(ami(1), "app-1", APP)]}, IMAGES)
    s.add("ec2", "describe_instances", {"Reservations": []}, INSTANCES)
    s.add("ssm", "describe_parameters", {"Parameters": []}, PARAMETERS)
    s.add("ec2", "describe_launch_templates", {"LaunchTemplates": []}, {"MaxResults": 200})
    s.add("autoscaling", "describe_launch_configurations", {"LaunchConfigurations": []}, {"MaxRecords": 100})
    s.fail("autoscaling", "describe_auto_scaling_groups", "AccessDenied", {"MaxRecords": 100}, 403)

    inventory = load_inventory(s.clients, policy())

    s.verify()
    assert inventory.error == "autoscaling:DescribeAutoScalingGroups: AccessDenied: AccessDenied here"
    assert inventory.images == ()
    assert inventory.references == ()


@pytest.mark.parametrize(
    ("missing", "says"),
    # Never guessed: an AMI without a state taken as available would be retired.
    [("CreationDate", "has no valid CreationDate"), ("State", "has no State")],
)
def test_a_malformed_image_skips_the_region_instead_of_crashing(
    stubbed: Stubbed, missing: str, says: str
) -> None:
    s = stubbed
    broken = raw_image(ami(1), "app-1", APP)
    del broken[missing]
    s.add("ec2", "describe_images", {"Images": [broken]}, IMAGES)

    inventory = load_inventory(s.clients, policy())

    assert inventory.error == f"ec2:DescribeImages: MalformedResponse: ValueError: image {ami(1)} {says}"
    assert inventory.images == ()


@pytest.mark.parametrize("field", ["LastLaunchedTime", "DeprecationTime"])
@pytest.mark.parametrize(
    "value",
    # the last two are times only until read in UTC (past year 9999, before year 1)
    ["2026-11-24 10:00:00 UTC", "1764000000", "", "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"],
)
def test_a_time_that_is_no_time_skips_the_region(stubbed: Stubbed, field: str, value: str) -> None:
    """Read as absent, a LastLaunchedTime that is no time would lose rule 4's keep (launched within
    `launched_within_days`): like a malformed CreationDate, it is a malformed answer."""
    s = stubbed
    s.add("ec2", "describe_images", {"Images": [raw_image(ami(1), "app-1", APP, **{field: value})]}, IMAGES)

    inventory = load_inventory(s.clients, policy())

    assert inventory.error == (
        f"ec2:DescribeImages: MalformedResponse: ValueError: image {ami(1)} has {field} {value!r}, which is no time"
    )
    assert inventory.images == ()


@pytest.mark.parametrize("value", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"])
def test_a_creation_date_past_the_years_a_time_can_hold_skips_the_region(
    stubbed: Stubbed, value: str
) -> None:
    """A time until read in UTC: it stopped every region's plan (OverflowError) where it now skips its own."""
    s = stubbed
    s.add("ec2", "describe_images", {"Images": [raw_image(ami(1), "app-1", APP, CreationDate=value)]}, IMAGES)

    inventory = load_inventory(s.clients, policy())

    assert (
        inventory.error
        == f"ec2:DescribeImages: MalformedResponse: ValueError: image {ami(1)} has no valid CreationDate"
    )
    assert inventory.images == ()


def test_an_ami_listed_twice_by_describe_images_skips_the_region(stubbed: Stubbed) -> None:
    """A listing whose pages repeat an AMI is no consistent inventory: counted twice, the newest AMI
    would take two of keep_latest's places and push out one it keeps (and what a page skipped while
    the listing shifted, a plan cannot see). The region is skipped and the error names the AMI."""
    s = stubbed
    newest, older = raw_image(ami(1), "app-1", APP), raw_image(ami(2), "app-2", APP)
    s.add("ec2", "describe_images", {"Images": [newest], "NextToken": "page-2"}, IMAGES)
    s.add("ec2", "describe_images", {"Images": [newest, older]}, {**IMAGES, "NextToken": "page-2"})

    inventory = load_inventory(s.clients, policy())

    s.verify()
    assert inventory.error == f"ec2:DescribeImages: MalformedResponse: ValueError: AMI {ami(1)} listed twice"
    assert inventory.images == ()


def test_describe_image_includes_disabled_and_deprecated_amis(stubbed: Stubbed) -> None:
    s = stubbed
    asked = {"ImageIds": [ami(1)], "Owners": ["self"], "IncludeDeprecated": True, "IncludeDisabled": True}
    s.add("ec2", "describe_images", {"Images": [raw_image(ami(1), "app-1", APP, State="disabled")]}, asked)

    found = describe_image(s.clients, ami(1))

    s.verify()
    assert found is not None and found.state == "disabled"


def test_launch_permissions_of_a_deregistered_ami_are_empty(stubbed: Stubbed) -> None:
    s = stubbed
    gone, shared = image(image_id=ami(1), perms=None), image(image_id=ami(2), perms=None)
    inventory = RegionInventory(region=REGION, images=(gone, shared))
    attribute = {"Attribute": "launchPermission"}
    s.fail("ec2", "describe_image_attribute", "InvalidAMIID.NotFound", {"ImageId": ami(1), **attribute})
    grants = [{"Group": "all"}, {"OrganizationArn": "arn:aws:organizations::111122223333:organization/o-1"}]
    s.add("ec2", "describe_image_attribute", {"LaunchPermissions": grants}, {"ImageId": ami(2), **attribute})

    loaded = load_launch_permissions(s.clients, inventory, [ami(1), ami(2)])

    s.verify()
    assert loaded.images[0].launch_permissions == ()
    assert loaded.images[1].launch_permissions == (
        LaunchPermission(kind="group", value="all"),
        LaunchPermission(kind="org", value="arn:aws:organizations::111122223333:organization/o-1"),
    )


def test_launch_permissions_failure_sets_the_inventory_error(stubbed: Stubbed) -> None:
    s = stubbed
    inventory = RegionInventory(region=REGION, images=(image(image_id=ami(1), perms=None),))
    s.fail(
        "ec2",
        "describe_image_attribute",
        "UnauthorizedOperation",
        {"ImageId": ami(1), "Attribute": "launchPermission"},
    )

    loaded = load_launch_permissions(s.clients, inventory, [ami(1)])

    assert loaded.error == "ec2:DescribeImageAttribute: UnauthorizedOperation: UnauthorizedOperation here"
    assert loaded.images == ()


def test_permissions_are_exactly_the_calls_the_module_makes(stubbed: Stubbed) -> None:
    s = stubbed
    parameter = {"Name": "/app/ami", "Type": "String"}
    family = {"latest": {"tag": "Latest", "ssm_parameter": "/ami/app/{arch}/latest"}}

    def parameters() -> None:
        s.add("ssm", "describe_parameters", {"Parameters": [parameter]}, PARAMETERS)
        values = {"Parameters": [{**parameter, "Value": ami(1)}]}
        s.add("ssm", "get_parameters", values, {"Names": ["/app/ami"], "WithDecryption": False})

    s.queue(
        images=lambda: s.add("ec2", "describe_images", {"Images": [raw_image(ami(1), "app-1", APP)]}, IMAGES),
        parameters=parameters,
        templates=web_template_all(s, [raw_version(1, "resolve:ssm:/golden/ami", default=True)]),
        emr=emr_clusters(s),
        aliases=lambda: s.add(
            "ssm",
            "get_parameters",
            {"Parameters": [{"Name": "/golden/ami", "Type": "String", "Value": ami(1)}]},
            {"Names": ["/golden/ami"], "WithDecryption": False},
        ),
        pointers=lambda: s.add(
            "ssm",
            "get_parameters",
            {"Parameters": [], "InvalidParameters": ["/ami/app/x86_64/latest"]},
            {"Names": ["/ami/app/x86_64/latest"], "WithDecryption": False},
        ),
        ledger=lambda: s.add("dynamodb", "scan", {"Items": []}, SCAN),
    )
    s.add(
        "ec2",
        "describe_image_references",
        {"ImageReferences": []},
        {"ImageIds": [ami(1)], "IncludeAllResourceTypes": True},
    )
    s.permissions(ami(1))
    calls = count_calls(*s.raw.values())

    inventory = load_inventory(s.clients, policy(family))
    load_details(s.clients, policy(family), inventory, [ami(1)])

    s.verify()
    assert inventory.error is None
    assert sorted(calls) == INVENTORY_CALLED
    assert set(INVENTORY_PERMISSIONS) == set(INVENTORY_CALLED) | set(IMAGE_REFERENCES_DEPENDENCIES)
    assert (
        Reference(
            image_id=ami(1),
            kind="launch-template",
            resource_id=LT,
            detail=f"launch template {LT} (web) version 1 resolves resolve:ssm:/golden/ami to it",
        )
        in inventory.references
    )


# ---- a slice's reads and its queue message ---------------------------------------------------------


def test_a_slice_reads_its_amis_their_snapshots_users_ledger_items_and_references_exactly(
    stubbed: Stubbed,
) -> None:
    """By id, then every AMI using their snapshots, their ledger items, DescribeImageReferences, and
    only then whether the instances it names still run (a terminated one no longer counts)."""
    from ami_janitor.aws import slicer
    from ami_janitor.core.slices import SliceItem, WorkSlice, policy_digest

    s = stubbed
    family = {"name": "app", "match": {"name": "app-*"}}
    work = WorkSlice(
        run="2026-11-25T03:00:00Z",
        region=REGION,
        index=0,
        count=1,
        planned_at=CREATED,
        policy=policy_digest(policy(family)),
        items=(
            SliceItem(image_id=ami(1), family="app", stages=("deregister",)),
            SliceItem(image_id=ami(2), family="app", stages=("deregister",)),
        ),
    )
    by_id = [{"Name": "image-id", "Values": [ami(1), ami(2)]}]
    s.add(
        "ec2",
        "describe_images",
        {"Images": [raw_image(ami(1), "app-1"), raw_image(ami(2), "app-2")]},
        {**IMAGES, "Filters": by_id},
    )
    by_snapshot = [
        {"Name": "block-device-mapping.snapshot-id", "Values": [f"snap-{ami(1)[4:]}", f"snap-{ami(2)[4:]}"]}
    ]
    sharer = raw_image(
        ami(3),
        "other",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": f"snap-{ami(2)[4:]}"}}],
    )
    s.add("ec2", "describe_images", {"Images": [sharer]}, {**IMAGES, "Filters": by_snapshot})
    keys = [{"pk": {"S": f"image#{i}"}, "sk": {"S": "item"}} for i in (ami(1), ami(2))]
    s.add(
        "dynamodb",
        "batch_get_item",
        {"Responses": {TABLE: []}},
        {"RequestItems": {TABLE: {"Keys": keys, "ConsistentRead": True}}},
    )
    instance = "arn:aws:ec2:us-east-1:123456789012:instance/"
    s.add(
        "ec2",
        "describe_image_references",
        {
            "ImageReferences": [
                {"ImageId": ami(1), "ResourceType": "ec2:Instance", "Arn": f"{instance}i-0aaaaaaaaaaaaaaa1"},
                {"ImageId": ami(2), "ResourceType": "ec2:Instance", "Arn": f"{instance}i-0aaaaaaaaaaaaaaa2"},
            ]
        },
        {"ImageIds": [ami(1), ami(2)], "IncludeAllResourceTypes": True},
    )
    # What DescribeImageReferences may not find, read again (empty here; parameters changed since the plan).
    s.queue(
        images=None,
        instances=None,
        snapshots=None,
        rbin=None,
        block_public_access=None,
        ledger=None,
    )
    s.add(
        "ec2",
        "describe_instances",
        {"Reservations": [{"Instances": [{"InstanceId": "i-0aaaaaaaaaaaaaaa1"}]}]},
        {
            "Filters": [
                {"Name": "instance-id", "Values": ["i-0aaaaaaaaaaaaaaa1", "i-0aaaaaaaaaaaaaaa2"]},
                {"Name": "instance-state-name", "Values": LIVE_STATES},
            ],
            "MaxResults": 1000,
        },
    )

    inventory = slicer.read_slice(s.clients, policy(family), work)

    s.verify()
    assert [i.image_id for i in inventory.images] == [ami(1), ami(2), ami(3)]
    assert [(r.image_id, r.resource_id) for r in inventory.references] == [(ami(1), "i-0aaaaaaaaaaaaaaa1")]


def test_slices_are_queued_in_batches_of_ten_one_group_per_region_deduplicated_by_slice(
    fake_aws_env: None,
) -> None:
    from ami_janitor.aws import slicer
    from ami_janitor.core.slices import SliceItem, WorkSlice

    sqs = session().create_client("sqs")
    stub = Stubber(sqs)
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/work.fifo"
    work = [
        WorkSlice(
            run="2026-11-25T03:00:00Z",
            region=REGION,
            index=n,
            count=11,
            planned_at=CREATED,
            policy="digest",
            items=(SliceItem(image_id=ami(n + 1), family="app", stages=("deregister",)),),
        )
        for n in range(11)
    ]
    for batch in (work[:10], work[10:]):
        entries = [
            {
                "Id": str(w.index),
                "MessageBody": w.model_dump_json(),
                "MessageGroupId": REGION,
                "MessageDeduplicationId": slicer.deduplication_id(w),
            }
            for w in batch
        ]
        stub.add_response(
            "send_message_batch",
            {"Successful": [], "Failed": []},
            {"QueueUrl": url, "Entries": entries},
        )
    stub.add_response(
        "send_message_batch",
        {
            "Successful": [],
            "Failed": [{"Id": "0", "SenderFault": False, "Code": "InternalError", "Message": "x"}],
        },
        {
            "QueueUrl": url,
            "Entries": [
                {
                    "Id": "0",
                    "MessageBody": work[0].model_dump_json(),
                    "MessageGroupId": REGION,
                    "MessageDeduplicationId": slicer.deduplication_id(work[0]),
                }
            ],
        },
    )
    with stub:
        assert slicer.enqueue_slices(sqs, url, work) == 11
        with pytest.raises(RuntimeError, match="SQS refused 1 slice"):
            slicer.enqueue_slices(sqs, url, work[:1])
    stub.assert_no_pending_responses()
    assert len({slicer.deduplication_id(w) for w in work}) == 11


def test_slices_are_sent_in_batches_of_at_most_1_mib_of_bodies(moto_aws: None) -> None:
    from ami_janitor.aws import slicer
    from ami_janitor.core.slices import SliceItem, WorkSlice

    sqs = boto3.client("sqs", region_name=REGION)
    url = sqs.create_queue(
        QueueName="work.fifo", Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "false"}
    )["QueueUrl"]
    stages = ("deprecate", "disable", "deregister")
    items = tuple(SliceItem(image_id=ami(n), family="app", stages=stages) for n in range(1, 1001))
    work = [
        WorkSlice(
            run="2026-11-25T03:00:00Z",
            region=REGION,
            index=n,
            count=10,
            planned_at=CREATED,
            policy="digest",
            items=items,
        )
        for n in range(10)
    ]
    sent: list[int] = []

    def measure(params: dict[str, Any], **_: Any) -> None:
        sent.append(sum(len(e["MessageBody"].encode()) for e in params["Entries"]))

    sqs.meta.events.register("provide-client-params.sqs.SendMessageBatch", measure)

    assert slicer.enqueue_slices(sqs, url, work) == 10

    assert len(sent) > 1 and max(sent) <= 1_048_576 and sum(sent) > 1_048_576
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "10"


def test_the_ledger_items_of_a_few_amis_are_one_batch_get_whose_answer_says_the_table_is_missing(
    stubbed: Stubbed,
) -> None:
    """A reader of single AMIs (an event, a slice) asks BatchGetItem alone: its ResourceNotFound is "no
    table yet" (None); any other failure is raised as it is."""
    s = stubbed
    keys = [{"pk": {"S": f"image#{ami(1)}"}, "sk": {"S": "item"}}]
    request = {"RequestItems": {TABLE: {"Keys": keys, "ConsistentRead": True}}}
    s.fail("dynamodb", "batch_get_item", "ResourceNotFoundException", request)
    s.add("dynamodb", "batch_get_item", {"Responses": {TABLE: []}}, request)
    s.fail("dynamodb", "batch_get_item", "AccessDeniedException", request, status=403)

    assert read_ledger_items(s.clients, TABLE, [ami(1)]) is None
    view = read_ledger_items(s.clients, TABLE, [ami(1)])
    assert view is not None and view.table == TABLE and view.items == {}
    with pytest.raises(ClientError, match="AccessDenied"):
        read_ledger_items(s.clients, TABLE, [ami(1)])
    s.verify()


# ---- whether an AMI the janitor's stage retired holds Latest (the event of its own stage) ----

ARCH_POLICY = parse_policy(
    {
        "regions": [REGION],
        "families": [
            {
                "name": "app",
                "match": {"tags": APP},
                "latest": {"tag": "Latest", "ssm_parameter": "/ami/app/{arch}"},
            },
            {"name": "web", "match": {"name": "web-*"}, "latest": {"ssm_parameter": "/ami/web"}},
            {"name": "tagged", "match": {"name": "db-*"}, "latest": {"tag": "Newest"}},
        ],
    }
)
BY_ID = {"ImageIds": [ami(1)], "Owners": ["self"], "IncludeDeprecated": True, "IncludeDisabled": True}


def test_a_deregistered_ami_holds_latest_where_a_parameter_of_any_architecture_names_it(
    stubbed: Stubbed,
) -> None:
    s = stubbed
    s.add("ec2", "describe_images", {"Images": []}, BY_ID)
    names = sorted(["/ami/web", *(f"/ami/app/{arch}" for arch in ARCHITECTURES)])
    answer = {"Parameters": [{"Name": "/ami/app/x86_64_mac", "Type": "String", "Value": ami(1)}]}
    s.add("ssm", "get_parameters", answer, {"Names": names, "WithDecryption": False})

    assert rotator._holds_latest(s.clients, ARCH_POLICY, ami(1))
    s.verify()


def test_a_disabled_ami_holds_latest_by_a_latest_tag_of_any_family_whatever_its_value(
    stubbed: Stubbed,
) -> None:
    s = stubbed
    disabled = raw_image(ami(1), "app-1", {**APP, "Newest": "no"}, State="disabled")
    s.add("ec2", "describe_images", {"Images": [disabled]}, BY_ID)

    assert rotator._holds_latest(s.clients, ARCH_POLICY, ami(1))  # no parameter read
    s.verify()


def test_a_disabled_ami_no_latest_names_holds_none(stubbed: Stubbed) -> None:
    s = stubbed
    s.add("ec2", "describe_images", {"Images": [raw_image(ami(1), "app-1", APP, State="disabled")]}, BY_ID)
    # Its own architecture's parameters alone; a SecureString is never read as an AMI id.
    answer = {
        "Parameters": [
            {"Name": "/ami/app/x86_64", "Type": "String", "Value": ami(2)},
            {"Name": "/ami/web", "Type": "SecureString", "Value": ami(1)},
        ]
    }
    s.add(
        "ssm", "get_parameters", answer, {"Names": ["/ami/app/x86_64", "/ami/web"], "WithDecryption": False}
    )

    assert not rotator._holds_latest(s.clients, ARCH_POLICY, ami(1))
    s.verify()


@pytest.mark.parametrize("fails", ["ec2", "ssm"])
def test_an_ami_whose_latest_cannot_be_read_is_taken_as_holding_it(stubbed: Stubbed, fails: str) -> None:
    """The event then reads the region and converges, as any other event does."""
    s = stubbed
    if fails == "ec2":
        s.fail("ec2", "describe_images", "RequestLimitExceeded", BY_ID)
    else:
        s.add("ec2", "describe_images", {"Images": []}, BY_ID)
        names = sorted(["/ami/web", *(f"/ami/app/{arch}" for arch in ARCHITECTURES)])
        s.fail("ssm", "get_parameters", "ThrottlingException", {"Names": names, "WithDecryption": False})

    assert rotator._holds_latest(s.clients, ARCH_POLICY, ami(1))
    s.verify()


def group_naming_an_unlisted_configuration(s: Stubbed, name: str, found: list[dict[str, Any]]) -> None:
    """The listing lacks launch configuration `name`; a group names it; reading it by name finds `found`."""
    groups = [raw_group("made-since", LaunchConfigurationName=name)]
    s.queue(
        groups=lambda: s.add(
            "autoscaling", "describe_auto_scaling_groups", {"AutoScalingGroups": groups}, {"MaxRecords": 100}
        ),
    )
    s.add(
        "autoscaling",
        "describe_launch_configurations",
        {"LaunchConfigurations": found},
        {"LaunchConfigurationNames": [name], "MaxRecords": 100},
    )


def test_a_launch_configuration_made_after_the_listing_that_a_group_names_is_read_by_name(
    stubbed: Stubbed,
) -> None:
    """The launch configurations are listed before the groups: a group made since, with its launch
    configuration (as CloudFormation makes them), names one the listing lacks. It is read by its name
    and keeps its AMI (it was dropped: no reference, no note, no error)."""
    s = stubbed
    configuration = {
        "LaunchConfigurationName": "lc-since",
        "ImageId": ami(3),
        "InstanceType": "t3.micro",
        "CreatedTime": CREATED,
    }
    group_naming_an_unlisted_configuration(s, "lc-since", [configuration])

    inventory = load_inventory(s.clients, policy())

    s.verify()
    assert inventory.error is None
    assert ami(3) in {r.image_id for r in inventory.references}


def test_a_launch_configuration_a_group_names_that_no_read_finds_skips_the_region(stubbed: Stubbed) -> None:
    s = stubbed
    group_naming_an_unlisted_configuration(s, "lc-gone", [])

    inventory = load_inventory(s.clients, policy())

    assert inventory.error == (
        "autoscaling:DescribeLaunchConfigurations: MalformedResponse: ValueError: an Auto Scaling group names "
        "launch configuration lc-gone, which is not found"
    )


@pytest.mark.parametrize(
    ("kind", "data_type", "written_as"),
    [
        ("String", "aws:ec2:image", "aws:ec2:image"),
        ("String", "text", "text"),  # SSM changes no parameter to or from aws:ec2:image
        ("String", None, "text"),
        (None, None, "aws:ec2:image"),  # none yet: made aws:ec2:image
        ("String", "aws:ssm:integration", None),
        ("SecureString", "text", None),
        ("StringList", "text", None),
    ],
)
def test_a_pointers_type_and_data_type_are_asked_before_it_is_written(
    stubbed: Stubbed, kind: str | None, data_type: str | None, written_as: str | None
) -> None:
    s = stubbed
    found: dict[str, Any] = {"Name": "/ami/web", "Type": kind, "Value": ami(1)}
    if data_type:
        found["DataType"] = data_type
    answer = {"Parameters": [found]} if kind else {"Parameters": [], "InvalidParameters": ["/ami/web"]}
    s.add("ssm", "get_parameters", answer, {"Names": ["/ami/web"], "WithDecryption": False})

    if written_as is None:
        with pytest.raises(rotator.PointerOfAnotherType, match="/ami/web is a"):
            rotator._writable(s.clients, "/ami/web")
    else:
        assert rotator._writable(s.clients, "/ami/web") == written_as
    s.verify()


def test_records_are_made_visible_again_with_one_exact_change_message_visibility_batch() -> None:
    """handlers.visibility.change_visibility: one ChangeMessageVisibilityBatch of the records' receipt
    handles and seconds; a refusal is logged, not raised (the queue's visibility timeout applies)."""
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

    from ami_janitor.handlers.visibility import change_visibility
    from lambda_events import sqs_record

    sqs = botocore_session("us-east-1", "x", "x").create_client("sqs", region_name="us-east-1")
    queue = "https://sqs.us-east-1.amazonaws.com/123456789012/copies"
    records = [
        SQSRecord(
            sqs_record("{}", message_id=f"m-{n}", queue_arn="arn:aws:sqs:us-east-1:123456789012:copies")
        )
        for n in range(2)
    ]
    entries = [
        {"Id": "0", "ReceiptHandle": "handle-m-0", "VisibilityTimeout": 0},
        {"Id": "1", "ReceiptHandle": "handle-m-1", "VisibilityTimeout": 120},
    ]
    with Stubber(sqs) as stub:
        stub.add_response(
            "change_message_visibility_batch",
            {"Successful": [{"Id": "0"}, {"Id": "1"}], "Failed": []},
            {"QueueUrl": queue, "Entries": entries},
        )
        stub.add_client_error("change_message_visibility_batch", "AWS.SimpleQueueService.NonExistentQueue")
        change_visibility(sqs, queue, [(records[0], 0), (records[1], 120)], what="copy requests")
        change_visibility(sqs, queue, [(records[0], 0)], what="copy requests")
        change_visibility(sqs, queue, [], what="copy requests")  # nothing to change: no call
        stub.assert_no_pending_responses()
