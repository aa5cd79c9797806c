"""An in-memory EC2 for property tests of the executor: exactly the calls executor.py makes, with EC2's
semantics as design.md and aws-facts.md describe them, and nothing else.

Fast enough for thousands of plan + apply rounds (no HTTP, no moto). Every request is checked against
botocore's EC2 model, so a misspelt parameter or a wrong type fails like it would against AWS. Errors are
botocore ClientErrors with EC2's codes. A slice's reads (aws/slicer.py) are answered too: DescribeImages
by filter, DescribeImageReferences from `references`, DescribeInstances, each paged by botocore's own
paginator (`get_paginator`), and the ledger items of a few AMIs through `dynamodb` (DescribeTable,
BatchGetItem against botocore's DynamoDB model). So is what a scheduled run's inventory reads of EC2
(tests/fake_aws.py has the other services): DescribeInstances with each instance reference's ImageId,
DescribeLaunchTemplates and DescribeLaunchTemplateVersions from the launch-template references (one
version each), no Spot Fleet nor EC2 Fleet, image block public access on, DescribeSnapshots by tag-key,
and the whole ledger by Scan.

Simulated time: `clock` is what EC2 compares DeprecateAt with; tests set it to the run's `now`. It moves
on by `latency` seconds with each call (EC2 calls and ledger writes), and by the waits of a pacer made
with `pacer()`; `elapsed` counts those simulated seconds from 0, whatever a test sets `clock` to.
Throttling: with `throttle` (tests/fake_throttle.py), every EC2 call takes a token of the account's
bucket for its API, on `elapsed`, or fails with RequestLimitExceeded before it takes effect. A client-side
pacer runs before each EC2 call as `before_call(api)` (what `pace` does for a boto3 client).
Faults: `fail_rate` (a call fails with a ClientError, before or after it took effect, like a throttle or a
lost response; or its answer is lost after it took effect and the SDK sends it again, so the caller gets
the retry's answer) and `crash_rate` (the process dies mid-run: `Crash` is no botocore error, so the
executor does not catch it); or `faults`, which picks the mutating calls that fail by their number.
Ledger writes are mutating calls too, with the same faults.
"""

from __future__ import annotations

import copy
import functools
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from types import SimpleNamespace
from typing import Any, Literal, TypeVar

import botocore.session
from boto3.dynamodb.types import TypeSerializer
from botocore.exceptions import ClientError
from botocore.model import ServiceModel
from botocore.paginate import Paginator
from botocore.validate import ParamValidator

import dynamodb_expressions
from ami_janitor.aws.ledger import ADOPTION_KEY, STAGES, WRITE_ID_ATTRIBUTE, Ledger, Prior, Written
from ami_janitor.aws.ledger import _item as read_ledger_item
from ami_janitor.aws.ledger import key as ledger_key
from ami_janitor.aws.pacing import Pacer
from ami_janitor.core.model import (
    Image,
    LaunchPermission,
    LedgerCopy,
    LedgerItem,
    LedgerSnapshot,
    LedgerView,
    Reference,
    RegionInventory,
    RetiredSnapshot,
    Stage,
    iso,
    with_ledger,
)
from ami_janitor.core.policy import RETIRED_FROM_TAG
from fake_throttle import AccountBuckets

MUTATING = frozenset(
    {
        "ledger_adopt",
        "ledger_record_adoption",
        "ledger_record_candidate",
        "ledger_record_stage",
        "ledger_confirm_stage",
        "ledger_confirm_deregistered",
        "ledger_close",
        "ledger_update_item",  # aws/ledger.Ledger's write through the fake DynamoDB
        "create_tags",
        "delete_tags",
        "enable_image_deprecation",
        "disable_image_deprecation",
        "disable_image",
        "enable_image",
        "deregister_image",
        "delete_snapshot",
        "modify_image_attribute",
    }
)
TAG_KEY_MAX = 128
TAG_VALUE_MAX = 256
TAGS_PER_RESOURCE_MAX = 50
DEPRECATION_HORIZON = timedelta(days=3653)  # DeprecateAt: at most 10 years ahead


class Crash(Exception):
    """The process running the janitor died in the middle of a call."""


class _AnswerLost(Exception):
    """The call took effect and its answer was lost: the SDK sends it again (caught by `_sdk_retry`)."""


Method = TypeVar("Method", bound=Callable[..., Any])


def _sdk_retry(method: Method) -> Method:
    """What botocore does with a lost answer: the same request again, whose answer the caller gets."""

    @functools.wraps(method)
    def call(self: FakeEC2, *args: Any, **params: Any) -> Any:
        self.retrying = False
        while True:
            try:
                return method(self, *args, **params)
            except _AnswerLost:
                self.retrying = True
            except ClientError as error:
                if self.retrying:  # botocore counts the retries in the error's answer too
                    error.response.setdefault("ResponseMetadata", {})["RetryAttempts"] = 1
                raise

    return call  # type: ignore[return-value]


@cache
def _ec2_model() -> ServiceModel:
    return botocore.session.get_session().get_service_model("ec2")


@cache
def _dynamodb_model() -> ServiceModel:
    return botocore.session.get_session().get_service_model("dynamodb")


@cache
def _pagination(api: str) -> dict[str, Any]:
    return dict(botocore.session.get_session().get_paginator_model("ec2").get_paginator(api))


_OPERATIONS = {
    "describe_images": "DescribeImages",
    "describe_snapshots": "DescribeSnapshots",
    "create_tags": "CreateTags",
    "delete_tags": "DeleteTags",
    "enable_image_deprecation": "EnableImageDeprecation",
    "disable_image_deprecation": "DisableImageDeprecation",
    "disable_image": "DisableImage",
    "enable_image": "EnableImage",
    "deregister_image": "DeregisterImage",
    "delete_snapshot": "DeleteSnapshot",
    "describe_image_attribute": "DescribeImageAttribute",
    "modify_image_attribute": "ModifyImageAttribute",
    "describe_image_references": "DescribeImageReferences",
    "describe_instances": "DescribeInstances",
    "describe_launch_templates": "DescribeLaunchTemplates",
    "describe_launch_template_versions": "DescribeLaunchTemplateVersions",
    "describe_spot_fleet_requests": "DescribeSpotFleetRequests",
    "describe_spot_instance_requests": "DescribeSpotInstanceRequests",
    "describe_fleets": "DescribeFleets",
    "get_image_block_public_access_state": "GetImageBlockPublicAccessState",
}
ACCOUNT = "123456789012"  # the account the fake's resources belong to (in ARNs)
FILTER_VALUES_MAX = 200  # EC2's limit on the values of the filters of one call
# What DescribeImageReferences reports (Reference.kind -> its ResourceType); the other sources' kinds
# (Auto Scaling groups, launch configurations, ...) it does not see.
_REFERENCE_TYPES = {
    "instance": "ec2:Instance",
    "launch-template": "ec2:LaunchTemplate",
    "ssm-parameter": "ssm:Parameter",
    "image-builder-recipe": "imagebuilder:ImageRecipe",
}


def client_error(code: str, message: str, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


def _already(image: FakeImage, api: str) -> ClientError:
    """EC2 documents no answer for an AMI already in the state asked for: the fake refuses, the harder
    case for a caller whose retried call meets the state its first attempt set (the code is a guess)."""
    return client_error("IncorrectState", f"The image '{image.image_id}' is already {image.state}", api)


def ec2_time(value: datetime) -> str:
    """EC2's format for image times (CreationDate, DeprecationTime, LastLaunchedTime)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def nearest_minute(value: datetime) -> datetime:
    """EC2 rounds DeprecateAt to the nearest minute."""
    return (value + timedelta(seconds=30)).replace(second=0, microsecond=0)


def _shown(image: FakeImage, params: Mapping[str, Any], wanted: Mapping[str, set[str]]) -> bool:
    """Whether DescribeImages answers with the AMI: its state, and every filter matches it."""
    if image.state == "disabled" and not params.get("IncludeDisabled"):
        return False
    if "image-id" in wanted and image.image_id not in wanted["image-id"]:
        return False
    snapshots = wanted.get("block-device-mapping.snapshot-id")
    return snapshots is None or bool(snapshots.intersection(image.snapshot_ids))


Item = TypeVar("Item")


def _page(
    found: Sequence[Item], params: Mapping[str, Any], api: str, limits: tuple[int, int]
) -> tuple[Sequence[Item], dict[str, str]]:
    """One page of `found`: MaxResults items from NextToken on (all of them without MaxResults), and
    the NextToken of the next page, if any. `limits`: the (least, largest) MaxResults EC2 takes."""
    start = 0
    if "NextToken" in params:
        token = str(params["NextToken"])
        if not token.isdigit() or int(token) > len(found):
            raise client_error("InvalidNextToken", f"The token '{token}' is invalid", api)
        start = int(token)
    size = params.get("MaxResults")
    if size is None:
        return found[start:], {}
    if not limits[0] <= size <= limits[1]:
        raise client_error(
            "InvalidParameterValue", f"MaxResults must be between {limits[0]} and {limits[1]}", api
        )
    end = start + size
    return found[start:end], ({"NextToken": str(end)} if end < len(found) else {})


@dataclass
class FakeImage:
    image_id: str
    name: str
    created: datetime
    architecture: str = "x86_64"
    state: str = "available"
    tags: dict[str, str] = field(default_factory=dict)
    snapshot_ids: tuple[str, ...] = ()
    size_gib: int = 8
    root_device_type: str = "ebs"
    deprecation_time: datetime | None = None
    protected: bool = False
    last_launched: datetime | None = None
    permissions: set[str] = field(default_factory=set)  # LaunchPermission keys, "kind:value"

    @property
    def public(self) -> bool:
        return "group:all" in self.permissions

    def view(self) -> ImageView:
        """What a test compares: everything an EC2 caller can observe of the AMI."""
        return ImageView(
            state=self.state,
            tags=tuple(sorted(self.tags.items())),
            deprecation_time=self.deprecation_time,
            permissions=frozenset(self.permissions),
            snapshot_ids=self.snapshot_ids,
            protected=self.protected,
        )

    def to_api(self) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "ImageId": self.image_id,
            "Name": self.name,
            "Architecture": self.architecture,
            "State": self.state,
            "CreationDate": ec2_time(self.created),
            "Tags": [{"Key": k, "Value": v} for k, v in self.tags.items()],
            "RootDeviceType": self.root_device_type,
            "Public": self.public,
            "DeregistrationProtection": "enabled" if self.protected else "disabled",
            "BlockDeviceMappings": [
                {"DeviceName": f"/dev/sd{chr(97 + n)}", "Ebs": {"SnapshotId": s, "VolumeSize": self.size_gib}}
                for n, s in enumerate(self.snapshot_ids)
            ],
        }
        if self.deprecation_time is not None:
            raw["DeprecationTime"] = ec2_time(self.deprecation_time)
        if self.last_launched is not None:
            raw["LastLaunchedTime"] = ec2_time(self.last_launched)
        return raw


@dataclass(frozen=True)
class ImageView:
    state: str
    tags: tuple[tuple[str, str], ...]
    deprecation_time: datetime | None
    permissions: frozenset[str]
    snapshot_ids: tuple[str, ...]
    protected: bool


@dataclass(frozen=True)
class Call:
    """One request as EC2 received it, with the target AMI as it was just before (None: no such AMI).
    `retry`: the SDK sent it again after the answer to the same call was lost."""

    operation: str
    params: Mapping[str, Any]
    before: FakeImage | None
    clock: datetime
    retry: bool = False

    @property
    def image_id(self) -> str | None:
        value = self.params.get("ImageId")
        return str(value) if value is not None else None


R = TypeVar("R")
T = TypeVar("T")


class Lanes:
    """Callers side by side in simulated time, as a thread pool's workers against EC2: each lane is a
    thread with its own clock, and exactly one runs at a time, always the one whose clock is earliest
    (ties: the first lane). A lane yields at each call to the fake and at each pacer wait, so the fake
    and its token buckets see the calls of every lane in the order of simulated time, and the fake's
    state is only ever touched by one lane at a time."""

    def __init__(self) -> None:
        self._turn = threading.Condition()
        self._times: dict[int, float] = {}  # lane -> its clock, while it runs
        self._running: int | None = None
        self._lane = threading.local()
        self.end = 0.0

    def now(self) -> float:
        return self._times[self._lane.index]

    def set(self, value: float) -> None:
        self._times[self._lane.index] = value

    def _next(self) -> None:
        self._running = min(self._times, key=lambda lane: (self._times[lane], lane)) if self._times else None
        self._turn.notify_all()

    def take_turn(self) -> None:
        with self._turn:
            self._next()
            self._turn.wait_for(lambda: self._running == self._lane.index)

    def run(self, fn: Callable[[T], R], items: Sequence[T], workers: int, start: float) -> list[R]:
        slots: dict[int, R] = {}
        queue = list(enumerate(items))
        failures: list[BaseException] = []

        def lane(index: int) -> None:
            self._lane.index = index
            try:
                with self._turn:  # only the running lane chooses the next: wait to be chosen
                    self._turn.wait_for(lambda: self._running == index)
                while queue and not failures:
                    position, item = queue.pop(0)  # only the running lane is here
                    slots[position] = fn(item)
            except BaseException as error:  # a lane's failure is the caller's, raised below
                failures.append(error)
            finally:
                with self._turn:
                    self.end = max(self.end, self._times.pop(index))
                    self._next()

        self._times = {index: start for index in range(workers)}
        self._running = 0
        threads = [threading.Thread(target=lane, args=(index,)) for index in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        return [slots[position] for position in range(len(items))]


class FakeEC2:
    """One region's self-owned AMIs and snapshots."""

    def __init__(
        self,
        region: str = "us-east-1",
        *,
        seed: int = 0,
        results_rate: float = 0.5,
        fail_rate: float = 0.0,
        crash_rate: float = 0.0,
        throttle: AccountBuckets | None = None,
        latency: float = 0.0,
    ) -> None:
        self.region = region
        self.images: dict[str, FakeImage] = {}
        self.deregistered: dict[str, FakeImage] = {}
        self.snapshots: dict[str, dict[str, str]] = {}  # snapshot id -> tags
        self.deleted_snapshots: list[str] = []
        self.refused_in_use: list[str] = []  # DeleteSnapshot calls EC2 refused: an AMI still uses it
        self.references: list[Reference] = []
        # Instance id -> state for DescribeInstances; an instance a reference names is running unless
        # set here.
        self.instances: dict[str, str] = {}
        self.parameters: dict[str, str] = {}
        self.calls: list[Call] = []
        self._elapsed = 0.0  # simulated seconds: the calls' latency and a pacer's waits
        self.lanes: Lanes | None = None  # several callers side by side in simulated time (see Lanes)
        self._start = datetime.now(UTC)  # `clock` when `elapsed` was 0
        self.latency = latency
        self.throttle = throttle
        # Called with the API name before each EC2 call (not the SDK's retry of a call whose answer was
        # lost, as botocore's before-call event): a client-side pacer's acquire.
        self.before_call: Callable[[str], object] | None = None
        self.rng = random.Random(seed)
        # Share of DeregisterImage(DeleteAssociatedSnapshots=True) calls answered with DeleteSnapshotResults
        # (the rest behave like a partition that predates it: no results, snapshots stay).
        self.results_rate = results_rate
        self.fail_rate = fail_rate
        self.crash_rate = crash_rate
        # Number of a mutating call (see `mutating_calls`) -> "throttle" (fails before it takes effect),
        # "lost" (takes effect, then the answer is lost and the caller sees an error), "retried" (takes
        # effect, the answer is lost, and the SDK's retry meets the new state) or "crash".
        self.faults: dict[int, str] = {}
        # Or by the API: its next call (EC2's name, or the ledger_* operation) -> the fault.
        self.next_call_faults: dict[str, str] = {}
        self.mutating_calls = 0
        self._lose_answer = False
        self._retry_answer = False
        self.retrying = False  # the request being made is the SDK's retry of a call whose answer was lost
        self.meta = SimpleNamespace(region_name=region)  # as a boto3 client
        self._validator = ParamValidator()
        self._snapshot_users: dict[str, set[str]] = {}  # snapshot id -> AMIs added with it (an index)
        # Seconds after DeregisterImage during which EC2 still names the AMI as a user of its snapshots
        # (DeleteSnapshot answers InvalidSnapshot.InUse, "in use by ami-..."): EC2's eventual consistency.
        self.deregistration_lag = 0.0
        self._deregistered_at: dict[str, float] = {}  # AMI id -> `elapsed` when it was deregistered
        self.ledger = FakeLedger(self)
        self.dynamodb = FakeDynamoDB(self)

    # ---- simulated time ----------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        """Simulated seconds: the fake's own, or the calling lane's while lanes run."""
        return self.lanes.now() if self.lanes is not None else self._elapsed

    @elapsed.setter
    def elapsed(self, value: float) -> None:
        if self.lanes is not None:
            self.lanes.set(value)
        else:
            self._elapsed = value

    def turn(self) -> None:
        """A call is about to reach the fake: with lanes, the earliest caller goes first."""
        if self.lanes is not None:
            self.lanes.take_turn()

    def side_by_side(self, workers: int) -> Callable[[Callable[[T], R], Sequence[T]], list[R]]:
        """A map that runs `fn` over the items in `workers` lanes of simulated time (as a thread pool
        would), the fake's clock then at the last lane's end. See Lanes."""

        def run(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
            lanes = Lanes()
            self.lanes, start = lanes, self._elapsed
            try:
                results = lanes.run(fn, items, workers, start)
            finally:
                self.lanes = None
            self._elapsed = lanes.end
            return results

        return run

    @property
    def clock(self) -> datetime:
        return self._start + timedelta(seconds=self.elapsed)

    @clock.setter
    def clock(self, value: datetime) -> None:
        self._start = value - timedelta(seconds=self.elapsed)

    def advance(self, seconds: float) -> None:
        self.elapsed += seconds
        self.turn()  # a lane that waited lets the earlier ones go first

    def pacer(self, share: float = 1.0, *, attach: bool = True, full: bool = True) -> Pacer:
        """A Pacer on this fake's simulated time (its waits advance the clock), attached as
        `before_call` unless `attach` is False (several workers' pacers: attach each in turn); its
        buckets start empty with `full=False`, as the slice worker's."""
        pacer = Pacer(share, clock=lambda: self.elapsed, sleep=self.advance, full=full)
        if attach:
            self.before_call = pacer.acquire
        return pacer

    # ---- building a fleet ---------------------------------------------------------------------------
    def add_image(self, image: FakeImage) -> FakeImage:
        """The only way an AMI enters the fake (the index of snapshot users relies on it)."""
        self.images[image.image_id] = image
        for snapshot_id in image.snapshot_ids:
            self.snapshots.setdefault(snapshot_id, {})
            self._snapshot_users.setdefault(snapshot_id, set()).add(image.image_id)
        return image

    def add_snapshot(self, snapshot_id: str, tags: Mapping[str, str] | None = None) -> None:
        self.snapshots.setdefault(snapshot_id, {}).update(tags or {})

    # ---- what a test reads -------------------------------------------------------------------------
    def mutations(self, since: int = 0) -> list[Call]:
        return [c for c in self.calls[since:] if c.operation in MUTATING]

    def used_snapshots(self) -> set[str]:
        """Snapshots of the remaining AMIs, in any state (a disabled AMI still needs its snapshots)."""
        return {s for image in self.images.values() for s in image.snapshot_ids}

    def views(self) -> dict[str, ImageView]:
        return {image_id: image.view() for image_id, image in self.images.items()}

    def describe(self, permissions: Iterable[str] | bool = False) -> RegionInventory:
        """The region's inventory as the adapter builds it from DescribeImages and DescribeSnapshots:
        every self-owned AMI (disabled and deprecated included), launch permissions loaded for
        `permissions` (image ids, or True for all), the references and SSM pointer values set on the
        fake, and the snapshots tagged ami-janitor:retired-from."""
        wanted = set(self.images) if permissions is True else set(permissions or ())
        images = []
        for image_id in sorted(self.images):
            image = Image.from_api(self.region, self.images[image_id].to_api())
            if image_id in wanted:
                granted = tuple(
                    LaunchPermission.from_key(k) for k in sorted(self.images[image_id].permissions)
                )
                image = image.model_copy(update={"launch_permissions": granted})
            images.append(image)
        retired = tuple(
            RetiredSnapshot(snapshot_id=snapshot_id, image_id=tags[RETIRED_FROM_TAG])
            for snapshot_id, tags in sorted(self.snapshots.items())
            if RETIRED_FROM_TAG in tags
        )
        return with_ledger(
            RegionInventory(
                region=self.region,
                images=tuple(images),
                references=tuple(sorted(self.references, key=lambda r: (r.image_id, r.resource_id))),
                parameters=dict(self.parameters),
                retired_snapshots=retired,
                ledger=self.ledger.view(),
            )
        )

    # ---- plumbing ----------------------------------------------------------------------------------
    def _request(self, operation: str, params: dict[str, Any]) -> tuple[str, FakeImage | None]:
        """Validate, pace, record, throttle and maybe fail the request; returns (API name, the target AMI
        before it). A throttled call is recorded (EC2 received it) but is no mutating call of `faults`."""
        api = _OPERATIONS[operation]
        report = self._validator.validate(params, _ec2_model().operation_model(api).input_shape)
        if report.has_errors():
            raise client_error("InvalidParameterValue", report.generate_report(), api)
        self.turn()
        if self.before_call is not None and not self.retrying:
            self.before_call(api)
        arrived, clock = self.elapsed, self.clock
        self.elapsed += self.latency
        image_id = params.get("ImageId")
        target = self.images.get(image_id) if isinstance(image_id, str) else None
        self.calls.append(Call(operation, copy.deepcopy(params), copy.deepcopy(target), clock, self.retrying))
        if self.throttle is not None and not self.throttle.take(api, arrived):
            raise client_error("RequestLimitExceeded", "Request limit exceeded.", api)
        if operation in MUTATING:
            self._lose_answer, self._retry_answer = self._after_effect(
                self._fault(api, "RequestLimitExceeded")
            )
        return api, target

    def _filters(self, params: Mapping[str, Any], api: str, known: set[str]) -> dict[str, set[str]]:
        """The request's filters, name -> values; EC2 refuses a filter it does not know and more than
        FILTER_VALUES_MAX values in all."""
        filters = params.get("Filters") or []
        unknown = sorted({f["Name"] for f in filters} - known)
        if unknown:
            raise client_error("InvalidParameterValue", f"The filter '{unknown[0]}' is invalid", api)
        if sum(len(f.get("Values") or []) for f in filters) > FILTER_VALUES_MAX:
            raise client_error(
                "FilterLimitExceeded",
                f"The maximum number of filter values specified on a single call is {FILTER_VALUES_MAX}",
                api,
            )
        wanted: dict[str, set[str]] = {}
        for f in filters:
            values = set(f.get("Values") or [])
            wanted[f["Name"]] = wanted[f["Name"]] & values if f["Name"] in wanted else values
        return wanted

    def get_paginator(self, operation: str) -> Paginator:
        """botocore's own paginator over this fake's method, as a boto3 client's."""
        api = _OPERATIONS[operation]
        return Paginator(getattr(self, operation), _pagination(api), _ec2_model().operation_model(api))

    def _after_effect(self, fault: str | None) -> tuple[bool, bool]:
        """What becomes of the answer of a call that took effect: (lost, lost and retried by the SDK)."""
        lost = fault == "lost" or bool(self.fail_rate and self.rng.random() < self.fail_rate / 2)
        retried = fault == "retried" or bool(self.fail_rate and self.rng.random() < self.fail_rate / 2)
        return lost, retried

    def ledger_call(self, operation: str, image_id: str) -> tuple[bool, bool]:
        """A write to the ledger table: recorded and faulted like a mutating EC2 call; returns what
        becomes of its answer once the write took effect (see `_after_effect`)."""
        params = {"ImageId": image_id} if image_id else {}
        self.turn()
        self.calls.append(Call(operation, params, None, self.clock, self.retrying))
        self.elapsed += self.latency
        return self._after_effect(self._fault(operation, "ThrottlingException"))

    def _fault(self, api: str, throttle_code: str) -> str | None:
        """The fault of this mutating call, by its number or at random: a crash or a throttle raise;
        returns the fault ("lost": the caller loses the answer after the change)."""
        fault = self.faults.pop(self.mutating_calls, None) or self.next_call_faults.pop(api, None)
        self.mutating_calls += 1
        if fault == "crash" or (self.crash_rate and self.rng.random() < self.crash_rate):
            raise Crash(f"{api} never answered")
        if fault == "throttle" or (self.fail_rate and self.rng.random() < self.fail_rate):
            raise client_error(throttle_code, "Rate exceeded.", api)
        return fault

    def _lost_response(self, api: str) -> None:
        """After the change took effect: the answer may still be lost on the way back, for good or
        followed by the SDK's retry."""
        if self._lose_answer:
            self._lose_answer = self._retry_answer = False
            raise client_error("InternalError", "An internal error has occurred", api)
        if self._retry_answer:
            self._retry_answer = False
            raise _AnswerLost(api)

    def _image(self, image_id: str, api: str) -> FakeImage:
        if image_id in self.images:
            return self.images[image_id]
        if image_id in self.deregistered:
            raise client_error(
                "InvalidAMIID.Unavailable", f"The image ID '{image_id}' is no longer available", api
            )
        raise client_error("InvalidAMIID.NotFound", f"The image id '[{image_id}]' does not exist", api)

    def _users(self, snapshot_id: str) -> list[str]:
        """The remaining AMIs that use the snapshot."""
        added = self._snapshot_users.get(snapshot_id, ())
        return sorted(i for i in added if i in self.images and snapshot_id in self.images[i].snapshot_ids)

    # ---- tags --------------------------------------------------------------------------------------
    def _taggable(self, resources: Sequence[str], api: str) -> list[dict[str, str]]:
        targets = []
        for resource in resources:
            if resource.startswith("ami-"):
                targets.append(self._image(resource, api).tags)
            elif resource in self.snapshots:
                targets.append(self.snapshots[resource])
            else:
                raise client_error(
                    "InvalidSnapshot.NotFound", f"The snapshot '{resource}' does not exist.", api
                )
        return targets

    @_sdk_retry
    def create_tags(self, **params: Any) -> dict[str, Any]:
        api, _ = self._request("create_tags", params)
        resources: list[str] = params["Resources"]
        if len(resources) > 1000:
            raise client_error("InvalidParameterValue", "at most 1000 resources per call", api)
        tags = {t["Key"]: t.get("Value", "") for t in params["Tags"]}
        for key, value in tags.items():
            if len(key) > TAG_KEY_MAX or len(value) > TAG_VALUE_MAX or key.lower().startswith("aws:"):
                raise client_error("InvalidParameterValue", f"invalid tag {key}={value!r}", api)
        targets = self._taggable(resources, api)  # all or nothing
        for target in targets:
            if len(set(target) | set(tags)) > TAGS_PER_RESOURCE_MAX:
                raise client_error("TagLimitExceeded", "The maximum number of tags is 50", api)
        for target in targets:
            target.update(tags)
        self._lost_response(api)
        return {}

    @_sdk_retry
    def delete_tags(self, **params: Any) -> dict[str, Any]:
        api, _ = self._request("delete_tags", params)
        for target in self._taggable(params["Resources"], api):
            for tag in params.get("Tags") or []:
                if tag["Key"] in target and ("Value" not in tag or target[tag["Key"]] == tag["Value"]):
                    del target[tag["Key"]]
        self._lost_response(api)
        return {}

    # ---- deprecation -------------------------------------------------------------------------------
    @_sdk_retry
    def enable_image_deprecation(self, **params: Any) -> dict[str, Any]:
        api, _ = self._request("enable_image_deprecation", params)
        image = self._image(params["ImageId"], api)
        at = nearest_minute(params["DeprecateAt"])
        if at < nearest_minute(self.clock) or at > self.clock + DEPRECATION_HORIZON:
            raise client_error(
                "InvalidParameterValue",
                f"DeprecateAt {ec2_time(at)} must be in the future, within 10 years",
                api,
            )
        image.deprecation_time = at
        self._lost_response(api)
        return {"Return": True}

    @_sdk_retry
    def disable_image_deprecation(self, **params: Any) -> dict[str, Any]:
        api, _ = self._request("disable_image_deprecation", params)
        self._image(params["ImageId"], api).deprecation_time = None
        self._lost_response(api)
        return {"Return": True}

    # ---- state -------------------------------------------------------------------------------------
    @_sdk_retry
    def disable_image(self, **params: Any) -> dict[str, Any]:
        api, _ = self._request("disable_image", params)
        image = self._image(params["ImageId"], api)
        if image.state == "disabled":
            raise _already(image, api)
        image.state = "disabled"
        image.permissions.clear()  # a disabled AMI is private: every launch permission goes
        self._lost_response(api)
        return {"Return": True}

    @_sdk_retry
    def enable_image(self, **params: Any) -> dict[str, Any]:
        api, _ = self._request("enable_image", params)
        image = self._image(params["ImageId"], api)
        if image.state == "available":
            raise _already(image, api)
        image.state = "available"  # the launch permissions are not restored
        self._lost_response(api)
        return {"Return": True}

    # ---- launch permissions ------------------------------------------------------------------------
    def describe_images(self, **params: Any) -> dict[str, Any]:
        """By id (an unknown id is none), or every AMI (all are the caller's own: Owners is not read),
        narrowed by the filters image-id and block-device-mapping.snapshot-id and by ExecutableUsers.
        Disabled AMIs only with IncludeDisabled (EC2's default leaves them out); deprecated ones always
        (their owner sees them).
        In pages of MaxResults (not with ImageIds, as EC2), in image id order."""
        api, _ = self._request("describe_images", params)
        ids = params.get("ImageIds")
        if ids and "MaxResults" in params:
            raise client_error("InvalidParameterCombination", "MaxResults cannot be used with ImageIds", api)
        wanted = self._filters(params, api, {"image-id", "block-device-mapping.snapshot-id"})
        if ids is not None:
            candidates = [self.images[i] for i in ids if i in self.images]
        elif "image-id" in wanted:
            candidates = [self.images[i] for i in sorted(wanted["image-id"]) if i in self.images]
        elif "block-device-mapping.snapshot-id" in wanted:
            users = {u for s in wanted["block-device-mapping.snapshot-id"] for u in self._users(s)}
            candidates = [self.images[i] for i in sorted(users)]
        else:
            candidates = [self.images[i] for i in sorted(self.images)]
        found = [image for image in candidates if _shown(image, params, wanted)]
        if "ExecutableUsers" in params:  # explicit launch permissions of these accounts (as EC2: not public)
            users = {f"user:{account}" for account in params["ExecutableUsers"]}
            found = [image for image in found if users & image.permissions]
        page, token = _page(found, params, api, (1, 1000))
        return {"Images": [image.to_api() for image in page], **token}

    def describe_snapshots(self, **params: Any) -> dict[str, Any]:
        """Only the filters the janitor uses: `tag:KEY` (the executor) and `tag-key` (the inventory's
        retired snapshots); one page."""
        self._request("describe_snapshots", params)
        filters = params.get("Filters", [])
        wanted = [
            (f["Name"].removeprefix("tag:"), set(f["Values"])) for f in filters if f["Name"] != "tag-key"
        ]
        keys = [set(f["Values"]) for f in filters if f["Name"] == "tag-key"]
        found = [
            {"SnapshotId": snapshot_id, "Tags": [{"Key": k, "Value": v} for k, v in sorted(tags.items())]}
            for snapshot_id, tags in sorted(self.snapshots.items())
            if all(tags.get(key) in values for key, values in wanted) and all(k & set(tags) for k in keys)
        ]
        return {"Snapshots": found}

    def describe_image_references(self, **params: Any) -> dict[str, Any]:
        """The `references` to these AMIs that DescribeImageReferences reports (instances whatever
        their state, as the API), by AMI; paged by MaxResults."""
        api, _ = self._request("describe_image_references", params)
        ids = params["ImageIds"]
        if len(ids) > 10:
            raise client_error("InvalidParameterValue", "at most 10 image ids per call", api)
        found = [
            {
                "ImageId": r.image_id,
                "ResourceType": _REFERENCE_TYPES[r.kind],
                "Arn": self._arn(r),
            }
            for image_id in ids
            for r in sorted(self.references, key=lambda r: (r.kind, r.resource_id))
            if r.image_id == image_id and r.kind in _REFERENCE_TYPES
        ]
        page, token = _page(found, params, api, (5, 1000))
        return {"ImageReferences": list(page), **token}

    def _arn(self, reference: Reference) -> str:
        prefix = f"arn:aws:ec2:{self.region}:{ACCOUNT}"
        if reference.kind == "instance":
            return f"{prefix}:instance/{reference.resource_id}"
        if reference.kind == "launch-template":
            return f"{prefix}:launch-template/{reference.resource_id}"
        if reference.kind == "ssm-parameter":
            # An ARN drops the name's leading '/'.
            return f"arn:aws:ssm:{self.region}:{ACCOUNT}:parameter/{reference.resource_id.lstrip('/')}"
        return reference.resource_id  # an Image Builder recipe is named by its ARN

    def describe_instances(self, **params: Any) -> dict[str, Any]:
        """The instances `instances` and the instance references name, by InstanceIds and the filters
        instance-id and instance-state-name; one reservation each, paged by MaxResults."""
        api, _ = self._request("describe_instances", params)
        ids = params.get("InstanceIds")
        if ids and "MaxResults" in params:
            raise client_error(
                "InvalidParameterCombination", "MaxResults cannot be used with InstanceIds", api
            )
        wanted = self._filters(params, api, {"instance-id", "instance-state-name"})
        states = {r.resource_id: "running" for r in self.references if r.kind == "instance"}
        states.update(self.instances)
        images = {r.resource_id: r.image_id for r in self.references if r.kind == "instance"}
        for instance_id in ids or ():
            if instance_id not in states:
                raise client_error(
                    "InvalidInstanceID.NotFound", f"The instance ID '{instance_id}' does not exist", api
                )
        found = [
            {
                "ReservationId": f"r-{n:017x}",
                "Instances": [
                    {
                        "InstanceId": i,
                        "State": {"Name": state},
                        **({"ImageId": images[i]} if i in images else {}),
                    }
                ],
            }
            for n, (i, state) in enumerate(sorted(states.items()))
            if (ids is None or i in ids)
            and i in wanted.get("instance-id", {i})
            and state in wanted.get("instance-state-name", {state})
        ]
        page, token = _page(found, params, api, (5, 1000))
        return {"Reservations": list(page), **token}

    # ---- what the inventory's other EC2 sources read ------------------------------------------------
    def _templates(self) -> dict[str, str]:
        """Launch template id -> the AMI its one version names: the `references` of kind
        launch-template (so DescribeImageReferences and the template listing agree)."""
        return {r.resource_id: r.image_id for r in self.references if r.kind == "launch-template"}

    def describe_launch_templates(self, **params: Any) -> dict[str, Any]:
        """Every launch template the references name, one version each (its default and latest)."""
        api, _ = self._request("describe_launch_templates", params)
        found = [
            {
                "LaunchTemplateId": template_id,
                "LaunchTemplateName": f"template-{template_id}",
                "DefaultVersionNumber": 1,
                "LatestVersionNumber": 1,
            }
            for template_id in sorted(self._templates())
        ]
        page, token = _page(found, params, api, (1, 200))
        return {"LaunchTemplates": list(page), **token}

    def describe_launch_template_versions(self, **params: Any) -> dict[str, Any]:
        """The one version of a template (by LaunchTemplateId), or of every template (by Versions)."""
        api, _ = self._request("describe_launch_template_versions", params)
        templates = self._templates()
        template_id = params.get("LaunchTemplateId")
        if template_id is not None and template_id not in templates:
            raise client_error(
                "InvalidLaunchTemplateId.NotFound",
                f"The launch template ID '{template_id}' does not exist",
                api,
            )
        found = [
            {
                "LaunchTemplateId": t,
                "LaunchTemplateName": f"template-{t}",
                "VersionNumber": 1,
                "DefaultVersion": True,
                "LaunchTemplateData": {"ImageId": image_id},
            }
            for t, image_id in sorted(templates.items())
            if template_id in (None, t)
        ]
        page, token = _page(found, params, api, (1, 200))
        return {"LaunchTemplateVersions": list(page), **token}

    def describe_spot_fleet_requests(self, **params: Any) -> dict[str, Any]:
        """No Spot Fleet request."""
        self._request("describe_spot_fleet_requests", params)
        return {"SpotFleetRequestConfigs": []}

    def describe_spot_instance_requests(self, **params: Any) -> dict[str, Any]:
        """No Spot Instance request."""
        self._request("describe_spot_instance_requests", params)
        return {"SpotInstanceRequests": []}

    def describe_fleets(self, **params: Any) -> dict[str, Any]:
        """No EC2 Fleet."""
        self._request("describe_fleets", params)
        return {"Fleets": []}

    def get_image_block_public_access_state(self, **params: Any) -> dict[str, Any]:
        """Image block public access on (new sharing blocked)."""
        self._request("get_image_block_public_access_state", params)
        return {"ImageBlockPublicAccessState": "block-new-sharing"}

    def describe_image_attribute(self, **params: Any) -> dict[str, Any]:
        api, _ = self._request("describe_image_attribute", params)
        image = self._image(params["ImageId"], api)
        if params["Attribute"] != "launchPermission":
            raise client_error(
                "InvalidParameterValue", f"attribute {params['Attribute']} is not modelled", api
            )
        granted = [LaunchPermission.from_key(k).to_api() for k in sorted(image.permissions)]
        return {"ImageId": image.image_id, "LaunchPermissions": granted}

    @_sdk_retry
    def modify_image_attribute(self, **params: Any) -> dict[str, Any]:
        api, _ = self._request("modify_image_attribute", params)
        image = self._image(params["ImageId"], api)
        changes = params.get("LaunchPermission") or {}
        if image.state == "disabled":
            # The exact code is a guess; EC2 documents only that a disabled AMI cannot be shared.
            raise client_error("IncorrectState", f"The image '{image.image_id}' is disabled", api)
        try:
            add = {LaunchPermission.from_api(p).key for p in changes.get("Add") or []}
            remove = {LaunchPermission.from_api(p).key for p in changes.get("Remove") or []}
        except ValueError as error:
            raise client_error("InvalidParameterValue", str(error), api) from None
        for key in add:
            if key.startswith("user:") and not (len(key) == 17 and key[5:].isdigit()):
                raise client_error("InvalidUserID.Malformed", f"Invalid user id: {key[5:]}", api)
            if key.startswith("group:") and key != "group:all":
                raise client_error("InvalidParameterValue", f"unknown group {key[6:]}", api)
        image.permissions |= add
        image.permissions -= remove
        self._lost_response(api)
        return {}

    # ---- deregistration and snapshots --------------------------------------------------------------
    @_sdk_retry
    def deregister_image(self, **params: Any) -> dict[str, Any]:
        api, _ = self._request("deregister_image", params)
        image = self._image(params["ImageId"], api)
        if image.protected:
            raise client_error(
                "OperationNotPermitted", f"The image '{image.image_id}' has deregistration protection", api
            )
        del self.images[image.image_id]
        self.deregistered[image.image_id] = image
        self._deregistered_at[image.image_id] = self.elapsed
        answer: dict[str, Any] = {"Return": True}
        if params.get("DeleteAssociatedSnapshots") and self.rng.random() < self.results_rate:
            results = []
            for snapshot_id in image.snapshot_ids:
                if self._users(snapshot_id):
                    results.append({"SnapshotId": snapshot_id, "ReturnCode": "skipped"})
                else:
                    self._delete_snapshot(snapshot_id)
                    results.append({"SnapshotId": snapshot_id, "ReturnCode": "success"})
            answer["DeleteSnapshotResults"] = results
        self._lost_response(api)
        return answer

    def _delete_snapshot(self, snapshot_id: str) -> None:
        del self.snapshots[snapshot_id]
        self.deleted_snapshots.append(snapshot_id)

    @_sdk_retry
    def delete_snapshot(self, **params: Any) -> dict[str, Any]:
        api, _ = self._request("delete_snapshot", params)
        snapshot_id = params["SnapshotId"]
        if snapshot_id not in self.snapshots:
            raise client_error(
                "InvalidSnapshot.NotFound", f"The snapshot '{snapshot_id}' does not exist.", api
            )
        users = self._users(snapshot_id) or [
            image_id
            for image_id, at in sorted(self._deregistered_at.items())
            if snapshot_id in self.deregistered[image_id].snapshot_ids
            and self.elapsed - at < self.deregistration_lag
        ]
        if users:
            self.refused_in_use.append(snapshot_id)
            raise client_error(
                "InvalidSnapshot.InUse", f"The snapshot {snapshot_id} is currently in use by {users[0]}", api
            )
        self._delete_snapshot(snapshot_id)
        self._lost_response(api)
        return {}


# ---- the ledger ------------------------------------------------------------------------------------


def _ledger_write(method: Method) -> Method:
    """A ledger write with what may become of its answer after it took effect: lost (the caller sees
    an error), or lost and sent again by the SDK. The retry meets the first attempt's write; the write
    id aws/ledger.py stores with each write tells it that write was its own, so any attempt that wrote
    makes the call "recorded" (as tests/integration/test_ledger.py shows on moto)."""

    @functools.wraps(method)
    def call(self: FakeLedger, *args: Any, **params: Any) -> Written:
        self.retrying(False)
        written: Written = method(self, *args, **params)
        while True:
            lost, retried = self.answer
            self.answer = (False, False)
            if lost:
                raise client_error("InternalServerError", "Internal server error", "UpdateItem")
            if not retried:
                return written
            self.retrying(True)
            if method(self, *args, **params) == "recorded":
                written = "recorded"

    return call  # type: ignore[return-value]


class FakeLedger(Ledger):
    """The ledger table of the fake's region, in memory: the conditional writes of aws/ledger.py with
    the same outcomes ("recorded" / "already-recorded"), checked against the real table on moto in
    tests/integration/test_ledger.py. Each write is a mutating call of the fake EC2, so throttles, lost
    answers and crashes fall between a ledger write and the EC2 change it records too."""

    def __init__(self, ec2: FakeEC2 | None = None, retention_days: int = 90) -> None:
        self.ec2 = ec2  # None: a ledger alone, whose writes never fail
        self.table = "ami-janitor-ledger"
        self.retention_days = retention_days
        self.items: dict[str, LedgerItem] = {}
        self.adopted: datetime | None = None
        # A snapshot read_items answers from instead of `items` (a read that raced a write).
        self.frozen: dict[str, LedgerItem] | None = None
        self.answer = (False, False)  # the last write's answer: (lost, lost and retried)

    def _write(self, operation: str, image_id: str) -> None:
        if self.ec2 is not None:
            self.answer = self.ec2.ledger_call(operation, image_id)

    def retrying(self, again: bool) -> None:
        if self.ec2 is not None:
            self.ec2.retrying = again

    def _item(self, image_id: str) -> LedgerItem:
        return self.items.get(image_id) or LedgerItem(image_id=image_id)

    def require(self) -> None:
        return None

    @_ledger_write
    def record_copy(self, copy: LedgerCopy) -> Written:
        self._write("ledger_record_copy", copy.source_image_id)
        item = self._item(copy.source_image_id)
        if any((c.region, c.generation) == (copy.region, copy.generation) for c in item.copies):
            return "already-recorded"
        self.items[item.image_id] = item.model_copy(update={"copies": (*item.copies, copy)})
        return "recorded"

    @_ledger_write
    def confirm_copy(self, copy: LedgerCopy, image_id: str) -> Written:
        self._write("ledger_confirm_copy", copy.source_image_id)
        item = self._item(copy.source_image_id)
        at = (copy.region, copy.generation)
        if not any((c.region, c.generation) == at for c in item.copies):  # the table's condition
            return "already-recorded"
        copies = tuple(
            c.model_copy(update={"image_id": image_id}) if (c.region, c.generation) == at else c
            for c in item.copies
        )
        self.items[item.image_id] = item.model_copy(update={"copies": copies})
        return "recorded"

    @_ledger_write
    def record_replica(self, image_id: str, replica: LedgerCopy) -> Written:
        self._write("ledger_record_replica", image_id)
        item = self._item(image_id)
        if item.replica is not None and item.replica.token != replica.token:
            return "already-recorded"
        record = replica.model_copy(update={"image_id": image_id})
        self.items[image_id] = item.model_copy(update={"replica": record})
        return "recorded"

    @_ledger_write
    def record_grants(self, image_id: str, grants: Iterable[str]) -> Written:
        self._write("ledger_record_grants", image_id)
        item = self._item(image_id)
        grants = set(grants)
        update = {
            "grants": {*item.grants, *grants},
            "granting": {*item.granting, *grants},
            "grants_found": set(item.grants_found) - grants,
        }
        self.items[image_id] = item.model_copy(update={k: tuple(sorted(v)) for k, v in update.items()})
        return "recorded"

    @_ledger_write
    def confirm_grants(self, image_id: str, grants: Iterable[str]) -> Written:
        self._write("ledger_confirm_grants", image_id)
        item = self.items.get(image_id)
        if item is None or not item.granting:  # the table's condition: the granting attribute exists
            return "already-recorded"
        left = tuple(sorted(set(item.granting) - set(grants)))
        self.items[image_id] = item.model_copy(update={"granting": left})
        return "recorded"

    @_ledger_write
    def record_found(self, image_id: str, grants: Iterable[str]) -> Written:
        self._write("ledger_record_found", image_id)
        item = self._item(image_id)
        self.items[image_id] = item.model_copy(
            update={"grants_found": tuple(sorted({*item.grants_found, *grants}))}
        )
        return "recorded"

    @_ledger_write
    def forget_grants(self, image_id: str, grants: Iterable[str]) -> Written:
        self._write("ledger_forget_grants", image_id)
        item = self.items.get(image_id)
        if item is None or not item.grants:  # the table's condition: the grants attribute exists
            return "already-recorded"
        update = {"grants": set(item.grants) - set(grants), "granting": set(item.granting) - set(grants)}
        self.items[image_id] = item.model_copy(update={k: tuple(sorted(v)) for k, v in update.items()})
        return "recorded"

    def _set(self, image_id: str, **update: Any) -> None:
        item = self.items.get(image_id) or LedgerItem(image_id=image_id)
        self.items[image_id] = item.model_copy(update=update)

    def view(self) -> LedgerView:
        return LedgerView(table=self.table, items=dict(self.items), adopted=self.adopted)

    def read_all(self) -> LedgerView:
        return self.view()

    def read_items(self, image_ids: Iterable[str]) -> dict[str, LedgerItem]:
        view = self.frozen if self.frozen is not None else self.items
        return {i: view[i] for i in image_ids if i in view}

    @_ledger_write
    def record_adoption(self, at: datetime) -> Written:
        self._write("ledger_record_adoption", "")
        if self.adopted is not None:
            return "already-recorded"
        self.adopted = at
        return "recorded"

    @_ledger_write
    def adopt(self, item: LedgerItem) -> Written:
        self._write("ledger_adopt", item.image_id)
        if item.image_id in self.items:
            return "already-recorded"
        self.items[item.image_id] = item
        return "recorded"

    @_ledger_write
    def record_candidate(self, image_id: str, at: datetime) -> Written:
        self._write("ledger_record_candidate", image_id)
        item = self.items.get(image_id)
        if item is not None and item.first_candidate is not None and item.closed is None:
            return "already-recorded"
        self._set(
            image_id, first_candidate=at, stages={}, closed=None, snapshots=(), deregistered=None, ttl=None
        )
        return "recorded"

    @_ledger_write
    def record_stage(
        self,
        image_id: str,
        stage: Stage,
        at: datetime,
        prior: Prior,
        *,
        previous: Stage | Literal["default"] | None = "default",
        snapshots: Sequence[str] = (),
    ) -> Written:
        self._write("ledger_record_stage", image_id)
        if previous == "default":
            index = STAGES.index(stage)
            previous = STAGES[index - 1] if index else None
        item = self.items.get(image_id)
        if item is None or not item.is_open:
            return "already-recorded"
        if item.last_stage != previous:
            return "already-recorded"
        entry = prior.stage_at(at)
        update: dict[str, Any] = {"stages": {**item.stages, stage: entry}}
        if stage == "deregister":
            update["snapshots"] = tuple(
                LedgerSnapshot(snapshot_id=s, image_id=image_id) for s in sorted(set(snapshots))
            )
        self._set(image_id, **update)
        return "recorded"

    @_ledger_write
    def redo_stage(
        self, image_id: str, stage: Stage, at: datetime, prior: Prior, seen: datetime | None = None
    ) -> Written:
        self._write("ledger_redo_stage", image_id)
        item = self.items.get(image_id)
        if item is None or not item.is_open or stage not in item.stages:
            return "already-recorded"
        if item.stages[stage].redone != seen:  # done again by another run since the caller's read
            return "already-recorded"
        done = item.stages[stage]
        entry = prior.stage_at(done.at).model_copy(update={"confirmed": done.confirmed, "redone": at})
        self._set(image_id, stages={**item.stages, stage: entry})
        return "recorded"

    @_ledger_write
    def confirm_stage(self, image_id: str, stage: Stage, at: datetime) -> Written:
        self._write("ledger_confirm_stage", image_id)
        item = self.items.get(image_id)
        if item is None or stage not in item.stages or item.closed is not None:
            return "already-recorded"
        entry = item.stages[stage].model_copy(update={"confirmed": at})
        self._set(image_id, stages={**item.stages, stage: entry})
        return "recorded"

    @_ledger_write
    def confirm_deregistered(self, image_id: str, at: datetime) -> Written:
        self._write("ledger_confirm_deregistered", image_id)
        item = self.items.get(image_id)
        if item is None or "deregister" not in item.stages or item.deregistered is not None:
            return "already-recorded"
        self._set(image_id, deregistered=at, ttl=int((at + timedelta(days=self.retention_days)).timestamp()))
        return "recorded"

    @_ledger_write
    def close(
        self,
        image_id: str,
        at: datetime,
        last_stage: Stage | None,
        redone: Mapping[Stage, datetime | None] | None = None,
    ) -> Written:
        self._write("ledger_close", image_id)
        item = self.items.get(image_id)
        if item is None or not item.is_open or item.last_stage != last_stage:
            return "already-recorded"
        if any(s in item.stages and item.stages[s].redone != when for s, when in (redone or {}).items()):
            return "already-recorded"
        self._set(image_id, closed=at)
        return "recorded"

    @_ledger_write
    def reopen(self, image_id: str, stage: Stage) -> Written:
        self._write("ledger_reopen", image_id)
        item = self.items.get(image_id)
        if item is None or item.closed is None or item.last_stage != stage:
            return "already-recorded"
        self._set(image_id, closed=None)
        return "recorded"


_serializer = TypeSerializer()


class FakeDynamoDB:
    """The ledger table as a DynamoDB client shows it: to a reader of a few AMIs' items (aws/ledger.py's
    `read_items`: BatchGetItem, DescribeTable) and of the whole table (Scan), answered from the fake's
    ledger; to aws/ledger.Ledger's writes (UpdateItem on an AMI's item, into the fake's ledger) and to
    a run's record (aws/runs.py: GetItem, UpdateItem on the items that are not an AMI's, kept in
    `items`), with DynamoDB's expressions (tests/dynamodb_expressions.py). Requests are checked against
    botocore's DynamoDB model; each call takes the fake's latency and is counted in `calls`, but for a
    write of an AMI's item, which is a ledger write of the fake EC2 (`ledger_call`: recorded in its
    `calls` as `ledger_update_item`, with its faults) as the fake ledger's own writes (DynamoDB's
    limits are not EC2's buckets: never throttled)."""

    def __init__(self, ec2: FakeEC2) -> None:
        self.ec2 = ec2
        self.calls: Counter[str] = Counter()
        self.items: dict[tuple[str, str], dict[str, Any]] = {}  # (pk, sk) -> item, but the AMIs'
        self._write_ids: dict[str, Any] = {}  # AMI id -> the write id its item holds (aws/ledger.py)

    def _validate(self, api: str, params: Mapping[str, Any]) -> None:
        report = self.ec2._validator.validate(params, _dynamodb_model().operation_model(api).input_shape)
        if report.has_errors():
            raise client_error("ValidationException", report.generate_report(), api)

    def _request(self, api: str, params: Mapping[str, Any]) -> None:
        self._validate(api, params)
        self.ec2.turn()
        self.calls[api] += 1
        self.ec2.elapsed += self.ec2.latency

    def _table(self, params: Mapping[str, Any], api: str) -> None:
        if params["TableName"] != self.ec2.ledger.table:
            raise client_error("ResourceNotFoundException", "Requested resource not found", api)

    @staticmethod
    def _image_id(item_key: Mapping[str, Any]) -> str | None:
        partition = str(item_key["pk"].get("S", ""))
        if partition.startswith("image#") and item_key["sk"].get("S") == "item":
            return partition.removeprefix("image#")
        return None

    def _stored(self, item_key: Mapping[str, Any]) -> dict[str, Any] | None:
        image_id = self._image_id(item_key)
        if image_id is None:
            return self.items.get((item_key["pk"]["S"], item_key["sk"]["S"]))
        item = self.ec2.ledger.items.get(image_id)
        if item is None:
            return None
        raw = _raw_item(item)
        if item.last_stage is not None:
            raw["last_stage"] = {"S": item.last_stage}
        if image_id in self._write_ids:
            raw[WRITE_ID_ATTRIBUTE] = self._write_ids[image_id]
        return raw

    def _store(self, item_key: Mapping[str, Any], raw: dict[str, Any]) -> None:
        image_id = self._image_id(item_key)
        if image_id is None:
            self.items[(item_key["pk"]["S"], item_key["sk"]["S"])] = raw
            return
        self.ec2.ledger.items[image_id] = read_ledger_item(raw)  # raises where the ledger could not read it
        if WRITE_ID_ATTRIBUTE in raw:
            self._write_ids[image_id] = raw[WRITE_ID_ATTRIBUTE]

    def get_item(self, **params: Any) -> dict[str, Any]:
        self._request("GetItem", params)
        self._table(params, "GetItem")
        stored = self._stored(params["Key"])
        return {"Item": copy.deepcopy(stored)} if stored is not None else {}

    def update_item(self, **params: Any) -> dict[str, Any]:
        """DynamoDB's UpdateItem with the expressions aws/ledger.py and aws/runs.py write: the item made
        where there is none, ConditionalCheckFailedException (the item as it was, with
        ReturnValuesOnConditionCheckFailure ALL_OLD) where the condition fails; ReturnValues NONE or
        ALL_NEW."""
        image_id = self._image_id(params["Key"])
        if image_id is None:
            self._request("UpdateItem", params)
            self._table(params, "UpdateItem")
            return self._update(params)
        self._validate("UpdateItem", params)
        self._table(params, "UpdateItem")
        lost, retried = self.ec2.ledger_call("ledger_update_item", image_id)
        answer = self._update(params)
        if lost:
            raise client_error("InternalServerError", "Internal server error", "UpdateItem")
        if retried:  # the SDK sends it again: the retry's answer is the caller's
            self.ec2.retrying = True
            try:
                return self._update(params)
            finally:
                self.ec2.retrying = False
        return answer

    def _update(self, params: Mapping[str, Any]) -> dict[str, Any]:
        item_key = params["Key"]
        if set(item_key) != {"pk", "sk"}:
            raise client_error(
                "ValidationException", "The provided key element does not match the schema", "UpdateItem"
            )
        names = params.get("ExpressionAttributeNames", {})
        values = params.get("ExpressionAttributeValues", {})
        stored = self._stored(item_key)
        current = stored if stored is not None else {}
        used: set[str] = set()
        try:
            condition = params.get("ConditionExpression")
            met = condition is None or dynamodb_expressions.holds(current, condition, names, values, used)
            new = dynamodb_expressions.update(
                {**current, **item_key}, params["UpdateExpression"], names, values, used, paths_checked=met
            )
        except (dynamodb_expressions.ExpressionError, dynamodb_expressions.InvalidPath) as error:
            raise client_error("ValidationException", str(error), "UpdateItem") from None
        unused = sorted({*names, *values} - used)
        if unused:
            raise client_error(
                "ValidationException",
                f"Value provided in the expression attributes unused: {unused}",
                "UpdateItem",
            )
        if not met:
            error = client_error(
                "ConditionalCheckFailedException", "The conditional request failed", "UpdateItem"
            )
            if stored is not None and params.get("ReturnValuesOnConditionCheckFailure") == "ALL_OLD":
                error.response["Item"] = copy.deepcopy(stored)  # type: ignore[typeddict-unknown-key]
            raise error
        returned = params.get("ReturnValues", "NONE")
        if returned not in ("NONE", "ALL_NEW"):
            raise client_error(
                "ValidationException", f"ReturnValues {returned} is not modelled", "UpdateItem"
            )
        self._store(item_key, new)
        return {"Attributes": copy.deepcopy(new)} if returned == "ALL_NEW" else {}

    def describe_table(self, **params: Any) -> dict[str, Any]:
        self._request("DescribeTable", params)
        table = self.ec2.ledger.table
        if params["TableName"] != table:
            raise client_error(
                "ResourceNotFoundException",
                f"Requested resource not found: Table: {params['TableName']}",
                "DescribeTable",
            )
        return {"Table": {"TableName": table, "TableStatus": "ACTIVE"}}

    def batch_get_item(self, **params: Any) -> dict[str, Any]:
        """The items of the ledger's AMIs asked for (at most 100 keys, as DynamoDB), all processed."""
        self._request("BatchGetItem", params)
        table = self.ec2.ledger.table
        requested = params["RequestItems"]
        if set(requested) != {table}:
            raise client_error("ResourceNotFoundException", "Requested resource not found", "BatchGetItem")
        keys = requested[table]["Keys"]
        if len(keys) > 100:
            raise client_error(
                "ValidationException", "Too many items requested for the BatchGetItem call", "BatchGetItem"
            )
        ids = [k["pk"]["S"].removeprefix("image#") for k in keys if k["pk"]["S"].startswith("image#")]
        found = self.ec2.ledger.read_items(ids)
        return {
            "Responses": {table: [_raw_item(item) for _, item in sorted(found.items())]},
            "UnprocessedKeys": {},
        }

    def scan(self, **params: Any) -> dict[str, Any]:
        """The ledger's items and its adoption record (aws/ledger.py's read_all), paged by Limit."""
        self._request("Scan", params)
        ledger = self.ec2.ledger
        if params["TableName"] != ledger.table:
            raise client_error("ResourceNotFoundException", "Requested resource not found", "Scan")
        raws = [_raw_item(item) for _, item in sorted(ledger.items.items())]
        raws += [copy.deepcopy(raw) for _, raw in sorted(self.items.items())]
        if ledger.adopted is not None:
            raws.insert(0, {**ADOPTION_KEY, "at": {"S": iso(ledger.adopted) or ""}})
        start = int(params.get("ExclusiveStartKey", {}).get("position", {}).get("N", "0"))
        end = start + int(params.get("Limit") or len(raws) or 1)
        page = raws[start:end]
        more = {"LastEvaluatedKey": {"position": {"N": str(end)}}} if end < len(raws) else {}
        return {"Items": page, "Count": len(page), "ScannedCount": len(page), **more}


def _raw_item(item: LedgerItem) -> dict[str, Any]:
    """A ledger item as the table stores it (aws/ledger.py reads it back with `_item`)."""
    data = item.model_dump(mode="json", exclude_none=True)
    raw = {
        **ledger_key(item.image_id),
        **{name: _serializer.serialize(value) for name, value in data.items() if name not in _STRING_SETS},
    }
    # The grants are string sets in the table (ADD and DELETE of their keys), and no set is empty there.
    raw.update({name: {"SS": sorted(data[name])} for name in _STRING_SETS if data.get(name)})
    return raw


_STRING_SETS = ("grants", "granting", "grants_found")
