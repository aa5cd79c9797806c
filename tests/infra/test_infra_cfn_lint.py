"""cfn-lint on every synthesized template: no error, and only the warnings .cfnlintrc.yaml explains."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from synth_support import REPO_ROOT, Synth

pytestmark = pytest.mark.slow  # synthesizes the stacks (or reads their synthesized templates)


def _cfn_lint() -> str:
    beside = Path(sys.executable).with_name("cfn-lint")
    found = str(beside) if beside.exists() else shutil.which("cfn-lint")
    assert found, "cfn-lint is not installed"
    return found


def test_cfn_lint_clean(synth: Synth) -> None:
    templates = [str(synth.outdir / f"{name}.template.json") for name in synth.stack_names()]
    regions = [name.removeprefix("AmiJanitor-") for name in synth.stack_names()]
    # Run from the repository root so .cfnlintrc.yaml applies (ignored checks, each with a reason).
    result = subprocess.run(
        [_cfn_lint(), *templates, "--regions", *regions],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
