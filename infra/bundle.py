"""Builds the Lambda code asset without Docker.

The asset is a plain directory: the dependencies installed for the Lambda platform (wheels only, so
nothing is compiled here), a copy of the `ami_janitor` package without `demo/` and the validated policy
as JSON.

Both steps are content-addressed under `build/`:
- `deps-<hash>/`: `pip install --target` keyed by requirements.txt and the platform, done once;
- `asset-<hash>/`: hard links to the dependencies plus the package and policy.json, keyed by the
  dependencies, the package sources and the policy, so an unchanged tree costs nothing.
Directories are built under a temporary name and renamed into place, so parallel synths (tests,
`cdk synth`) never see a half-built one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ami_janitor.core.policy import Policy
from infra.environment import POLICY_FILE_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = REPO_ROOT / "build"
REQUIREMENTS = REPO_ROOT / "requirements.txt"
PACKAGE_SOURCE = REPO_ROOT / "lambdas" / "ami_janitor"

# The Lambda platform: Python 3.13 on Graviton (arm64).
PYTHON_VERSION = "3.13"
PIP_PLATFORM = "manylinux2014_aarch64"
PIP_ARGS = (
    "--platform",
    PIP_PLATFORM,
    "--implementation",
    "cp",
    "--python-version",
    PYTHON_VERSION,
    "--only-binary=:all:",
)

# Subpackages the functions never run: the demo (it imports moto, a development dependency).
EXCLUDED = frozenset({"demo"})

_COMPLETE = ".complete"
_STALE_SECONDS = 3600  # other asset/deps directories older than this are removed


class BundleError(RuntimeError):
    """The dependencies could not be installed for the Lambda platform."""


def policy_json(policy: Policy) -> str:
    """The policy as the functions load it; `exclude_unset` keeps inherit-from-defaults intact."""
    return json.dumps(policy.model_dump(mode="json", exclude_unset=True), indent=2, sort_keys=True) + "\n"


def dependencies(*, requirements: Path = REQUIREMENTS, build_dir: Path = BUILD_DIR) -> Path:
    """The installed dependencies, reusing `build/deps-<hash>/` when requirements.txt is unchanged."""
    digest = hashlib.sha256()
    digest.update(requirements.read_bytes())
    digest.update("\0".join(PIP_ARGS).encode())
    target = build_dir / f"deps-{digest.hexdigest()[:16]}"
    if (target / _COMPLETE).exists():
        os.utime(target)  # in use: keep it out of reach of _prune in other processes
        return target
    build_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=build_dir))
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        *PIP_ARGS,
        "--requirement",
        str(requirements),
        "--target",
        str(staging),
        "--no-compile",  # the runtime compiles on first import; .pyc of this machine's Python are useless
        "--disable-pip-version-check",
        "--quiet",
    ]
    print(f"Installing Lambda dependencies ({PIP_PLATFORM}, Python {PYTHON_VERSION})...", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(f"pip install for the Lambda platform failed:\n{result.stdout}{result.stderr}")
    shutil.rmtree(staging / "bin", ignore_errors=True)  # console scripts are of no use in Lambda
    (staging / _COMPLETE).write_text(" ".join(command) + "\n", encoding="utf-8")
    _publish(staging, target)
    _prune(build_dir, "deps-", keep=target)
    return target


def code_asset(
    policy: Policy,
    *,
    requirements: Path = REQUIREMENTS,
    source: Path = PACKAGE_SOURCE,
    build_dir: Path = BUILD_DIR,
) -> tuple[Path, str]:
    """The asset directory and its content hash (used as the CDK asset hash, so CDK skips hashing 40 MB)."""
    deps = dependencies(requirements=requirements, build_dir=build_dir)
    document = policy_json(policy)
    digest = hashlib.sha256()
    digest.update(deps.name.encode())
    for path in _package_files(source):
        digest.update(str(path.relative_to(source)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    digest.update(document.encode())
    asset_hash = digest.hexdigest()
    target = build_dir / f"asset-{asset_hash[:20]}"
    if (target / _COMPLETE).exists():
        os.utime(target)
        return target, asset_hash
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=build_dir))
    shutil.copytree(
        deps,
        staging,
        copy_function=_link_or_copy,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns(_COMPLETE),
    )
    package = staging / source.name
    package.mkdir()
    for path in _package_files(source):
        destination = package / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
    (staging / POLICY_FILE_NAME).write_text(document, encoding="utf-8")
    (staging / _COMPLETE).write_text(asset_hash + "\n", encoding="utf-8")
    _publish(staging, target)
    _prune(build_dir, "asset-", keep=target)
    return target, asset_hash


def asset_object_key(asset_hash: str) -> str:
    """The object key CDK gives the code asset in the bootstrap bucket (`<sha256 of the custom hash>.zip`,
    as for any zipped directory asset): the StackSet's code buckets use the same key."""
    return hashlib.sha256(asset_hash.encode()).hexdigest() + ".zip"


def code_bucket_name(prefix: str, region: str) -> str:
    """The StackSet's code bucket of a region: the member template derives it from the region it is
    deployed in (`<organization.code_bucket_prefix>-<region>`)."""
    return f"{prefix}-{region}"


def _package_files(source: Path) -> list[Path]:
    return sorted(
        p
        for p in source.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix != ".pyc"
        and p.relative_to(source).parts[0] not in EXCLUDED
    )


def _link_or_copy(src: str, dst: str) -> None:
    # Hard links make a new asset directory nearly free; fall back to a copy across filesystems.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _publish(staging: Path, target: Path) -> None:
    try:
        staging.rename(target)
    except OSError:
        # Another process published the same content first: theirs is as good as ours.
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / _COMPLETE).exists():
            raise


def _prune(build_dir: Path, prefix: str, *, keep: Path) -> None:
    cutoff = time.time() - _STALE_SECONDS
    for path in build_dir.glob(f"{prefix}*"):
        if path != keep and path.is_dir() and path.stat().st_mtime < cutoff:
            shutil.rmtree(path, ignore_errors=True)
