"""The import-linter contracts of pyproject.toml (`make lint`): kept by the tree, and broken, naming the
contract and the import, by a copy of the package with one forbidden import added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "lambdas" / "ami_janitor"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports with the contracts of this repository on the `ami_janitor` found in `path`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(path)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(REPO / "pyproject.toml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    done = lint_imports(PACKAGE.parent, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract", "chain"),
    [
        (
            "core/tags.py",
            "import boto3",
            "core is pure: no AWS SDK, no Powertools, no outer layer BROKEN",
            "ami_janitor.core.tags -> boto3",
        ),
        (
            "aws/errors.py",
            "from ami_janitor import engine",
            "cli | handlers above engine above aws above core BROKEN",
            "ami_janitor.aws.errors -> ami_janitor.engine",
        ),
        (
            "engine.py",
            "from ami_janitor.demo import story",
            "nothing the functions run imports the demo (it imports moto) BROKEN",
            "ami_janitor.engine -> ami_janitor.demo.story",
        ),
        (
            "handlers/scheduled.py",
            "from ami_janitor import roles",
            "nothing the functions run imports roles (it imports every module) BROKEN",
            "ami_janitor.handlers.scheduled -> ami_janitor.roles",
        ),
    ],
    ids=["core-imports-boto3", "aws-imports-engine", "engine-imports-demo", "handler-imports-roles"],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str, chain: str
) -> None:
    copy = tmp_path / "lambdas"
    shutil.copytree(PACKAGE, copy / "ami_janitor", ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "ami_janitor" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    done = lint_imports(copy, tmp_path)
    assert done.returncode != 0, done.stdout
    assert contract in done.stdout
    assert chain in done.stdout
