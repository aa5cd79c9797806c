"""Security: a bake never images an instance someone else launched or tagged, and a reference source
that fails (an HTML 5xx page, say) is never taken for one AWS does not offer, so nothing is retired on a
partial inventory. End to end on the emulator's server: the scheduled bake handler and the CLI."""

from __future__ import annotations

import io
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.ec2.responses import EC2Response

from ami_janitor import cli
from ami_janitor.core import baking
from ami_janitor.demo import emulator
from ami_janitor.handlers import bake as bake_handler
from server import make_ledger

REGION = "us-east-1"
ROLE = {"Key": "Role", "Value": "web-build"}
POLICY = """\
mode: {mode}
regions: [us-east-1]
defaults:
  keep_latest: 1
  min_age_days: 1
  lifecycle: {{deprecate_after_days: 0, disable_after_days: 0, deregister_after_days: 0}}
  limits: {{max_actions_per_run: 100, max_fraction_per_family: 1.0}}
families:
  - name: web
    match: {{tags: {{Project: Web}}, name: "web-*"}}
    bake: {{instance_tag: {{Role: web-build}}, schedule: "cron(0 2 * * ? *)"}}
"""
# What a load balancer or a proxy in front of EC2 answers when something behind it breaks.
HTML_503_PAGE = (
    "<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n"
    "<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n</body>\r\n</html>\r\n"
)


@dataclass
class Context:
    function_name: str = "ami-janitor-bake"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = f"arn:aws:lambda:{REGION}:123456789012:function:ami-janitor-bake"
    aws_request_id: str = "c6af9ac6-7b61-11e6-9a41-93e812345678"


@pytest.fixture(scope="module")
def emulator_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        server, endpoint = emulator.start_server()
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def aws(emulator_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A clean emulator that every boto3 client reaches, with fake credentials only."""
    urllib.request.urlopen(
        urllib.request.Request(f"{emulator_endpoint}/moto-api/reset", method="POST")
    ).close()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_ENDPOINT_URL": emulator_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AMI_JANITOR_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    return emulator_endpoint


def ec2() -> Any:
    return boto3.client("ec2", region_name=REGION)


def write_policy(tmp_path: Path, mode: str) -> str:
    path = tmp_path / "janitor.yaml"
    path.write_text(POLICY.format(mode=mode))
    return str(path)


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(list(argv), out=out), out.getvalue()


def own_images() -> dict[str, dict[str, Any]]:
    return {i["ImageId"]: i for i in ec2().describe_images(Owners=["self"])["Images"]}


def launch(base: str, tags: list[dict[str, str]]) -> str:
    spec = [{"ResourceType": "instance", "Tags": tags}] if tags else []
    answer = ec2().run_instances(ImageId=base, MinCount=1, MaxCount=1, TagSpecifications=spec)
    return str(answer["Instances"][0]["InstanceId"])


def seed_web_fleet(count: int = 4) -> tuple[str, list[str]]:
    """The build instance and `count` web AMIs a week apart (oldest first), all past min_age_days."""
    client = ec2()
    base = client.register_image(Name="base", RootDeviceName="/dev/xvda")["ImageId"]
    builder = launch(base, [ROLE])
    now = datetime.now(UTC)
    images = []
    for n in range(count):
        image_id = client.create_image(
            InstanceId=builder,
            Name=f"web-{n:02d}",
            TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": "Project", "Value": "Web"}]}],
        )["ImageId"]
        emulator.set_image_fields(REGION, image_id, creation_date=now - timedelta(days=7 * (count - n)))
        images.append(image_id)
    return builder, images


# ---- (a) an attacker's instance carrying the bake tag ----------------------------------------------------


@pytest.fixture
def attacker_instance(aws: str) -> tuple[str, str]:
    """The build instance, and one launched later by someone else with the same bake tag."""
    builder, _ = seed_web_fleet(count=1)
    make_ledger()  # a bake is recorded on its AMI's ledger item: no table, no bake at all
    base = next(i["ImageId"] for i in own_images().values() if i["Name"] == "base")
    return builder, launch(base, [ROLE])


def test_the_scheduled_bake_refuses_an_attackers_later_tagged_instance(
    attacker_instance: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder, attacker = attacker_instance
    monkeypatch.setenv("AMI_JANITOR_CONFIG", write_policy(tmp_path, "enforce"))
    monkeypatch.setattr(bake_handler.metrics, "namespace", "AmiJanitor")
    before = set(own_images())

    with pytest.raises(baking.BakeError) as refused:
        bake_handler.handler({"family": "web"}, Context())

    assert attacker in str(refused.value) and builder in str(refused.value)
    assert set(own_images()) == before  # no CreateImage: nothing of the attacker's became a family AMI


def test_the_cli_bake_refuses_an_attackers_later_tagged_instance(
    attacker_instance: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    builder, attacker = attacker_instance
    before = set(own_images())

    code, output = run_cli("bake", "--family", "web", "--config", write_policy(tmp_path, "dry-run"))

    assert code == 1 and output == ""
    err = capsys.readouterr().err
    assert attacker in err and builder in err and "bake.instance_id" in err
    assert set(own_images()) == before


# ---- (b) an HTML 5xx from an optional reference source ---------------------------------------------------


def answer_an_html_page(self: Any) -> tuple[str, dict[str, Any]]:
    return HTML_503_PAGE, {"status": 503, "Content-Type": "text/html"}


@pytest.mark.usefixtures("aws")
def test_an_html_5xx_from_image_references_skips_the_region_and_retires_nothing(tmp_path: Path) -> None:
    _, images = seed_web_fleet()
    make_ledger()
    before = own_images()
    config = write_policy(tmp_path, "enforce")

    with pytest.MonkeyPatch.context() as broken:
        broken.setattr(EC2Response, "describe_image_references", answer_an_html_page, raising=False)
        code, output = run_cli("plan", "--config", config, "--format", "json")
        plan = json.loads(output)
        assert code == 1
        [region] = plan["regions"]
        assert region["status"] == "skipped"
        assert region["error"].startswith("ec2:DescribeImageReferences: ")
        assert plan["decisions"] == [] and plan["summary"]["regions_skipped"] == 1

        code, output = run_cli("apply", "--config", config, "--yes")
        assert code == 1
        assert "region us-east-1: skipped (ec2:DescribeImageReferences" in output
        assert own_images() == before  # nothing deprecated, disabled, deregistered or tagged

    # The control: with the source answering as the emulator does (not offered here), the three
    # older AMIs are retired at once.
    code, output = run_cli("plan", "--config", config, "--format", "json")
    assert code == 0
    actions = {d["image_id"]: d["action"] for d in json.loads(output)["decisions"]}
    assert [actions[i] for i in images] == ["deregister", "deregister", "deregister", "keep"]
