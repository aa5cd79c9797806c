"""A rescue grants again only what every family of the AMI shares now.

Anyone who may tag can enroll an AMI in a family matched by tags, where its name glob selects the AMI
too. Where that AMI is also another family's, it matches several families: kept (a policy error), and,
disabled by the janitor, rescued.
That rescue must not grant back what the AMI's own family withdrew because the other family lists it.
Played through the CLI, on the emulator, with `apply --yes`.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from ami_janitor import cli
from ami_janitor.demo import emulator
from server import ec2, make_ledger, now

WITHDRAWN = "111122223333"

POLICY = """\
mode: enforce
regions: [us-east-1]
defaults:
  keep_latest: 1
  min_age_days: {min_age}
  lifecycle: {{deprecate_after_days: 0, disable_after_days: 0, deregister_after_days: 300}}
  limits: {{max_actions_per_run: 100, max_fraction_per_family: 1.0}}
families:
  - name: apps
    match: {{tags: {{Team: apps}}, name: "web-*"}}
    share_with: {{accounts: ["{withdrawn}"]}}
  - name: web
    match: {{name: "web-*"}}
    share_with: {{accounts: [{web_shares}]}}
"""


def apply(config: Path) -> dict[str, Any]:
    out = io.StringIO()
    assert cli.main(["apply", "--config", str(config), "--yes", "--format", "json"], out=out) == 0, (
        out.getvalue()
    )
    return dict(json.loads(out.getvalue()))


def permissions(image_id: str) -> list[dict[str, str]]:
    answer = ec2().describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    return list(answer["LaunchPermissions"])


def state(image_id: str) -> str:
    return str(ec2().describe_images(ImageIds=[image_id], IncludeDisabled=True)["Images"][0]["State"])


def test_a_tag_enrolling_a_disabled_ami_in_another_family_restores_no_grant_its_family_withdrew(
    endpoint: str, tmp_path: Path
) -> None:
    client = ec2()
    base = client.register_image(Name="base", RootDeviceName="/dev/xvda")["ImageId"]
    builder = client.run_instances(ImageId=base, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]

    def bake(name: str, days_old: int) -> str:
        image_id = str(client.create_image(InstanceId=builder, Name=name)["ImageId"])
        emulator.set_image_fields("us-east-1", image_id, creation_date=now() - timedelta(days=days_old))
        return image_id

    old, new = bake("web-1", 30), bake("web-2", 20)
    make_ledger()
    config = tmp_path / "janitor.yaml"

    def policy(min_age: int, web_shares: str) -> None:
        config.write_text(POLICY.format(min_age=min_age, withdrawn=WITHDRAWN, web_shares=web_shares))

    policy(min_age=100, web_shares=f'"{WITHDRAWN}"')
    apply(config)  # web shares with WITHDRAWN: the janitor grants it on both
    assert permissions(old) == [{"UserId": WITHDRAWN}]

    policy(min_age=1, web_shares=f'"{WITHDRAWN}"')
    for _ in range(3):  # the older one is retired as far as its disable stage
        apply(config)
    assert state(old) == "disabled" and permissions(old) == []

    policy(min_age=1, web_shares="")  # web withdraws WITHDRAWN; apps (its Team tag on a web-* name) lists it
    client.create_tags(Resources=[old], Tags=[{"Key": "Team", "Value": "apps"}])
    report = apply(config)

    rescue = [r for r in report["results"] if r["image_id"] == old and r["action"] == "rescue"]
    assert len(rescue) == 1 and state(old) == "available", rescue
    assert permissions(old) == [], rescue
    assert f"not restored (no longer in share_with): user:{WITHDRAWN}" in rescue[0]["detail"]
    assert new  # untouched: web's newest
