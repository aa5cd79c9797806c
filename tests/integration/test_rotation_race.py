"""The scheduled run writes its plan's Latest changes only where the region, read again, still asks for
them: the event function rotates the same groups while the run reads and rescues, and its rotation is
not undone (moto in process)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import boto3
import pytest
import yaml

from ami_janitor import engine
from ami_janitor.aws import rotator
from ami_janitor.aws.clients import ClientFactory, RegionClients
from ami_janitor.aws.inventory import load_images
from ami_janitor.core.model import LatestChange
from ami_janitor.core.policy import Policy, parse_policy
from ami_janitor.core.rotation import changes_for
from ami_janitor.demo import emulator
from server import POLICY, ec2, image_ids, make_ledger, now

PARAMETER = "/ami/web/latest"


class Group:
    """The web family in us-east-1: `old` Latest by tag and parameter, `mid` made since (its event
    missed), so that a scheduled plan moves Latest from `old` to `mid`."""

    def __init__(self, at: datetime) -> None:
        self.at = at
        client = ec2()
        base = client.register_image(Name="base", RootDeviceName="/dev/xvda")["ImageId"]
        reservation = client.run_instances(ImageId=base, MinCount=1, MaxCount=1)
        self.instance = reservation["Instances"][0]["InstanceId"]
        self.old, self.mid = self.bake("00", 20), self.bake("01", 10)
        client.create_tags(Resources=[self.old], Tags=[{"Key": "Latest", "Value": "true"}])
        boto3.client("ssm", region_name="us-east-1").put_parameter(
            Name=PARAMETER, Value=self.old, Type="String"
        )

    def bake(self, suffix: str, days_old: int) -> str:
        image = ec2().create_image(
            InstanceId=self.instance,
            Name=f"web-{suffix}",
            TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": "Project", "Value": "Web"}]}],
        )["ImageId"]
        emulator.set_image_fields("us-east-1", image, creation_date=self.at - timedelta(days=days_old))
        return image

    def tagged(self) -> list[str]:
        images = ec2().describe_images(Owners=["self"], IncludeDisabled=True)["Images"]
        return sorted(i["ImageId"] for i in images if {"Key": "Latest", "Value": "true"} in i.get("Tags", []))

    def parameter(self) -> str:
        ssm = boto3.client("ssm", region_name="us-east-1")
        return str(ssm.get_parameter(Name=PARAMETER)["Parameter"]["Value"])


@pytest.fixture
def policy(moto_aws: None) -> Policy:
    make_ledger()
    return parse_policy(yaml.safe_load(POLICY.format(mode="enforce")))


def planned(clients: RegionClients, policy: Policy, at: datetime, group: Group) -> list[LatestChange]:
    changes = changes_for(load_images(clients, policy), policy, at)
    assert [(c.from_, c.to) for c in changes] == [(group.old, group.mid)]
    return changes


def test_a_newer_ami_the_event_made_latest_is_not_undone(policy: Policy) -> None:
    at = now()
    group, clients = Group(at), RegionClients("us-east-1")
    changes = planned(clients, policy, at, group)
    # While the run reads the references and rescues, tonight's bake becomes available and its event
    # makes it Latest.
    new = group.bake("02", 0)
    assert rotator.handle_state_change(new, "available", clients, policy, at).outcome == "rotated"

    (result,) = rotator.write_changes(clients, policy, changes, at)

    assert result.status == "superseded" and result.written == [], result
    assert "the group changed since the plan was read" in (result.error or "")
    assert group.tagged() == [new] and group.parameter() == new


def test_a_planned_target_disabled_since_the_plan_is_not_made_latest(policy: Policy) -> None:
    at = now()
    group, clients = Group(at), RegionClients("us-east-1")
    changes = planned(clients, policy, at, group)
    ec2().disable_image(ImageId=group.mid)  # its owner pulls a bad build
    rotator.handle_state_change(group.mid, "disabled", clients, policy, at)

    (result,) = rotator.write_changes(clients, policy, changes, at)

    assert result.status == "superseded" and result.written == [], result
    assert group.tagged() == [group.old] and group.parameter() == group.old


def test_a_change_the_region_still_asks_for_is_written(policy: Policy) -> None:
    at = now()
    group, clients = Group(at), RegionClients("us-east-1")
    changes = planned(clients, policy, at, group)

    (result,) = rotator.write_changes(clients, policy, changes, at)

    assert result.status == "ok", result
    assert result.written == [
        f"tag Latest=true on {group.mid}",
        f"untag Latest from {group.old}",
        f"{PARAMETER} = {group.mid}",
    ]
    assert group.tagged() == [group.mid] and group.parameter() == group.mid


def test_an_ami_latest_went_to_while_it_was_written_is_not_retired_by_the_same_run(
    moto_aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduled run plans to move Latest to `mid` and to retire `old`; while it writes, `mid` is
    disabled and the writes' convergence moves Latest back to `old`: `old` stays this run (the run
    keeps the AMI Latest went to instead, and its slice's fresh read finds the parameter naming it)."""
    emulator.install()
    at = now()
    group = Group(at)
    policy = parse_policy(
        yaml.safe_load(POLICY.format(mode="enforce").replace("keep_latest: 2", "keep_latest: 1"))
    )
    make_ledger()
    real = rotator._write
    first = [True]

    def disabled_meanwhile(*args: Any, **kwargs: Any) -> None:
        if first.pop() if first else False:  # after the run read the region again, before its writes
            ec2().disable_image(ImageId=group.mid)
        real(*args, **kwargs)

    monkeypatch.setattr(rotator, "_write", disabled_meanwhile)
    planned, _ = engine.build_plan(policy, ["us-east-1"], ClientFactory(), at)
    assert [(c.from_, c.to) for c in planned.latest] == [(group.old, group.mid)]
    assert {d.image_id: d.action for d in planned.decisions}[group.old] == "deregister"

    result = engine.run(policy, ["us-east-1"], ClientFactory(), at, apply=True)

    [rotation] = result.rotations
    assert (rotation.status, rotation.to) == ("ok", group.old)
    assert group.parameter() == group.old and group.tagged() == [group.old]
    assert group.old in image_ids(), "the run retired the AMI Latest went back to"


@pytest.mark.parametrize("kind", ["SecureString", "StringList", "StringList of one"])
def test_a_pointer_of_another_type_than_string_is_not_overwritten(policy: Policy, kind: str) -> None:
    """A parameter named as the family's pointer that someone made a SecureString (never read, so it
    was rewritten on every run) or a StringList (one of a single AMI id reads as that id): the rotation
    fails naming it, and leaves it as it is (it was overwritten as a String naming the target)."""
    at = now()
    group = Group(at)
    ssm = boto3.client("ssm", region_name="us-east-1")
    value = group.old if kind != "StringList" else f"{group.old},{group.mid}"
    kind = kind.removesuffix(" of one")
    ssm.put_parameter(Name=PARAMETER, Value=value, Type=kind, Overwrite=True)

    [result] = rotator.converge(RegionClients("us-east-1"), policy, at)

    parameter = ssm.get_parameter(Name=PARAMETER, WithDecryption=True)["Parameter"]
    assert (parameter["Type"], parameter["Value"]) == (kind, value)
    assert result.status == "failed"
    assert result.error == (
        f"PointerOfAnotherType: {PARAMETER} is a {kind} parameter: the rotation writes a String of data "
        "type aws:ec2:image and does not overwrite it (delete it, or name another latest.ssm_parameter)"
    )
    assert group.tagged() == [group.mid]  # the tag moved before: written first, as always


def test_a_pointer_not_there_yet_is_written_as_a_string(policy: Policy) -> None:
    at = now()
    group = Group(at)
    boto3.client("ssm", region_name="us-east-1").delete_parameter(Name=PARAMETER)

    [result] = rotator.converge(RegionClients("us-east-1"), policy, at)

    assert result.status == "ok" and group.parameter() == group.mid
