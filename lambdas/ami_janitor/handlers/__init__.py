"""The Lambda functions' entry points: each parses its event, calls one engine function and logs."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import import_module
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def collector_paused() -> Iterator[None]:
    """Around a handler module's imports, the cold start's largest part.

    They make some 100,000 objects (boto3, pydantic, Powertools, the package's models), nearly all
    kept for the life of the process. Meanwhile CPython's cyclic collector runs again and again, each
    full pass walking every object made so far and freeing almost nothing: a tenth or more of the
    cold start (`python bench/bench.py cold-start`). So the collector is paused while they load;
    then what they made is moved out of its reach (`gc.freeze`), so that the invocations' own
    collections skip it too."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


# What every handler imports first: the engine (botocore, pydantic and the package's models with it),
# the events' models, and Powertools' Logger and Metrics.
HANDLER_MODULES = ("ami_janitor.engine", "ami_janitor.handlers.events", "ami_janitor.handlers.observe")
# And the SQS workers: Powertools' batch processors and its SQS record models.
SQS_WORKER_MODULES = (
    "aws_lambda_powertools.utilities.batch",
    "aws_lambda_powertools.utilities.parser.models",
)


@contextmanager
def loading(*modules: str) -> Iterator[None]:
    """Around a handler module's imports: the collector paused (collector_paused), and HANDLER_MODULES
    then `modules`, the ones that bring in the libraries and the package's models, imported first on a
    wide stack (imported_on_a_wide_stack). The imports inside then find them loaded."""
    with collector_paused():
        imported_on_a_wide_stack(*HANDLER_MODULES, *modules)
        yield


# CPython keeps its frames in 16 KiB chunks and gives a chunk back to the system (munmap) as soon as
# its first frame returns. Work that recurses up and down across a chunk's edge (the regular
# expressions compiled as urllib3 loads, pydantic making a model's schema) maps and unmaps a chunk
# each time: each round trip costs a page fault and two system calls, some 10-15 us. Where the edge
# falls depends on how deep the import starts, which the Lambda runtime decides: a handler's import
# made 570 to 2,500 such round trips depending on its depth (strace), 6 to 25 ms of a cold start.
# A frame that declares more stack than a 16 KiB chunk holds is given a chunk of its own, sized to
# twice its needs (256 KiB here): the frames called from it fit in the 128 KiB it leaves free, and
# that chunk is given back once, when the call returns. The declared stack is never written to, so
# its pages are not touched.
_WIDE_STACK_SLOTS = 16_700


def _on_a_wide_stack(work: Callable[[T], None], argument: T) -> None:
    work(argument)


_on_a_wide_stack.__code__ = _on_a_wide_stack.__code__.replace(
    co_stacksize=_on_a_wide_stack.__code__.co_stacksize + _WIDE_STACK_SLOTS
)


def imported_on_a_wide_stack(*modules: str) -> None:
    """`modules` imported in order, from a frame whose chunk has room for all their frames."""
    _on_a_wide_stack(_import_each, modules)


def _import_each(modules: tuple[str, ...]) -> None:
    for name in modules:
        import_module(name)
