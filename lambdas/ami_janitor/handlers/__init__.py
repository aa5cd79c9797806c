"""The Lambda functions' entry points: each parses its event, calls one engine function and logs."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


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
