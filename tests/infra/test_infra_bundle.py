"""The Lambda code asset: built without Docker, dependencies cached by requirements.txt hash."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from synth_support import Synth

from ami_janitor.core.policy import parse_policy
from infra import bundle

STACK = "AmiJanitor-us-east-1"


def test_policy_json_round_trip_keeps_inheritance(infra_policy: Any) -> None:
    shipped = parse_policy(json.loads(bundle.policy_json(infra_policy)))
    assert shipped == infra_policy
    family = shipped.family("base-linux")
    # Only disable_after_days is overridden: the other stages still come from `defaults`.
    lifecycle = shipped.rules_for(family).lifecycle
    assert (
        lifecycle.deprecate_after_days,
        lifecycle.disable_after_days,
        lifecycle.deregister_after_days,
    ) == (
        0,
        3,
        14,
    )


def test_dependencies_installed_for_lambda_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def fake_pip(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        Path(command[command.index("--target") + 1], "boto3").mkdir()
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bundle.subprocess, "run", fake_pip)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("boto3==1.44.8\n")
    first = bundle.dependencies(requirements=requirements, build_dir=tmp_path / "build")
    again = bundle.dependencies(requirements=requirements, build_dir=tmp_path / "build")
    assert first == again and len(calls) == 1  # the second synth only reuses the install
    assert (first / "boto3").is_dir()
    command = calls[0]
    for flag, value in (
        ("--platform", "manylinux2014_aarch64"),
        ("--implementation", "cp"),
        ("--python-version", "3.13"),
        ("--requirement", str(requirements)),
    ):
        assert command[command.index(flag) + 1] == value
    assert "--only-binary=:all:" in command
    # A changed requirements.txt is a new key.
    requirements.write_text("boto3==1.44.8\npydantic==2.14.4\n")
    changed = bundle.dependencies(requirements=requirements, build_dir=tmp_path / "build")
    assert changed != first and len(calls) == 2


def test_failed_install_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(
        bundle.subprocess, "run", lambda command, **_: subprocess.CompletedProcess(command, 1, "", "no wheel")
    )
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("nothing-here==0\n")
    with pytest.raises(bundle.BundleError, match="no wheel"):
        bundle.dependencies(requirements=requirements, build_dir=tmp_path / "build")
    assert list((tmp_path / "build").iterdir()) == []


@pytest.mark.slow
def test_staged_asset_contents(synth: Synth) -> None:
    asset = synth.code_asset_dir(STACK)
    assert (asset / "ami_janitor" / "__init__.py").is_file()
    handlers = {p.name for p in (asset / "ami_janitor" / "handlers").glob("*.py")}
    assert {"ami_event.py", "bake.py", "replicate.py", "scheduled.py"} <= handlers
    assert (asset / "policy.json").is_file()
    assert not list(asset.rglob("__pycache__"))
    # Built for the runtime: CPython 3.13 on arm64, boto3 at the pinned version.
    (extension,) = (asset / "pydantic_core").glob("_pydantic_core.*.so")
    assert "cpython-313-aarch64-linux-gnu" in extension.name
    pins = dict(
        line.split("==")
        for line in bundle.REQUIREMENTS.read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert (asset / f"boto3-{pins['boto3']}.dist-info").is_dir()
    assert (asset / f"botocore-{pins['botocore']}.dist-info").is_dir()
    assert (asset / "aws_lambda_powertools").is_dir()
