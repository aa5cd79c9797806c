"""`make publish-org-code` (infra.publish_code) on the in-process emulator: the requests it sends."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from infra.bundle import asset_object_key
from infra.publish_code import Published, main, publish, zip_directory
from moto import mock_aws
from synth_support import TEST_POLICY

ACCOUNT = "123456789012"  # the emulator's default account
PREFIX = "example-ami-janitor-code"
REGIONS = ["eu-west-1", "us-east-1"]
ASSET_HASH = "f" * 64
KEY = hashlib.sha256(ASSET_HASH.encode()).hexdigest() + ".zip"


@pytest.fixture
def aws() -> Iterator[None]:
    variables = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        with mock_aws():
            for region in REGIONS:
                s3 = boto3.client("s3", region_name=region)
                where = (
                    {}
                    if region == "us-east-1"
                    else {"CreateBucketConfiguration": {"LocationConstraint": region}}
                )
                s3.create_bucket(Bucket=f"{PREFIX}-{region}", **where)
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def asset(tmp_path: Path) -> Path:
    directory = tmp_path / "asset"
    (directory / "ami_janitor").mkdir(parents=True)
    (directory / "ami_janitor" / "__init__.py").write_text("")
    (directory / "policy.json").write_text('{"regions": ["us-east-1"]}\n')
    return directory


def _recording_clients(calls: list[tuple[str, str, dict[str, Any]]]) -> Any:
    def make(region: str) -> Any:
        client = boto3.client("s3", region_name=region)

        def record(params: dict[str, Any], model: Any, **_: Any) -> None:
            calls.append((region, model.name, dict(params)))

        client.meta.events.register("provide-client-params.s3.*", record)
        return client

    return make


def _publish(asset: Path, calls: list[tuple[str, str, dict[str, Any]]]) -> list[Published]:
    return publish(
        regions=REGIONS,
        prefix=PREFIX,
        asset_dir=asset,
        asset_hash=ASSET_HASH,
        account=ACCOUNT,
        s3_client=_recording_clients(calls),
    )


def test_the_key_is_the_regional_stacks_asset_key() -> None:
    assert asset_object_key(ASSET_HASH) == KEY


def test_uploads_where_missing_and_skips_where_present(aws: None, asset: Path) -> None:
    boto3.client("s3", region_name="us-east-1").put_object(Bucket=f"{PREFIX}-us-east-1", Key=KEY, Body=b"zip")
    calls: list[tuple[str, str, dict[str, Any]]] = []

    published = _publish(asset, calls)

    body = zip_directory(asset)
    head = {"Key": KEY, "ExpectedBucketOwner": ACCOUNT}
    assert calls == [
        ("eu-west-1", "HeadObject", {"Bucket": f"{PREFIX}-eu-west-1", **head}),
        (
            "eu-west-1",
            "PutObject",
            {"Bucket": f"{PREFIX}-eu-west-1", **head, "Body": body, "ContentType": "application/zip"},
        ),
        ("us-east-1", "HeadObject", {"Bucket": f"{PREFIX}-us-east-1", **head}),
    ]
    assert published == [
        Published("eu-west-1", f"{PREFIX}-eu-west-1", KEY, uploaded=True),
        Published("us-east-1", f"{PREFIX}-us-east-1", KEY, uploaded=False),
    ]
    stored = boto3.client("s3", region_name="eu-west-1").get_object(Bucket=f"{PREFIX}-eu-west-1", Key=KEY)
    archive = zipfile.ZipFile(io.BytesIO(stored["Body"].read()))
    assert archive.namelist() == ["ami_janitor/__init__.py", "policy.json"]


def test_a_second_run_uploads_nothing(aws: None, asset: Path) -> None:
    _publish(asset, [])
    calls: list[tuple[str, str, dict[str, Any]]] = []
    published = _publish(asset, calls)
    assert [name for _, name, _ in calls] == ["HeadObject", "HeadObject"]
    assert not any(p.uploaded for p in published)


def test_a_missing_bucket_stops_the_run(aws: None, asset: Path) -> None:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match=r"NoSuchBucket|404|Not Found"):
        publish(
            regions=["us-west-2"],
            prefix=PREFIX,
            asset_dir=asset,
            asset_hash=ASSET_HASH,
            account=ACCOUNT,
            s3_client=lambda region: boto3.client("s3", region_name=region),
        )


def test_the_zip_is_the_same_for_the_same_directory(asset: Path) -> None:
    first = zip_directory(asset)
    os.utime(asset / "policy.json", (1_000_000_000, 1_000_000_000))
    assert zip_directory(asset) == first


def test_refuses_a_policy_without_organization(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AMI_JANITOR_CONFIG", str(TEST_POLICY))
    assert main([]) == 2
    assert "no `organization`" in capsys.readouterr().err


def test_loads_no_cdk() -> None:
    """A plain boto3 script: the CDK (and its Node process) is not started to upload a zip."""
    import subprocess
    import sys

    from synth_support import REPO_ROOT

    check = (
        "import sys, infra.publish_code; print(sorted(m for m in ('aws_cdk', 'jsii') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'lambdas'}:{REPO_ROOT}"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"
