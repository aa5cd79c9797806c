"""Builds the Lambda code asset without Docker.

The asset is a plain directory: the dependencies installed for the Lambda platform (wheels only, so
nothing native is compiled here), a copy of the `ami_janitor` package without `demo/` and the validated
policy as JSON; with the bytecode of both for the runtime's Python when an interpreter of that version
is found here (`runtime_python`).

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

# An interpreter of the runtime's version to compile the asset's bytecode with (else found on PATH or
# under pyenv).
RUNTIME_PYTHON_VARIABLE = "AMI_JANITOR_RUNTIME_PYTHON"

_COMPLETE = ".complete"
_STALE_SECONDS = 3600  # other asset/deps directories older than this are removed


class BundleError(RuntimeError):
    """The dependencies could not be installed for the Lambda platform."""


def policy_json(policy: Policy) -> str:
    """The policy as the functions load it; `exclude_unset` keeps inherit-from-defaults intact."""
    return json.dumps(policy.model_dump(mode="json", exclude_unset=True), indent=2, sort_keys=True) + "\n"


def runtime_python() -> str | None:
    """An interpreter of the functions' Python (PYTHON_VERSION) to compile the asset with:
    $AMI_JANITOR_RUNTIME_PYTHON, else python3.13 on PATH, else pyenv's newest 3.13; None where there is
    none (the asset then ships its sources alone)."""
    named = os.environ.get(RUNTIME_PYTHON_VARIABLE)
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(pyenv.glob(f"{PYTHON_VERSION}.*/bin/python{PYTHON_VERSION}"), reverse=True)
    candidates = [named] if named else [shutil.which(f"python{PYTHON_VERSION}"), *map(str, found)]
    for candidate in candidates:
        if candidate and _version_of(candidate) == PYTHON_VERSION:
            return candidate
    return None


def _version_of(python: str) -> str | None:
    try:
        answer = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return answer.stdout.strip() if answer.returncode == 0 else None


def _compile(python: str | None, directory: Path, *, staging: Path) -> None:
    """The bytecode of every module under `directory`, for the runtime. Lambda's /var/task is read-only:
    without it, each cold start compiles every module it imports (boto3 and Powertools alone take
    0.56 s from their sources and 0.17 s from bytecode with Python 3.13 on this machine). Unchecked
    hashes: the asset never changes under its bytecode, and a zip's timestamps mean nothing. On failure
    `staging` (the directory being built) is removed."""
    if python is None:
        return
    command = [python, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash"]
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(
            f"compiling {directory} for Python {PYTHON_VERSION} failed:\n{result.stdout}{result.stderr}"
        )


def _compiled_with(python: str | None) -> bytes:
    """What the bytecode part of an asset's key says: the runtime's version, or none."""
    return f"bytecode {PYTHON_VERSION}".encode() if python else b"sources only"


def dependencies(*, requirements: Path = REQUIREMENTS, build_dir: Path = BUILD_DIR) -> Path:
    """The installed dependencies, reusing `build/deps-<hash>/` when requirements.txt is unchanged."""
    return _dependencies(requirements, build_dir, runtime_python())


def _dependencies(requirements: Path, build_dir: Path, python: str | None) -> Path:
    digest = hashlib.sha256()
    digest.update(requirements.read_bytes())
    digest.update("\0".join(PIP_ARGS).encode())
    digest.update(_compiled_with(python))
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
        "--no-compile",  # bytecode of this machine's Python is of no use there: _compile makes the runtime's
        "--disable-pip-version-check",
        "--quiet",
    ]
    print(f"Installing Lambda dependencies ({PIP_PLATFORM}, Python {PYTHON_VERSION})...", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(f"pip install for the Lambda platform failed:\n{result.stdout}{result.stderr}")
    shutil.rmtree(staging / "bin", ignore_errors=True)  # console scripts are of no use in Lambda
    _compile(python, staging, staging=staging)
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
    python = runtime_python()
    deps = _dependencies(requirements, build_dir, python)  # its name keys the bytecode too
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
    _compile(python, package, staging=staging)
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
