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
from sdk_faults import deny
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


def test_a_newer_ami_whose_event_was_lost_is_made_latest_by_the_scheduled_write(policy: Policy) -> None:
    """The region read again asks for Latest on an AMI made since the plan, whose event never came: the
    scheduled run writes that (its caller keeps the AMI this run), rather than leave the group a day."""
    at = now()
    group, clients = Group(at), RegionClients("us-east-1")
    changes = planned(clients, policy, at, group)
    new = group.bake("02", 0)  # available, its event lost

    (result,) = rotator.write_changes(clients, policy, changes, at, follow=True)

    assert result.status == "ok" and result.to == new, result
    assert group.tagged() == [new] and group.parameter() == new


def test_an_operators_confirmed_apply_writes_no_latest_it_did_not_show(policy: Policy) -> None:
    at = now()
    group, clients = Group(at), RegionClients("us-east-1")
    changes = planned(clients, policy, at, group)
    new = group.bake("02", 0)

    (result,) = rotator.write_changes(clients, policy, changes, at)  # follow=False: only what it showed

    assert result.status == "superseded" and result.written == [], result
    assert f"Latest now goes to {new}" in (result.error or "")
    assert group.tagged() == [group.old] and group.parameter() == group.old


def test_a_move_to_an_ami_whose_rescue_failed_is_not_followed(policy: Policy) -> None:
    at = now()
    group, clients = Group(at), RegionClients("us-east-1")
    changes = planned(clients, policy, at, group)
    new = group.bake("02", 0)

    (result,) = rotator.write_changes(clients, policy, changes, at, skip=[new], follow=True)

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


@pytest.mark.parametrize("confirmed", [False, True])
def test_the_scheduled_run_follows_a_newer_ami_its_event_lost_and_a_confirmed_apply_does_not(
    policy: Policy, monkeypatch: pytest.MonkeyPatch, confirmed: bool
) -> None:
    """Between the plan and its Latest writes, an AMI becomes available and its event is lost: the
    scheduled run (no confirmed plan) writes the move its fresh read asks for; an operator's confirmed
    apply writes none it did not show (the next run moves it). Either way the AMIs concerned stay."""
    at = now()
    group = Group(at)
    real = rotator.load_images
    baked: list[str] = []

    def a_bake_meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not baked:  # the write's fresh read of the region
            baked.append(group.bake("02", 0))
        return real(*args, **kwargs)

    planned, _ = engine.build_plan(policy, ["us-east-1"], ClientFactory(), at)
    assert [(c.from_, c.to) for c in planned.latest] == [(group.old, group.mid)]
    monkeypatch.setattr(rotator, "load_images", a_bake_meanwhile)

    result = engine.run(
        policy, ["us-east-1"], ClientFactory(), at, apply=True, confirmed=planned if confirmed else None
    )

    [rotation] = result.rotations
    [new] = baked
    if confirmed:
        assert rotation.status == "superseded" and rotation.written == [], rotation
        assert group.tagged() == [group.old] and group.parameter() == group.old
    else:
        assert (rotation.status, rotation.to) == ("ok", new), rotation
        assert group.tagged() == [new] and group.parameter() == new
    assert {group.old, group.mid, new} <= set(image_ids())


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
        f"PointerOfAnotherType: {PARAMETER} is a {kind} parameter: the rotation writes a String holding the "
        "AMI id and does not overwrite it (delete it, or name another latest.ssm_parameter)"
    )
    assert result.refused  # the event that finds it does not try again
    assert group.tagged() == [group.mid]  # the tag moved before: written first, as always


def test_a_pointer_not_there_yet_is_written_as_a_string(policy: Policy) -> None:
    at = now()
    group = Group(at)
    boto3.client("ssm", region_name="us-east-1").delete_parameter(Name=PARAMETER)

    [result] = rotator.converge(RegionClients("us-east-1"), policy, at)

    assert result.status == "ok" and group.parameter() == group.mid


def data_type() -> str:
    ssm = boto3.client("ssm", region_name="us-east-1")
    return str(ssm.get_parameters(Names=[PARAMETER])["Parameters"][0]["DataType"])


def test_a_pointer_made_as_text_is_written_as_text(policy: Policy) -> None:
    """SSM will not change a parameter to or from `aws:ec2:image` (the emulator refuses it as SSM does):
    a pointer that Packer, Terraform or a person made `text` (the group's is) is written as `text`,
    not failed at every rotation while the tag moves on."""
    at = now()
    group = Group(at)
    assert data_type() == "text"

    [result] = rotator.converge(RegionClients("us-east-1"), policy, at)

    assert (result.status, result.error) == ("ok", None)
    assert group.parameter() == group.mid and data_type() == "text"


def test_a_pointer_the_rotation_makes_is_of_data_type_aws_ec2_image(policy: Policy) -> None:
    at = now()
    group = Group(at)
    boto3.client("ssm", region_name="us-east-1").delete_parameter(Name=PARAMETER)

    rotator.converge(RegionClients("us-east-1"), policy, at)

    assert group.parameter() == group.mid and data_type() == "aws:ec2:image"


@pytest.mark.parametrize(
    ("code", "for_good"),
    [
        ("ParameterMaxVersionLimitExceeded", True),
        ("ValidationException", True),
        ("ThrottlingException", False),
    ],
)
def test_an_event_is_tried_again_only_where_its_rotation_may_yet_succeed(
    policy: Policy, monkeypatch: pytest.MonkeyPatch, code: str, for_good: bool
) -> None:
    """A pointer SSM refuses for good fails its group's rotation without failing the event: tried again it
    would fail alike, holding the region's later events back, then land in the dead-letter queue. A
    refusal of the moment (throttling past the retries) fails the event, which is tried again."""
    at = now()
    group = Group(at)
    new = group.bake("02", 0)
    deny(monkeypatch, "PutParameter", code, "refused")
    clients = RegionClients("us-east-1")

    if not for_good:
        with pytest.raises(RuntimeError, match=f"rotation failed: web .*{code}"):
            rotator.handle_state_change(new, "available", clients, policy, at)
        return
    outcome = rotator.handle_state_change(new, "available", clients, policy, at)

    [rotation] = outcome.rotations
    assert outcome.outcome == "rotated" and rotation.status == "failed" and rotation.refused
    assert rotation.error == (
        f"PointerRefused: SSM refuses to write {PARAMETER}: An error occurred ({code}) when calling the "
        "PutParameter operation: refused"
    )
    assert group.tagged() == [new] and group.parameter() == group.old  # the tag moved; the parameter waits


def test_a_write_whose_answer_was_lost_but_landed_is_reported_ok(
    policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PutParameter took effect and its answer was lost (no retry left): the next round reads the
    group agreeing and says so, rather than reporting the group failed (and failing its event)."""
    from sdk_faults import LoseFirstAnswers

    monkeypatch.setenv("AMI_JANITOR_MAX_ATTEMPTS", "1")
    at = now()
    group = Group(at)
    clients = RegionClients("us-east-1")
    lost = LoseFirstAnswers(clients.ssm, "PutParameter", count=1)

    [result] = rotator.converge(clients, policy, at)

    assert lost.lost == ["PutParameter"]
    assert (result.status, result.error, result.to) == ("ok", None, group.mid)
    assert group.parameter() == group.mid


def test_a_pointer_written_by_hand_to_an_ami_the_familys_glob_does_not_name_is_written_back(
    policy: Policy,
) -> None:
    """Someone points web's parameter at a newer AMI of another team (`db-1`, which web's glob `web-*`
    does not name): it was never web's AMI, so the rotation writes the parameter back to web's Latest
    rather than holding it there as an AMI that left the family (which only a tag change can make)."""
    at = now()
    group = Group(at)
    other = ec2().create_image(InstanceId=group.instance, Name="db-1")["ImageId"]
    ssm = boto3.client("ssm", region_name="us-east-1")
    ssm.put_parameter(Name=PARAMETER, Value=other, Type="String", Overwrite=True)

    [result] = rotator.converge(RegionClients("us-east-1"), policy, at)

    assert (result.status, result.to) == ("ok", group.mid)
    assert group.parameter() == group.mid


def test_a_failed_write_whose_group_is_then_blocked_stays_failed(
    policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parameter's write is throttled past its retries; before the next round reads, a newer AMI
    is put in two families, which leaves the group unrotated. The group is not settled (its tag moved,
    its parameter did not): it stays failed, naming both, rather than reported ok."""
    import botocore.client
    from botocore.exceptions import ClientError

    two = parse_policy(
        yaml.safe_load(POLICY.format(mode="enforce"))
        | {
            "families": [
                *yaml.safe_load(POLICY.format(mode="enforce"))["families"],
                {"name": "other", "match": {"tags": {"Team": "X"}, "name": "web-*"}},
            ]
        }
    )
    at = now()
    group = Group(at)
    real_call = botocore.client.BaseClient._make_api_call
    throttled: list[str] = []

    def throttle_once(self: Any, operation: str, params: dict[str, Any]) -> Any:
        if operation == "PutParameter" and not throttled:
            throttled.append(operation)
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, operation)
        return real_call(self, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", throttle_once)
    reads: list[int] = []

    def read(clients: RegionClients, policy: Policy) -> Any:
        reads.append(1)
        if len(reads) == 2:  # between the rounds: a newer AMI in both families
            newer = group.bake("02", 0)
            ec2().create_tags(Resources=[newer], Tags=[{"Key": "Team", "Value": "X"}])
        return load_images(clients, policy)

    [result] = rotator.converge(RegionClients("us-east-1"), two, at, load=read)

    assert throttled and result.status == "failed"
    assert result.error is not None and "ThrottlingException" in result.error
    assert "then left unrotated" in result.error and "matches several families" in result.error
    assert group.parameter() == group.old
