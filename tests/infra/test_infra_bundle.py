"""The Lambda code asset: built without Docker, dependencies cached by requirements.txt hash."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from synth_support import Synth

from ami_janitor.core.policy import parse_policy
from infra import bundle

STACK = "AmiJanitor-us-east-1"
MOTO_IMPORT = re.compile(r"^\s*(?:import|from)\s+moto\b", re.M)
HANDLERS = ("ami_event", "bake", "replicate", "scheduled", "slices")

# Imports every handler with `ami_janitor` from the asset, the rest from this environment (the bundled
# dependencies are built for arm64), and moto unimportable.
IMPORT_HANDLERS = """
import importlib, sys
class NoMoto:
    def find_spec(self, name, path=None, target=None):
        if name == "moto" or name.startswith("moto."):
            raise ImportError(f"{name} is not in the Lambda asset")
sys.meta_path.insert(0, NoMoto())
shim, *modules = sys.argv[1:]
for module in modules:
    importlib.import_module(module)
loaded = sorted(m for m in sys.modules if m == "ami_janitor" or m.startswith("ami_janitor."))
assert all(sys.modules[m].__file__.startswith(shim) for m in loaded), loaded
assert not [m for m in loaded if m.startswith(("ami_janitor.demo", "ami_janitor.cli"))], loaded
print("\\n".join(loaded))
"""


def moto_imports(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*.py") if MOTO_IMPORT.search(p.read_text(errors="replace"))]


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


@pytest.fixture
def no_runtime_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests that fake pip build sources-only assets (no interpreter to compile with)."""
    monkeypatch.setattr(bundle, "runtime_python", lambda: None)


@pytest.mark.usefixtures("no_runtime_python")
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


@pytest.mark.usefixtures("no_runtime_python")
def test_package_copied_without_the_demo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, infra_policy: Any
) -> None:
    def fake_pip(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bundle.subprocess, "run", fake_pip)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("boto3==1.44.8\n")
    asset, _ = bundle.code_asset(infra_policy, requirements=requirements, build_dir=tmp_path / "build")
    package = asset / "ami_janitor"
    assert (package / "handlers" / "scheduled.py").is_file()
    assert not (package / "demo").exists()
    assert moto_imports(bundle.PACKAGE_SOURCE / "demo")  # what the exclusion keeps out
    assert moto_imports(asset) == []


@pytest.mark.usefixtures("no_runtime_python")
def test_failed_install_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(
        bundle.subprocess, "run", lambda command, **_: subprocess.CompletedProcess(command, 1, "", "no wheel")
    )
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("nothing-here==0\n")
    with pytest.raises(bundle.BundleError, match="no wheel"):
        bundle.dependencies(requirements=requirements, build_dir=tmp_path / "build")
    assert list((tmp_path / "build").iterdir()) == []


def test_the_runtime_python_is_of_the_runtimes_version(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = tmp_path / "python3.11"  # an interpreter of another version: refused
    other.write_text("#!/bin/sh\necho 3.11\n")
    other.chmod(0o755)
    monkeypatch.setenv(bundle.RUNTIME_PYTHON_VARIABLE, str(other))
    assert bundle.runtime_python() is None
    monkeypatch.setenv(bundle.RUNTIME_PYTHON_VARIABLE, "/nowhere/python3.13")
    assert bundle.runtime_python() is None
    monkeypatch.delenv(bundle.RUNTIME_PYTHON_VARIABLE)
    found = bundle.runtime_python()
    if found is not None:
        assert bundle._version_of(found) == "3.13"


def test_assets_with_and_without_bytecode_have_different_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, infra_policy: Any
) -> None:
    compiled: list[Path] = []

    def fake_run(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        if "compileall" in command:
            compiled.append(Path(command[-1]))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bundle.subprocess, "run", fake_run)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("boto3==1.44.8\n")
    build = tmp_path / "build"
    monkeypatch.setattr(bundle, "runtime_python", lambda: None)
    sources, _ = bundle.code_asset(infra_policy, requirements=requirements, build_dir=build)
    assert compiled == []
    monkeypatch.setattr(bundle, "runtime_python", lambda: "/opt/python3.13")
    with_bytecode, _ = bundle.code_asset(infra_policy, requirements=requirements, build_dir=build)
    assert with_bytecode != sources
    # The dependencies (in their staging directory) and then the package are compiled.
    assert [p.parent.name.startswith(".deps-") or p.name.startswith(".deps-") for p in compiled] == [
        True,
        False,
    ]
    assert compiled[1].name == "ami_janitor"


def test_a_failed_compile_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_run(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        code = 1 if "compileall" in command else 0
        return subprocess.CompletedProcess(command, code, "", "*** Error compiling 'broken.py'")

    monkeypatch.setattr(bundle.subprocess, "run", fake_run)
    monkeypatch.setattr(bundle, "runtime_python", lambda: "/opt/python3.13")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("boto3==1.44.8\n")
    with pytest.raises(bundle.BundleError, match=r"broken\.py"):
        bundle.dependencies(requirements=requirements, build_dir=tmp_path / "build")
    assert list((tmp_path / "build").iterdir()) == []


def _bytecode_flags(pyc: Path) -> int:
    return int.from_bytes(pyc.read_bytes()[4:8], "little")


@pytest.mark.slow
def test_staged_asset_contents(synth: Synth) -> None:
    asset = synth.code_asset_dir(STACK)
    assert (asset / "ami_janitor" / "__init__.py").is_file()
    handlers = {p.name for p in (asset / "ami_janitor" / "handlers").glob("*.py")}
    assert {"ami_event.py", "bake.py", "replicate.py", "scheduled.py", "slices.py"} <= handlers
    assert (asset / "policy.json").is_file()
    # Bytecode for the runtime's Python (unchecked hashes: flags 0b01) where an interpreter of that
    # version is here, of every module of the package and of the dependencies; else none at all.
    bytecode = list(asset.rglob("*.pyc"))
    if bundle.runtime_python() is None:
        assert bytecode == []
    else:
        assert bytecode and all(p.name.endswith(".cpython-313.pyc") for p in bytecode)
        assert {_bytecode_flags(p) for p in bytecode} == {1}
        for module in [*(asset / "ami_janitor").rglob("*.py"), asset / "botocore" / "client.py"]:
            assert (module.parent / "__pycache__" / f"{module.stem}.cpython-313.pyc").is_file(), module
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
    # Nothing the functions can load imports moto (a development dependency): the demo stays out.
    assert not (asset / "ami_janitor" / "demo").exists()
    assert moto_imports(asset) == []


@pytest.mark.slow
def test_handlers_import_from_the_asset_without_moto(synth: Synth, tmp_path: Path) -> None:
    asset = synth.code_asset_dir(STACK)
    (tmp_path / "ami_janitor").symlink_to(asset / "ami_janitor", target_is_directory=True)
    modules = [f"ami_janitor.handlers.{name}" for name in HANDLERS]
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_HANDLERS, str(tmp_path), *modules],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1", "AWS_DEFAULT_REGION": "us-east-1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert set(modules) <= set(done.stdout.split())
