"""A tag that enrolls one family's AMI in another family too must do no harm.

Two families told apart by a tag key: anyone who can tag may put family a's key on family b's newest
AMI. That AMI then matches both: it is kept and reported, and it moves neither family's Latest, takes
no keep-N place and retires nothing. Nor does taking a family's key off its newest AMI and putting two
other families' on: a's SSM parameter is not moved back to a's older AMI. Played through the CLI, on
the emulator, with `apply --yes`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from ami_janitor import cli
from ami_janitor.demo import emulator
from server import ec2, image_ids, make_ledger, now

# Families told apart by a tag key, one name glob; a's Latest has an SSM parameter.
DEFAULTS_AND_A = """\
mode: enforce
regions: [us-east-1]
defaults:
  keep_latest: 1
  min_age_days: 1
  lifecycle: {deprecate_after_days: 0, disable_after_days: 0, deregister_after_days: 0}
  limits: {max_actions_per_run: 100, max_fraction_per_family: 1.0}
families:
  - name: a
    match: {tags: {TeamA: "1"}, name: "svc-*"}
    latest: {tag: Latest, ssm_parameter: "/ami/a"}
"""
POLICY = (
    DEFAULTS_AND_A
    + """\
  - name: b
    match: {tags: {TeamB: "1"}, name: "svc-*"}
    latest: {tag: Latest, ssm_parameter: "/ami/b"}
"""
)


def configured(tmp_path: Path, policy: str) -> Path:
    """The policy's file, and the region's ledger table."""
    config = tmp_path / "janitor.yaml"
    config.write_text(policy)
    make_ledger()
    return config


def parameter() -> str:
    """Family a's SSM parameter."""
    return str(
        boto3.client("ssm", region_name="us-east-1").get_parameter(Name="/ami/a")["Parameter"]["Value"]
    )


def apply(config: Path) -> dict[str, Any]:
    out = io.StringIO()
    assert cli.main(["apply", "--config", str(config), "--yes", "--format", "json"], out=out) == 0
    return dict(json.loads(out.getvalue()))


def baker(client: Any) -> Callable[..., str]:
    """`bake(name, tag, age, architecture=None)`: an AMI of the builder instance, carrying `tag`=1 and
    made `age` ago."""
    base = client.register_image(Name="base", RootDeviceName="/dev/xvda")["ImageId"]
    builder = client.run_instances(ImageId=base, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]

    def bake(name: str, tag: str, age: timedelta, architecture: str | None = None) -> str:
        tags = [{"ResourceType": "image", "Tags": [{"Key": tag, "Value": "1"}]}]
        image_id = str(client.create_image(InstanceId=builder, Name=name, TagSpecifications=tags)["ImageId"])
        fields: dict[str, Any] = {"architecture": architecture} if architecture else {}
        emulator.set_image_fields("us-east-1", image_id, creation_date=now() - age, **fields)
        return image_id

    return bake


def test_a_tag_of_another_family_on_a_familys_newest_ami_moves_and_retires_nothing(
    endpoint: str, tmp_path: Path
) -> None:
    client = ec2()
    bake = baker(client)
    a_only = bake("svc-a-1", "TeamA", timedelta(days=30))
    b_old, b_new = bake("svc-b-1", "TeamB", timedelta(days=20)), bake("svc-b-2", "TeamB", timedelta(days=2))
    config = tmp_path / "janitor.yaml"
    config.write_text(POLICY)
    make_ledger()
    ssm = boto3.client("ssm", region_name="us-east-1")

    def pointers() -> tuple[str, str]:
        return tuple(ssm.get_parameter(Name=n)["Parameter"]["Value"] for n in ("/ami/a", "/ami/b"))  # type: ignore[return-value]

    apply(config)  # the steady state: each family's Latest on its newest; b's older AMI retired
    assert pointers() == (a_only, b_new) and b_old not in image_ids()

    client.create_tags(Resources=[b_new], Tags=[{"Key": "TeamA", "Value": "1"}])
    report = apply(config)

    assert pointers() == (a_only, b_new)
    assert {a_only, b_new} <= image_ids()
    assert [r for r in report["results"] if r["status"] == "ok"] == []
    assert any(f"{b_new} matches several families (a, b)" in e for e in report["policy_errors"])
    tags = client.describe_tags(Filters=[{"Name": "key", "Values": ["Latest"]}])["Tags"]
    assert sorted(t["ResourceId"] for t in tags) == sorted([a_only, b_new])


THREE_FAMILIES = (
    DEFAULTS_AND_A
    + """\
  - name: b
    match: {tags: {TeamB: "1"}, name: "svc-*"}
  - name: c
    match: {tags: {TeamC: "1"}, name: "svc-*"}
"""
)


def test_a_familys_newest_ami_moved_into_two_other_families_moves_no_latest_back(
    endpoint: str, tmp_path: Path
) -> None:
    """The AMI a's parameter names then matches b and c (kept, a policy error) and no longer a: the
    parameter stays on it, as when it leaves a for one family, never goes back to a's older AMI."""
    client = ec2()
    bake = baker(client)
    # Both young: kept by min_age_days.
    older, newest = (
        bake("svc-a-1", "TeamA", timedelta(hours=12)),
        bake("svc-a-2", "TeamA", timedelta(hours=1)),
    )
    config = configured(tmp_path, THREE_FAMILIES)
    apply(config)
    assert parameter() == newest

    client.delete_tags(Resources=[newest], Tags=[{"Key": "TeamA"}])
    client.create_tags(
        Resources=[newest], Tags=[{"Key": "TeamB", "Value": "1"}, {"Key": "TeamC", "Value": "1"}]
    )
    report = apply(config)

    assert parameter() == newest
    assert [c for c in report["latest"] if c["family"] == "a"] == []
    assert any(
        f"/ami/a names {newest}" in error and "Latest not moved back" in error
        for error in report["policy_errors"]
    )
    assert not any(d["image_id"] in (older, newest) and d["action"] != "keep" for d in report["decisions"])


def _retag_off(client: Any, image_id: str) -> None:
    client.delete_tags(Resources=[image_id], Tags=[{"Key": "TeamA"}])


def _retag_into_b(client: Any, image_id: str) -> None:
    client.create_tags(Resources=[image_id], Tags=[{"Key": "TeamB", "Value": "1"}])


@pytest.mark.parametrize("retag", [_retag_off, _retag_into_b], ids=["a's key taken off", "b's key put on"])
def test_a_tag_on_the_newest_ami_of_another_architecture_moves_no_parameter_back(
    endpoint: str, tmp_path: Path, retag: Callable[[Any, str], None]
) -> None:
    """Family a has one parameter for every architecture (`/ami/a`, no `{arch}`). It names a's newest
    AMI, an arm64 build; an older x86_64 build is available too (its owner registered it since): a
    policy error, nothing rotated. A tagger then takes a's key off the arm64 AMI, or puts b's on it:
    with no available arm64 AMI left to a, the error goes, and the x86_64 group moved the parameter
    back to the older AMI (the checks compared an AMI with its own architecture's group alone)."""
    client = ec2()
    bake = baker(client)
    newest = bake("svc-a-2", "TeamA", timedelta(days=2), "arm64")
    config = configured(tmp_path, POLICY)
    apply(config)
    assert parameter() == newest
    older = bake("svc-a-1", "TeamA", timedelta(days=30), "x86_64")
    report = apply(config)
    assert parameter() == newest
    assert any("must contain {arch}" in error for error in report["policy_errors"])

    retag(client, newest)
    report = apply(config)

    assert parameter() == newest
    assert [c for c in report["latest"] if c["family"] == "a"] == []
    assert any("/ami/a names" in e or "matches several families" in e for e in report["policy_errors"])
    assert {older, newest} <= image_ids()


# Families a and b, their Latest the tag alone.
TAG_ONLY = POLICY.replace(', ssm_parameter: "/ami/a"', "").replace(', ssm_parameter: "/ami/b"', "")


def test_a_familys_key_taken_off_its_newest_ami_moves_no_latest_tag_back(
    endpoint: str, tmp_path: Path
) -> None:
    """Family a's Latest is a tag alone. A tagger takes a's key off a's newest AMI, which the rotation
    tagged Latest: the tag is not written on a's older AMI (it was, and stayed there). The Latest tag of
    b's newer AMI, which b selects, holds a's rotation back neither before nor after."""
    client = ec2()
    bake = baker(client)
    older, newest, b_newest = (
        bake("svc-a-1", "TeamA", timedelta(hours=12)),
        bake("svc-a-2", "TeamA", timedelta(hours=2)),
        bake("svc-b-1", "TeamB", timedelta(hours=1)),
    )
    config = configured(tmp_path, TAG_ONLY)

    def holders() -> list[str]:
        tags = client.describe_tags(Filters=[{"Name": "key", "Values": ["Latest"]}])["Tags"]
        return sorted(t["ResourceId"] for t in tags if t["Value"] == "true")

    apply(config)
    assert holders() == sorted([newest, b_newest])

    client.delete_tags(Resources=[newest], Tags=[{"Key": "TeamA"}])
    report = apply(config)

    assert holders() == sorted([newest, b_newest])
    assert [c for c in report["latest"] if c["family"] == "a"] == []
    assert any(
        f"{newest} carries its Latest tag Latest" in error and "Latest not moved back" in error
        for error in report["policy_errors"]
    )
    assert not any(d["image_id"] == older and d["action"] != "keep" for d in report["decisions"])
