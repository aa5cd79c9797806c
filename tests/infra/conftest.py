"""Fixtures of the infrastructure tests: app.py is synthesized once per test run, shared by all modules."""

from __future__ import annotations

import atexit
import functools
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
# The engine package of this checkout, the infra package, and this folder's helper module.
for _path in (_HERE.parents[1] / "lambdas", _HERE.parents[1], _HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from synth_support import ORG_POLICY, TEST_POLICY, Synth, run_app  # noqa: E402


@functools.cache
def _synthesized(policy: Path = TEST_POLICY) -> tuple[Synth, str | None]:
    # A synth takes seconds: every module reads the same cloud assembly (a failure is kept too).
    outdir = Path(tempfile.mkdtemp(prefix="ami-janitor-cdk-out-"))
    atexit.register(shutil.rmtree, outdir, ignore_errors=True)
    result = run_app(policy, outdir)
    failure = None if result.returncode == 0 else f"synth failed:\n{result.stdout}\n{result.stderr}"
    return Synth(outdir=outdir, stderr=result.stderr), failure


def _synth_of(policy: Path) -> Synth:
    synthesized, failure = _synthesized(policy)
    if failure:
        pytest.fail(failure)
    return synthesized


@pytest.fixture(scope="module")
def synth() -> Synth:
    return _synth_of(TEST_POLICY)


@pytest.fixture(scope="module")
def org_synth() -> Synth:
    """app.py with the organization's test policy: the regional stacks, the code buckets, the StackSet."""
    return _synth_of(ORG_POLICY)


@pytest.fixture(scope="module")
def infra_policy() -> Any:
    from ami_janitor.core.policy import load_policy

    return load_policy(TEST_POLICY)


@pytest.fixture(scope="module")
def org_policy() -> Any:
    from ami_janitor.core.policy import load_policy

    return load_policy(ORG_POLICY)
