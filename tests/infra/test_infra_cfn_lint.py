"""cfn-lint on every synthesized template: no error, and only the warnings .cfnlintrc.yaml explains."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from synth_support import REPO_ROOT, Synth

from ami_janitor.core.policy import Policy

pytestmark = pytest.mark.slow  # synthesizes the stacks (or reads their synthesized templates)


def _cfn_lint() -> str:
    beside = Path(sys.executable).with_name("cfn-lint")
    found = str(beside) if beside.exists() else shutil.which("cfn-lint")
    assert found, "cfn-lint is not installed"
    return found


def _lint(templates: list[Path], regions: list[str]) -> subprocess.CompletedProcess[str]:
    # Run from the repository root so .cfnlintrc.yaml applies (ignored checks, each with a reason).
    return subprocess.run(
        [_cfn_lint(), *map(str, templates), "--regions", *regions],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cfn_lint_clean(synth: Synth) -> None:
    templates = [synth.outdir / f"{name}.template.json" for name in synth.stack_names()]
    regions = [name.removeprefix("AmiJanitor-") for name in synth.stack_names()]
    result = _lint(templates, regions)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_clean_for_an_organization(org_synth: Synth, org_policy: Policy) -> None:
    """The StackSet's stack, the code buckets, the regional stacks with the inbox, and the member
    template linted for every region it is deployed in (its conditions included)."""
    templates = [org_synth.outdir / f"{name}.template.json" for name in org_synth.stack_names()]
    member = org_synth.stack_set_templates()
    assert len(member) == 1
    result = _lint([*templates, *member], list(org_policy.managed_regions))
    assert result.returncode == 0, result.stdout + result.stderr
