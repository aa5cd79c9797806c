"""The handler modules load with the cyclic collector paused, and leave it as they found it."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ami_janitor.handlers import collector_paused

HANDLER_MODULES = ["scheduled", "slices", "ami_event", "bake", "replicate"]


@pytest.fixture
def collector_state() -> Iterator[None]:
    """Each test leaves the collector as it was (enabled or not, nothing frozen by it)."""
    was_enabled = gc.isenabled()
    yield
    gc.unfreeze()
    if was_enabled:
        gc.enable()
    else:
        gc.disable()


@pytest.mark.parametrize("module", HANDLER_MODULES)
def test_a_cold_import_freezes_what_it_made_and_resumes_the_collector(module: str) -> None:
    code = (
        "import gc\n"
        "before = gc.get_freeze_count()\n"
        f"import ami_janitor.handlers.{module}\n"
        "print(gc.isenabled(), before, gc.get_freeze_count())\n"
    )
    env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1"}
    answer = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    enabled, before, frozen = answer.stdout.split()
    assert enabled == "True"
    assert int(before) == 0
    # boto3, pydantic, Powertools and the package: tens of thousands of objects out of the collector's reach.
    assert int(frozen) > 20_000


@pytest.mark.usefixtures("collector_state")
def test_the_collector_is_paused_inside_and_resumed_after() -> None:
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
        kept = [object() for _ in range(10)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(kept)


@pytest.mark.usefixtures("collector_state")
def test_a_collector_disabled_before_stays_disabled() -> None:
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


@pytest.mark.usefixtures("collector_state")
def test_a_failed_import_resumes_the_collector() -> None:
    gc.enable()
    with pytest.raises(ImportError), collector_paused():
        import ami_janitor.handlers.no_such_handler  # noqa: F401
    assert gc.isenabled()


@pytest.mark.parametrize("module", HANDLER_MODULES)
def test_a_function_never_imports_boto3(module: str) -> None:
    """Its clients come from botocore sessions: boto3's import was about a twentieth of a cold start."""
    code = (
        "import pkgutil, sys, importlib\n"
        f"import ami_janitor.handlers.{module}\n"
        "import ami_janitor.aws, ami_janitor.core\n"
        "for package in (ami_janitor.aws, ami_janitor.core):\n"
        "    for found in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(found.name)\n"
        "from ami_janitor.aws.clients import ClientFactory\n"
        "clients = ClientFactory()('us-east-1')\n"
        "clients.ec2, clients.dynamodb\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('boto3', 's3transfer')))\n"
    )
    env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1"}
    answer = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert answer.stdout.strip() == "[]"
