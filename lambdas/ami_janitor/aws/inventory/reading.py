"""How every source reads AWS: each list at its API's largest page size, and any failure or malformed
answer turned into one SourceFailed that names the source (the whole region is then skipped)."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, UnknownEndpointError
from botocore.parsers import ResponseParserError

from ami_janitor.aws.errors import error_code

if TYPE_CHECKING:
    from botocore.client import BaseClient

    from ami_janitor.aws.clients import RegionClients

Raw = Mapping[str, Any]
T = TypeVar("T")

_MALFORMED: tuple[type[Exception], ...] = (KeyError, TypeError, ValueError)
# How AWS says an operation does not exist here: EC2 (query protocol) answers InvalidAction or
# UnsupportedOperation, JSON and REST-JSON services UnknownOperationException. Only these make an
# optional source absent; a 5xx, an HTML page, a parse error or a bare status code is a failure.
_UNSUPPORTED_OPERATION_CODES = frozenset(
    {"InvalidAction", "UnsupportedOperation", "UnknownOperationException"}
)
# A client that cannot reach the service's endpoint at all: the partition has no such service.
_MISSING_ENDPOINT: tuple[type[Exception], ...] = (EndpointConnectionError, UnknownEndpointError)


class SourceFailed(Exception):
    """A source could not be read; its text is the inventory error '<source>: <code>: <message>'."""

    def __init__(self, source: str, code: str, message: str, *, unavailable: bool = False) -> None:
        super().__init__(f"{source}: {code}: {message}")
        self.unavailable = unavailable


def _short(text: str) -> str:
    # Emulator failures carry whole HTML pages; one line is enough for a plan.
    return " ".join(text.split())[:300]


def _is_unsupported_operation(error: Exception) -> bool:
    """AWS answered, explicitly, that the operation is not offered here (an older partition)."""
    return isinstance(error, ClientError) and error_code(error) in _UNSUPPORTED_OPERATION_CODES


@contextmanager
def source(name: str) -> Iterator[None]:
    """Turns any AWS failure or malformed answer while reading `name` into one SourceFailed."""
    try:
        yield
    except ClientError as error:
        message = str(error.response.get("Error", {}).get("Message") or error)
        raise SourceFailed(
            name,
            error_code(error) or "Unknown",
            _short(message),
            unavailable=_is_unsupported_operation(error),
        ) from error
    except (BotoCoreError, ResponseParserError, NotImplementedError) as error:
        raise SourceFailed(name, type(error).__name__, _short(str(error))) from error
    except _MALFORMED as error:
        raise SourceFailed(name, "MalformedResponse", _short(f"{type(error).__name__}: {error}")) from error


@contextmanager
def ahead(clients: RegionClients, read: Callable[[], T]) -> Iterator[Callable[[], T]]:
    """`read` started now, on a thread of its own, while the caller reads its other sources: their calls
    wait on the network side by side. Its answer (or its SourceFailed) comes where the caller asks for
    it, so the first source to fail in the recipe's order still names the region's error. With one read
    worker (a Stubber expects its calls in order) `read` runs where it is asked for."""
    if clients.read_workers <= 1:
        yield read
        return
    with ThreadPoolExecutor(max_workers=1) as pool:  # waited for, even when another source fails
        yield pool.submit(read).result


def clients_first(clients: RegionClients, *services: str) -> None:
    """The clients of reads about to go side by side (`ahead`), made here one after the other before
    they start: made on the reading threads, their making (CPU work, under the session's lock) contends
    with the other threads' calls (2-3.5 ms of a cold start's 220 on 2 cores), where the threads then
    only wait on the network side by side. A client that cannot be made is left to its reader, which
    meets the same error and names its source, as before."""
    for service in services:
        with suppress(Exception):
            clients.client(service)


def host_not_found(error: BaseException) -> bool:
    """The service's host does not exist here (its name does not resolve: EAI_NONAME), as in a region
    without the service. A DNS that could not answer (EAI_AGAIN), or any other failure, is not that
    (unlike `endpoint_may_lack` below, which takes any failure to connect for a missing endpoint)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return seen.errno == socket.EAI_NONAME
        seen = seen.__cause__ or seen.__context__
    return False


def optional(name: str, load: Callable[[], T], *, endpoint_may_lack: bool = False) -> T | None:
    """A source that may not exist here: None on an explicit unsupported-operation answer (or, where
    the service may lack an endpoint, on no endpoint); any other failure raises SourceFailed."""
    try:
        with source(name):
            return load()
    except SourceFailed as failure:
        missing_endpoint = endpoint_may_lack and isinstance(failure.__cause__, _MISSING_ENDPOINT)
        if not (failure.unavailable or missing_endpoint):
            raise
        return None


def items(
    client: Any, operation: str, key: str, page_size: int | None = None, **params: Any
) -> Iterator[Raw]:
    """Every item of a paginated answer, at `page_size` per call (None: the API has no page size)."""
    config = {"PageSize": page_size} if page_size else {}
    for page in client.get_paginator(operation).paginate(**params, PaginationConfig=config):
        yield from page.get(key) or []


def chunks(values: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


def tag(raw: Raw, key: str) -> str | None:
    """The value of a resource's tag `key`, or None when it has no such tag."""
    for pair in raw.get("Tags") or []:
        if pair.get("Key") == key:
            return str(pair.get("Value") or "")
    return None


def count_calls(*clients: BaseClient) -> Counter[str]:
    """Counts the API calls the clients make from now on, keyed like IAM actions ('ec2:DescribeImages')."""
    counter: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        counter[f"{model.service_model.signing_name}:{model.name}"] += 1

    for client in clients:
        # First, so that a Stubber (which answers at before-call and stops the chain) cannot hide a call.
        client.meta.events.register_first("before-call.*.*", count)
    return counter
