"""Pacing EC2 calls to the account's token buckets, on the client side.

EC2 throttles each account and region with token buckets (aws-facts.md, "Throttling"): a bucket holds
at most `size` tokens, gains `refill` tokens a second, and each call takes one, or is refused with
RequestLimitExceeded when the bucket is empty. A `Pacer` keeps the same buckets on the caller's side and
waits before a call until its bucket has a token, so a slice of work paced by it is never throttled as
long as nothing else draws on the account's buckets. Several workers sharing an account's buckets each
take a `share` of every bucket.

`pace(client, pacer)` makes every call of a boto3 EC2 client wait for its token first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from ami_janitor.core.model import Stage

NON_MUTATING = "non-mutating"  # DescribeImages and every other Describe* (and Get*) call
MUTATING = "mutating"  # the mutating calls without a bucket of their own

# EC2's buckets per account and region: bucket -> (size, refill per second).
SIZES: Mapping[str, tuple[int, float]] = {
    NON_MUTATING: (100, 20.0),
    "DeregisterImage": (100, 5.0),
    "DeleteSnapshot": (100, 5.0),
    "ModifyImageAttribute": (100, 5.0),
    "CreateTags": (100, 10.0),
    "CopyImage": (100, 1.0),
    MUTATING: (50, 5.0),
}

# The bucket each EC2 call the janitor makes draws on. APIs naming the same bucket share its tokens.
BUCKET_NAMES: Mapping[str, str] = {
    "DescribeImages": NON_MUTATING,
    "DescribeSnapshots": NON_MUTATING,
    "DescribeImageAttribute": NON_MUTATING,
    "DescribeImageReferences": NON_MUTATING,
    "DescribeInstances": NON_MUTATING,
    "DescribeLaunchTemplates": NON_MUTATING,
    "DescribeLaunchTemplateVersions": NON_MUTATING,
    "GetImageBlockPublicAccessState": NON_MUTATING,
    "DeregisterImage": "DeregisterImage",
    "DeleteSnapshot": "DeleteSnapshot",
    "ModifyImageAttribute": "ModifyImageAttribute",
    "CreateTags": "CreateTags",
    "DeleteTags": "CreateTags",
    "CopyImage": "CopyImage",
    "EnableImageDeprecation": MUTATING,
    "DisableImageDeprecation": MUTATING,
    "DisableImage": MUTATING,
    "EnableImage": MUTATING,
    "CreateImage": MUTATING,
    "RegisterImage": MUTATING,
}

# EC2 API name -> (bucket size, refill per second).
BUCKETS: Mapping[str, tuple[int, float]] = {api: SIZES[name] for api, name in BUCKET_NAMES.items()}


def bucket_name(api: str) -> str:
    """The bucket an EC2 call draws on: its own entry, else any Describe*/Get* call is non-mutating and
    any other call is mutating."""
    if api in BUCKET_NAMES:
        return BUCKET_NAMES[api]
    return NON_MUTATING if api.startswith(("Describe", "Get")) else MUTATING


def bucket_of(api: str) -> tuple[int, float]:
    """(size, refill per second) of the bucket an EC2 call draws on."""
    return SIZES[bucket_name(api)]


# Paced AMIs per second of each stage: the refill of its EC2 call's token bucket (a run cuts its due
# stages into slices by it, the slice worker paces them at it).
STAGE_REFILL: Mapping[Stage, float] = {
    "deprecate": bucket_of("EnableImageDeprecation")[1],
    "disable": bucket_of("DisableImage")[1],
    "deregister": bucket_of("DeregisterImage")[1],
}


class _Bucket:
    __slots__ = ("capacity", "refill", "tokens", "updated")

    def __init__(self, capacity: float, refill: float, tokens: float, updated: float) -> None:
        self.capacity = capacity
        self.refill = refill
        self.tokens = tokens
        self.updated = updated

    def take(self, now: float) -> float:
        """Takes a token, on credit if there is none yet; returns how long until that token is there.
        A bucket in debt refills its debt first, so callers are served in the order they came."""
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.refill)
            self.updated = now
        self.tokens -= 1
        return -self.tokens / self.refill if self.tokens < 0 else 0.0


class Pacer:
    """Client-side token buckets, one per EC2 bucket (`bucket_name`), each holding `share` of the
    account's size and refill, full at first use (or empty: `full=False`). Thread-safe: a waiting caller holds no lock, and the
    callers of one bucket get their tokens in the order they asked. A bucket holds at least one token,
    whatever the share."""

    def __init__(
        self,
        share: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        full: bool = True,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], not {share}")
        self.share = share
        self.clock = clock
        self.sleep = sleep
        # Empty at first: a process that cannot know what the account spent just before (the previous
        # slice, say) claims no burst, only the refill.
        self.full = full
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def limits(self, api: str) -> tuple[float, float]:
        """(size, refill per second) of this pacer's bucket for an EC2 call."""
        size, refill = bucket_of(api)
        return max(1.0, size * self.share), refill * self.share

    def acquire(self, api: str) -> float:
        """Waits until the bucket of `api` has a token and takes it; returns the seconds waited."""
        with self._lock:
            now = self.clock()
            name = bucket_name(api)
            bucket = self._buckets.get(name)
            if bucket is None:
                capacity, refill = self.limits(api)
                bucket = self._buckets[name] = _Bucket(capacity, refill, capacity if self.full else 0.0, now)
            wait = bucket.take(now)
        if wait > 0:
            self.sleep(wait)
        return wait


class _Events(Protocol):
    def register_first(self, event_name: str, handler: Callable[..., Any], unique_id: str) -> None: ...


class _Meta(Protocol):
    @property
    def events(self) -> _Events: ...


class _Client(Protocol):
    @property
    def meta(self) -> _Meta: ...


ClientT = TypeVar("ClientT", bound=_Client)


def pace(client: ClientT, pacer: Pacer) -> ClientT:
    """Every EC2 call of `client` (a boto3 client, or anything with botocore's `meta.events`) first
    takes a token of `pacer` for its operation. Once per call, as botocore emits before-call once per
    call: the SDK's own retries of a call are not paced again. Pacing the same client twice with the
    same pacer paces it once.

    The handler listens to every before-call event and goes first: a handler that answers a call itself
    (botocore's Stubber) is listened for on before-call.*.*, which botocore runs before a handler on
    before-call.ec2; it only paces EC2's calls."""

    def handler(event_name: str = "", model: Any = None, **_: Any) -> None:
        if model is not None and event_name.startswith("before-call.ec2."):
            pacer.acquire(model.name)
        # None: the call goes on (a handler's answer would stand in for EC2's)

    client.meta.events.register_first("before-call.*.*", handler, unique_id=f"ami-janitor-pace-{id(pacer)}")
    return client
