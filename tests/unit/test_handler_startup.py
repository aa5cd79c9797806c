"""The handler modules load quickly: the cyclic collector paused (and left as found), on a stack that does
not map and unmap CPython's frame chunks whatever depth they are imported at, no boto3, annotations
evaluated where models are made."""

from __future__ import annotations
import __future__

import gc
import importlib
import os
import pkgutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from pydantic import BaseModel

from ami_janitor.handlers import collector_paused, imported_on_a_wide_stack, loading

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


# The page faults of a handler module's import, made `depth` calls down (the Lambda runtime imports it
# at a depth of its own). A frame chunk mapped and unmapped over and over faults in a fresh page each
# time: 550-1,750 more faults at some depths than at others, before the imports went on a wide stack.
FAULTS_AT_DEPTH = """
import importlib, resource, sys
def down(depth):
    if depth:
        return down(depth - 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    importlib.import_module(sys.argv[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(down(int(sys.argv[2])))
"""


def _import_faults(module: str, depth: int) -> int:
    env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1", "PYTHONHASHSEED": "0"}
    answer = subprocess.run(
        [sys.executable, "-c", FAULTS_AT_DEPTH, module, str(depth)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(answer.stdout)


@pytest.mark.parametrize("module", HANDLER_MODULES)
def test_a_handler_imports_alike_at_any_depth(module: str) -> None:
    faults = [_import_faults(f"ami_janitor.handlers.{module}", depth) for depth in (0, 8, 16, 40)]
    # A few pages either way (the deeper calls' own frames; where the allocator's arenas fall).
    assert max(faults) - min(faults) < 300, faults


# A recursion that goes up and down across the edge of CPython's first 16 KiB frame chunk: called at
# every depth from 0 to 399 in turn (some 30 KiB of frames), some depth puts the edge inside it.
ACROSS_A_CHUNK_EDGE = """
import resource, sys
from ami_janitor.handlers import _on_a_wide_stack
def leaf():
    return None
def down(depth):
    if depth:
        return down(depth - 1)
    for _ in range(1000):
        leaf()
def every_depth(_):
    for depth in range(400):
        down(depth)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
_on_a_wide_stack(every_depth, None) if sys.argv[1] == "wide" else every_depth(None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_on_a_wide_stack_no_frame_chunk_is_mapped_again_and_again() -> None:
    faults = {
        stack: int(
            subprocess.run(
                [sys.executable, "-c", ACROSS_A_CHUNK_EDGE, stack], capture_output=True, text=True, check=True
            ).stdout
        )
        for stack in ("plain", "wide")
    }
    # The chunk past the edge is mapped for each of the 1,000 calls, at one depth or two.
    assert faults["plain"] > 900, faults
    assert faults["wide"] < 50, faults


@pytest.mark.usefixtures("collector_state")
def test_loading_imports_its_modules_first_with_the_collector_paused() -> None:
    gc.enable()
    sys.modules.pop("ami_janitor.core.globs", None)
    with loading("ami_janitor.core.globs"):
        assert "ami_janitor.core.globs" in sys.modules
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_module_imported_on_a_wide_stack_that_fails_raises() -> None:
    with pytest.raises(ImportError):
        imported_on_a_wide_stack("ami_janitor.handlers.no_such_handler")


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


def _function_modules() -> list[str]:
    """The modules the functions import: the handlers, the engine, `aws` and `core`."""
    import ami_janitor.aws
    import ami_janitor.core
    import ami_janitor.handlers

    names = ["ami_janitor.engine"]
    for package in (ami_janitor.aws, ami_janitor.core, ami_janitor.handlers):
        names += [found.name for found in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(names)


@pytest.mark.parametrize("name", _function_modules())
def test_a_module_that_defines_models_evaluates_its_annotations(name: str) -> None:
    """With `from __future__ import annotations` each field of a pydantic model or a NamedTuple is a
    string, which pydantic (and typing, for a NamedTuple) compiles and evaluates when the class is
    made: some 200 of them were 23 million instructions of each cold start."""
    module = importlib.import_module(name)
    records = [
        value.__name__
        for value in vars(module).values()
        if isinstance(value, type)
        and value.__module__ == name
        and (issubclass(value, BaseModel) or (issubclass(value, tuple) and hasattr(value, "_fields")))
    ]
    if records:
        assert getattr(module, "annotations", None) is not __future__.annotations, records
