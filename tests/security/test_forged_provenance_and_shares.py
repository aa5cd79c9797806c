"""Attacks by a principal who can only tag, on what the janitor made: copies and grants.

A replica is an AMI whose SourceImageId/SourceImageRegion (set by EC2) name its source and whose copy
the ledger records; the grants the janitor may revoke are the ones its ledger records. So a forged
`ami-janitor:source-*` or `ami-janitor:shared` tag must change no decision. Each test plays the attack
through the CLI, on the emulator, with an enforce policy and `apply --yes`.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3

from ami_janitor import cli
from ami_janitor.core.policy import (
    SHARED_BY_JANITOR_TAG,
    SOURCE_CREATED_TAG,
    SOURCE_IMAGE_TAG,
    SOURCE_REGION_TAG,
)
from ami_janitor.demo import emulator
from server import POLICY, ec2, image_ids, make_ledger, now, seed_fleet

OUTSIDE_ACCOUNT = "999988887777"
SHARED_ACCOUNT = "111122223333"
REGION = "us-east-1"


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(list(argv), out=out)
    return code, out.getvalue()


def apply(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "janitor.yaml"
    path.write_text(text)
    make_ledger()
    code, output = run("apply", "--config", str(path), "--yes", "--format", "json")
    assert code == 0, output
    report: dict[str, Any] = json.loads(output)
    return report


def decision(report: dict[str, Any], image_id: str) -> dict[str, Any]:
    return next(d for d in report["decisions"] if d["image_id"] == image_id)


def forge(image_id: str, tags: dict[str, str]) -> None:
    ec2().create_tags(Resources=[image_id], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])


def latest_parameter() -> str:
    ssm = boto3.client("ssm", region_name=REGION)
    return str(ssm.get_parameter(Name="/ami/web/latest")["Parameter"]["Value"])


def launch_permissions(image_id: str) -> list[dict[str, str]]:
    answer = ec2().describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    return list(answer["LaunchPermissions"])


def test_a_forged_source_created_makes_the_newest_ami_no_older(endpoint: str, tmp_path: Path) -> None:
    fleet = seed_fleet(now())
    newest = fleet.images[-1]
    emulator.set_image_fields(REGION, newest, creation_date=now() - timedelta(days=1))
    # "A copy of an old AMI": if believed, it loses keep-N, min-age and Latest, and retires at once.
    forge(
        newest,
        {
            SOURCE_IMAGE_TAG: "ami-0123456789abcdef0",
            SOURCE_REGION_TAG: "us-west-2",
            SOURCE_CREATED_TAG: "2020-01-01T00:00:00Z",
        },
    )

    report = apply(tmp_path, POLICY.format(mode="enforce"))

    kept = decision(report, newest)
    assert kept["action"] == "keep", kept
    # Keep-N, min-age (from its own CreationDate, not "source created") and Latest all hold.
    assert kept["reasons"][:3] == [
        "among the 2 newest of its group (#1)",
        f"younger than 7 days (created {(now() - timedelta(days=1)):%Y-%m-%d})",
        "Latest of its group",
    ]
    assert report["decisions"][0]["image_id"] == newest  # ordered by its own CreationDate
    assert [c["to"] for c in report["latest"]] == [newest]
    assert latest_parameter() == newest
    assert newest in image_ids()


def test_a_forged_source_image_tag_supersedes_no_original(endpoint: str, tmp_path: Path) -> None:
    fleet = seed_fleet(now())
    newest, forger = fleet.images[-1], fleet.images[0]
    # "The encrypted copy of the newest": if believed, the newest is superseded, loses Latest and retires.
    forge(forger, {SOURCE_IMAGE_TAG: newest, SOURCE_REGION_TAG: REGION})

    report = apply(tmp_path, POLICY.format(mode="enforce"))

    kept = decision(report, newest)
    assert kept["action"] == "keep", kept
    assert not any("stands in" in r for r in kept["reasons"]), kept["reasons"]
    assert [c["to"] for c in report["latest"]] == [newest]
    assert latest_parameter() == newest
    assert newest in image_ids()
    # The forger is no copy either: it retires like the original it is.
    assert decision(report, forger)["action"] == "deregister"


def test_a_forged_shared_record_revokes_no_hand_made_share_and_keeps_the_ami(
    endpoint: str, tmp_path: Path
) -> None:
    fleet = seed_fleet(now())
    oldest = fleet.images[0]  # retires by keep-N, but for the share its owner made by hand
    ec2().modify_image_attribute(ImageId=oldest, LaunchPermission={"Add": [{"UserId": OUTSIDE_ACCOUNT}]})
    # "The janitor granted that": if believed, the share is revoked and the AMI starts retiring.
    forge(oldest, {SHARED_BY_JANITOR_TAG: f"user:{OUTSIDE_ACCOUNT}"})
    text = POLICY.format(mode="enforce") + f"    share_with: {{accounts: ['{SHARED_ACCOUNT}']}}\n"

    report = apply(tmp_path, text)

    kept = decision(report, oldest)
    assert kept["action"] == "keep", kept
    assert f"shared with user:{OUTSIDE_ACCOUNT} (not in share_with)" in kept["reasons"]
    assert {"UserId": OUTSIDE_ACCOUNT} in launch_permissions(oldest)
    for share in report["shares"]:
        assert f"user:{OUTSIDE_ACCOUNT}" not in share["remove"], share
    assert oldest in image_ids()


# A family matched by tags alone: anyone who may tag an AMI can enroll it, and a tag must not revoke a
# launch permission. Tagged into one, a public AMI of the account (a product its customers launch) stays
# public, and an AMI moved out of a family that shared it (its tag changed) keeps the janitor's grants.
BY_TAGS_ALONE = """\
  - name: pets
    match: {tags: {Project: PetTracker}}
"""


def public_product() -> str:
    """A public AMI of the account, made a day ago, named like none of the policy's globs."""
    client = ec2()
    image_id = str(client.register_image(Name="vendor-product-1", RootDeviceName="/dev/xvda")["ImageId"])
    emulator.set_image_fields("us-east-1", image_id, creation_date=now() - timedelta(days=1))
    client.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": [{"Group": "all"}]})
    return image_id


def removed(report: dict[str, Any], image_id: str) -> list[str]:
    return [g for share in report["shares"] if share["image_id"] == image_id for g in share["remove"]]


def test_a_public_ami_tagged_into_a_family_matched_by_tags_alone_stays_public(
    endpoint: str, tmp_path: Path
) -> None:
    seed_fleet(now())
    product = public_product()
    forge(product, {"Project": "PetTracker"})

    report = apply(tmp_path, POLICY.format(mode="enforce") + BY_TAGS_ALONE)

    assert removed(report, product) == []
    assert {"Group": "all"} in launch_permissions(product)


def test_an_ami_tagged_out_of_a_sharing_family_keeps_the_grants_the_janitor_made(
    endpoint: str, tmp_path: Path
) -> None:
    """Moved by a tag into a family matched by tags alone, an old AMI keeps its grant and is kept for it:
    were it retired, its disable stage would take the grant and no rescue would give it back."""
    fleet = seed_fleet(now())
    moved = fleet.images[-1]
    sharing = POLICY.format(mode="enforce") + f"    share_with: {{accounts: ['{SHARED_ACCOUNT}']}}\n"
    apply(tmp_path, sharing + BY_TAGS_ALONE)
    assert {"UserId": SHARED_ACCOUNT} in launch_permissions(moved)
    # Out of web (its Project tag changed), into pets, behind two newer pets AMIs; old enough to retire.
    for n in range(2):
        newer = str(ec2().register_image(Name=f"pets-{n}", RootDeviceName="/dev/xvda")["ImageId"])
        emulator.set_image_fields(REGION, newer, creation_date=now() - timedelta(days=1))
        forge(newer, {"Project": "PetTracker"})
    emulator.set_image_fields(REGION, moved, creation_date=now() - timedelta(days=100))
    forge(moved, {"Project": "PetTracker"})

    report = apply(tmp_path, sharing + BY_TAGS_ALONE)

    kept = decision(report, moved)
    assert kept["action"] == "keep", kept
    assert f"shared with user:{SHARED_ACCOUNT} (not in share_with)" in kept["reasons"]
    assert removed(report, moved) == []
    assert {"UserId": SHARED_ACCOUNT} in launch_permissions(moved)
    assert ec2().describe_images(ImageIds=[moved])["Images"][0]["State"] == "available"
