"""The AWS adapter: one region's inventory, each source read at its API's largest page size.

Clients come in through RegionClients. When any reference source fails, the whole inventory becomes an
error (the planner then skips the region): no decision is ever taken on a partial inventory.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, UnknownEndpointError
from botocore.parsers import ResponseParserError

from ami_janitor.aws.errors import error_code
from ami_janitor.core import build_instance
from ami_janitor.core.model import (
    BuildInstance,
    Image,
    LaunchPermission,
    Reference,
    RegionInventory,
    RetiredSnapshot,
)
from ami_janitor.core.policy import RETIRED_FROM_TAG, Policy

if TYPE_CHECKING:
    from botocore.client import BaseClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ssm import SSMClient

    from ami_janitor.aws.clients import RegionClients

CALLED: list[str] = sorted(
    [
        "autoscaling:DescribeAutoScalingGroups",
        "autoscaling:DescribeLaunchConfigurations",
        "batch:DescribeComputeEnvironments",
        "ec2:DescribeFleets",
        "ec2:DescribeImageAttribute",
        "ec2:DescribeImageReferences",
        "ec2:DescribeImages",
        "ec2:DescribeInstances",
        "ec2:DescribeLaunchTemplateVersions",
        "ec2:DescribeLaunchTemplates",
        "ec2:DescribeSnapshots",
        "ec2:DescribeSpotFleetRequests",
        "elasticmapreduce:DescribeCluster",
        "elasticmapreduce:ListClusters",
        "elasticmapreduce:ListInstanceFleets",
        "elasticmapreduce:ListInstanceGroups",
        "rbin:ListRules",
        "ssm:DescribeParameters",
        "ssm:GetParameters",
    ]
)

# DescribeImageReferences with IncludeAllResourceTypes looks at those resources with the caller's own
# permissions (AmazonEC2ImageReferencesAccessPolicy): without these the call is refused and the region
# would be skipped.
IMAGE_REFERENCES_DEPENDENCIES: list[str] = [
    "imagebuilder:GetContainerRecipe",
    "imagebuilder:ListContainerRecipes",
    "imagebuilder:ListImageRecipes",
]
PERMISSIONS: list[str] = sorted(CALLED + IMAGE_REFERENCES_DEPENDENCIES)

# What load_images and describe_image call (the event-driven rotation reads only these).
IMAGE_PERMISSIONS: list[str] = ["ec2:DescribeImages", "ssm:GetParameters"]

Raw = Mapping[str, Any]
T = TypeVar("T")

ALIAS_PREFIX = "resolve:ssm:"
_AMI_ID = re.compile(r"\bami-[0-9a-f]+\b")
_LIVE_INSTANCE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]
# Fleet states that still hold capacity (cancelled_running and deleted_running keep their instances).
_SPOT_FLEET_STATES = frozenset({"submitted", "active", "modifying", "cancelled_running"})
_EC2_FLEET_STATES = frozenset({"submitted", "active", "modifying", "deleted_running"})
_EMR_LIVE_STATES = ["STARTING", "BOOTSTRAPPING", "RUNNING", "WAITING"]
_PARAMETER_BATCH = 10  # GetParameters takes at most 10 names
_IMAGE_REFERENCE_BATCH = 10  # DescribeImageReferences takes at most 10 image ids
_RECYCLE_BIN_TYPES = ("EC2_IMAGE", "EBS_SNAPSHOT")

_MALFORMED: tuple[type[Exception], ...] = (KeyError, TypeError, ValueError)
# How AWS says an operation does not exist here: EC2 (query protocol) answers InvalidAction or
# UnsupportedOperation, JSON and REST-JSON services UnknownOperationException. Only these make an
# optional source absent; a 5xx, an HTML page, a parse error or a bare status code is a failure.
_UNSUPPORTED_OPERATION_CODES = frozenset(
    {"InvalidAction", "UnsupportedOperation", "UnknownOperationException"}
)
# A client that cannot reach the service's endpoint at all: the partition has no such service.
_MISSING_ENDPOINT: tuple[type[Exception], ...] = (EndpointConnectionError, UnknownEndpointError)


# ---- errors ---------------------------------------------------------------------------------------


class _SourceFailed(Exception):
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
def _source(name: str) -> Iterator[None]:
    """Turns any AWS failure or malformed answer while reading `name` into one _SourceFailed."""
    try:
        yield
    except ClientError as error:
        message = str(error.response.get("Error", {}).get("Message") or error)
        raise _SourceFailed(
            name,
            error_code(error) or "Unknown",
            _short(message),
            unavailable=_is_unsupported_operation(error),
        ) from error
    except (BotoCoreError, ResponseParserError, NotImplementedError) as error:
        raise _SourceFailed(name, type(error).__name__, _short(str(error))) from error
    except _MALFORMED as error:
        raise _SourceFailed(name, "MalformedResponse", _short(f"{type(error).__name__}: {error}")) from error


# ---- small helpers --------------------------------------------------------------------------------


def _items(
    client: Any, operation: str, key: str, page_size: int | None = None, **params: Any
) -> Iterator[Raw]:
    """Every item of a paginated answer, at `page_size` per call (None: the API has no page size)."""
    config = {"PageSize": page_size} if page_size else {}
    for page in client.get_paginator(operation).paginate(**params, PaginationConfig=config):
        yield from page.get(key) or []


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _parameter_key(name: str) -> str:
    """A parameter's identity without selector and ARN prefix ('/a/b:3' and '...:parameter/a/b' -> 'a/b')."""
    if name.startswith("arn:"):
        base = ":".join(name.split(":")[:6])
        return base.split(":parameter", 1)[-1].lstrip("/")
    return name.split(":", 1)[0].lstrip("/")


def _parameter_batches(names: Iterable[str]) -> list[list[str]]:
    # One parameter per batch at most (by name, version or ARN): answers are matched back by name.
    batches: list[tuple[list[str], set[str]]] = []
    for name in names:
        key = _parameter_key(name)
        for batch, keys in batches:
            if len(batch) < _PARAMETER_BATCH and key not in keys:
                batch.append(name)
                keys.add(key)
                break
        else:
            batches.append(([name], {key}))
    return [batch for batch, _ in batches]


def _read_parameters(ssm: SSMClient, names: Iterable[str]) -> dict[str, Raw]:
    """Requested name (maybe 'name:version', 'name:label' or an ARN) -> parameter; absent ones are left out.

    Never decrypts: a SecureString is never read as an AMI id.
    """
    found: dict[str, Raw] = {}
    for batch in _parameter_batches(dict.fromkeys(names)):
        requested = {_parameter_key(name): name for name in batch}
        answer = ssm.get_parameters(Names=batch, WithDecryption=False)
        for parameter in answer.get("Parameters") or []:
            name = requested.get(_parameter_key(str(parameter["Name"])))
            if name is not None:
                found[name] = parameter
    return found


def _tag(raw: Raw, key: str) -> str | None:
    for tag in raw.get("Tags") or []:
        if tag.get("Key") == key:
            return str(tag.get("Value") or "")
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


# ---- what references an AMI -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Claim:
    """A resource naming an image value (an AMI id, a resolve:ssm: alias, or text holding AMI ids)."""

    value: str
    kind: str
    resource_id: str
    subject: str
    verb: str = "referenced by"


@dataclass(frozen=True)
class _Spec:
    """A launch template and version as an ASG, a fleet or Batch names it."""

    template_id: str | None
    template_name: str | None
    version: str

    @classmethod
    def of(cls, raw: Raw) -> _Spec:
        # EC2 and Auto Scaling spell it LaunchTemplateId; Batch spells it launchTemplateId.
        return cls(
            template_id=raw.get("LaunchTemplateId") or raw.get("launchTemplateId"),
            template_name=raw.get("LaunchTemplateName") or raw.get("launchTemplateName"),
            version=str(raw.get("Version") or raw.get("version") or "$Default"),
        )

    @property
    def label(self) -> str:
        return f"{self.template_id or self.template_name} version {self.version}"


@dataclass(frozen=True)
class _TemplateUse:
    kind: str
    resource_id: str
    subject: str
    spec: _Spec


@dataclass
class _Template:
    template_id: str
    name: str
    default: int | None = None
    latest: int | None = None


@dataclass
class _Templates:
    """The launch template versions loaded so far, and how a spec resolves to one of them."""

    by_id: dict[str, _Template] = field(default_factory=dict)
    # (template id, version) -> the version's ImageId ("" when it names none).
    image_of: dict[tuple[str, int], str] = field(default_factory=dict)
    # Specs of templates missing from the listing, fetched one by one: (id or name, version) -> key.
    by_spec: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)

    def add_template(self, raw: Raw) -> _Template:
        template = self._template(str(raw["LaunchTemplateId"]), str(raw.get("LaunchTemplateName") or ""))
        template.default = raw.get("DefaultVersionNumber")
        template.latest = raw.get("LatestVersionNumber")
        return template

    def add_version(self, raw: Raw) -> tuple[_Template, int, bool]:
        """Registers a version; the flag tells whether it was new."""
        template = self._template(str(raw["LaunchTemplateId"]), str(raw.get("LaunchTemplateName") or ""))
        number = int(raw["VersionNumber"])
        if raw.get("DefaultVersion"):
            template.default = number
        key = (template.template_id, number)
        new = key not in self.image_of
        self.image_of[key] = str((raw.get("LaunchTemplateData") or {}).get("ImageId") or "")
        return template, number, new

    def _template(self, template_id: str, name: str) -> _Template:
        if template_id not in self.by_id:
            self.by_id[template_id] = _Template(template_id, name)
        return self.by_id[template_id]

    def template_id(self, spec: _Spec) -> str | None:
        if spec.template_id:
            return spec.template_id if spec.template_id in self.by_id else None
        return next((t.template_id for t in self.by_id.values() if t.name == spec.template_name), None)

    def number(self, template_id: str, version: str) -> int | None:
        template = self.by_id[template_id]
        if version == "$Default":
            return template.default
        if version == "$Latest":
            return template.latest
        return int(version) if version.isdigit() else None

    def locate(self, spec: _Spec) -> tuple[str, int] | None:
        fetched = self.by_spec.get((spec.template_id or spec.template_name or "", spec.version))
        if fetched is not None:
            return fetched
        template_id = self.template_id(spec)
        number = self.number(template_id, spec.version) if template_id else None
        if template_id is None or number is None or (template_id, number) not in self.image_of:
            return None
        return template_id, number


@dataclass(frozen=True)
class _Pointers:
    """The policy's Latest pointer parameters in this region (read into `parameters`, never references)."""

    names: frozenset[str]
    patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def of(cls, policy: Policy, images: Iterable[Image]) -> _Pointers:
        names: set[str] = set()
        patterns: list[re.Pattern[str]] = []
        for family in policy.families:
            template = family.latest.ssm_parameter if family.latest else None
            if template is None:
                continue
            patterns.append(re.compile(re.escape(template).replace(re.escape("{arch}"), "[^/]+")))
            if "{arch}" not in template:
                names.add(template)
                continue
            names.update(
                template.replace("{arch}", image.architecture)
                for image in images
                if family.match.matches(image.name, image.tags)
            )
        return cls(frozenset(names), tuple(patterns))

    def owns(self, name: str) -> bool:
        # The planner decides Latest from `parameters` after this run's rotation, not from the old value.
        return any(pattern.fullmatch(name) for pattern in self.patterns)


# ---- the region inventory -------------------------------------------------------------------------


def load_inventory(clients: RegionClients, policy: Policy) -> RegionInventory:
    """Everything the planner needs about one region, or an inventory with only `error` set."""
    try:
        return _Loader(clients, policy).load()
    except _SourceFailed as failure:
        return RegionInventory(region=clients.region, error=str(failure))


def load_images(clients: RegionClients, policy: Policy) -> RegionInventory:
    """Only the AMIs and the Latest pointer values: enough for rotation, cheap enough for every event."""
    try:
        return _Loader(clients, policy).load_images()
    except _SourceFailed as failure:
        return RegionInventory(region=clients.region, error=str(failure))


def describe_image(clients: RegionClients, image_id: str) -> Image | None:
    """One self-owned AMI in any state (disabled included), or None where the region has no such AMI."""
    try:
        answer = clients.ec2.describe_images(
            ImageIds=[image_id], Owners=["self"], IncludeDeprecated=True, IncludeDisabled=True
        )
    except ClientError as error:
        if error_code(error).startswith("InvalidAMIID."):
            return None
        raise
    raws = answer.get("Images") or []
    return Image.from_api(clients.region, dict(raws[0])) if raws else None


class _Loader:
    def __init__(self, clients: RegionClients, policy: Policy) -> None:
        self.clients = clients
        self.policy = policy
        self.region = clients.region
        self.notes: list[str] = []
        self.claims: list[_Claim] = []
        self.template_uses: list[_TemplateUse] = []
        self.templates = _Templates()
        self.live_instances: set[str] = set()
        self.build_instances: list[BuildInstance] = []
        self.baked_families = [family for family in policy.families if family.bake is not None]
        self.parameter_values: dict[str, str] = {}
        self.launch_configurations: dict[str, str] = {}

    def load(self) -> RegionInventory:
        images = self._images()
        pointers = _Pointers.of(self.policy, images)
        self._instances()
        self._ssm_parameters(pointers)
        self._launch_templates()
        self._launch_configurations()
        self._auto_scaling_groups()
        self._spot_fleets()
        self._ec2_fleets()
        self._batch_compute_environments()
        self._emr_clusters()
        self._template_claims()
        references = self._references()
        references += self._image_references(self._family_image_ids(images), references, pointers)
        parameters = self._pointer_values(pointers)
        retired_snapshots = self._retired_snapshots()
        recycle_bin_rules = self._recycle_bin_rules()
        return RegionInventory(
            region=self.region,
            images=tuple(sorted(images, key=lambda image: image.image_id)),
            references=tuple(sorted(references, key=lambda r: (r.image_id, r.kind, r.resource_id, r.detail))),
            build_instances=tuple(sorted(self.build_instances, key=lambda i: i.instance_id)),
            parameters=parameters,
            retired_snapshots=retired_snapshots,
            recycle_bin_rules=recycle_bin_rules,
            notes=tuple(dict.fromkeys(self.notes)),
        )

    def load_images(self) -> RegionInventory:
        images = self._images()
        return RegionInventory(
            region=self.region,
            images=tuple(sorted(images, key=lambda image: image.image_id)),
            parameters=self._pointer_values(_Pointers.of(self.policy, images)),
        )

    def _note(self, text: str) -> None:
        self.notes.append(text)

    def _claim(
        self, value: Any, kind: str, resource_id: str, subject: str, verb: str = "referenced by"
    ) -> None:
        if value:
            self.claims.append(_Claim(str(value), kind, resource_id, subject, verb))

    def _use_template(self, kind: str, resource_id: str, subject: str, raw_spec: Raw | None) -> None:
        spec = _Spec.of(raw_spec) if raw_spec else None
        if spec is not None and (spec.template_id or spec.template_name):
            self.template_uses.append(_TemplateUse(kind, resource_id, subject, spec))

    def _optional(
        self, source: str, load: Callable[[], T], note: str, *, endpoint_may_lack: bool = False
    ) -> T | None:
        """A source that may not exist here: an explicit unsupported-operation answer (or, where the
        service may lack an endpoint, no endpoint) is a note; any other failure skips the region."""
        try:
            with _source(source):
                return load()
        except _SourceFailed as failure:
            missing_endpoint = endpoint_may_lack and isinstance(failure.__cause__, _MISSING_ENDPOINT)
            if not (failure.unavailable or missing_endpoint):
                raise
            self._note(note)
            return None

    # -- images ------------------------------------------------------------------------------------

    def _images(self) -> list[Image]:
        # All self-owned AMIs, not only the families': the executor needs every AMI's snapshots.
        with _source("ec2:DescribeImages"):
            raws = _items(
                self.clients.ec2,
                "describe_images",
                "Images",
                1000,
                Owners=["self"],
                IncludeDeprecated=True,
                IncludeDisabled=True,
            )
            return [Image.from_api(self.region, dict(raw)) for raw in raws]

    def _family_image_ids(self, images: Iterable[Image]) -> list[str]:
        return sorted(
            image.image_id
            for image in images
            if any(family.match.matches(image.name, image.tags) for family in self.policy.families)
        )

    # -- instances ---------------------------------------------------------------------------------

    def _instances(self) -> None:
        state_filter = [{"Name": "instance-state-name", "Values": _LIVE_INSTANCE_STATES}]
        with _source("ec2:DescribeInstances"):
            for reservation in _items(
                self.clients.ec2, "describe_instances", "Reservations", 1000, Filters=state_filter
            ):
                for instance in reservation.get("Instances") or []:
                    self._instance(instance)

    def _instance(self, instance: Raw) -> None:
        instance_id = str(instance["InstanceId"])
        state = str((instance.get("State") or {}).get("Name") or "unknown")
        if state == "terminated":
            return
        self.live_instances.add(instance_id)
        self._build_instance(instance_id, instance)
        name = _tag(instance, "Name")
        label = f"{name}, {state}" if name else state
        self._claim(
            instance.get("ImageId"), "instance", instance_id, f"instance {instance_id} ({label})", "used by"
        )

    def _build_instance(self, instance_id: str, instance: Raw) -> None:
        """Keeps an instance some family's bake names, so the plan can say what a bake would image."""
        tags = {str(t.get("Key")): str(t.get("Value") or "") for t in instance.get("Tags") or []}
        if any(build_instance.is_named_by(f, instance_id, tags) for f in self.baked_families):
            self.build_instances.append(BuildInstance.from_api(dict(instance)))

    # -- SSM parameters ----------------------------------------------------------------------------

    def _ssm_parameters(self, pointers: _Pointers) -> None:
        type_filter = [{"Key": "Type", "Option": "Equals", "Values": ["String", "StringList"]}]
        with _source("ssm:DescribeParameters"):
            names = [
                str(raw["Name"])
                for raw in _items(
                    self.clients.ssm, "describe_parameters", "Parameters", 50, ParameterFilters=type_filter
                )
                if raw.get("Type") in ("String", "StringList")
            ]
        with _source("ssm:GetParameters"):
            found = _read_parameters(self.clients.ssm, names)
        for name, parameter in sorted(found.items()):
            value = str(parameter.get("Value") or "")
            self.parameter_values[name] = value
            if not pointers.owns(name):
                # Any AMI id in the value counts (a StringList element, or an id inside a config blob).
                self._claim(value, "ssm-parameter", name, f"SSM parameter {name}", "value of")

    def _pointer_values(self, pointers: _Pointers) -> dict[str, str]:
        values = {
            name: self.parameter_values[name] for name in pointers.names if name in self.parameter_values
        }
        missing = sorted(pointers.names - values.keys())
        with _source("ssm:GetParameters"):
            for name, parameter in _read_parameters(self.clients.ssm, missing).items():
                if parameter.get("Type") != "SecureString":
                    values[name] = str(parameter.get("Value") or "")
        return dict(sorted(values.items()))

    def _resolve_aliases(self, aliases: Iterable[str]) -> dict[str, str]:
        """resolve:ssm: alias -> the parameter's value (the scan already holds most of them)."""
        resolved: dict[str, str] = {}
        to_read: list[str] = []
        for alias in sorted(aliases):
            name = alias.removeprefix(ALIAS_PREFIX)
            if name in self.parameter_values:
                resolved[alias] = self.parameter_values[name]
            else:
                to_read.append(name)
        with _source("ssm:GetParameters"):
            for name, parameter in _read_parameters(self.clients.ssm, to_read).items():
                resolved[ALIAS_PREFIX + name] = str(parameter.get("Value") or "")
        return resolved

    # -- launch templates --------------------------------------------------------------------------

    def _launch_templates(self) -> None:
        mode = self.policy.references.launch_template_versions
        if mode == "default-and-latest":
            self._default_and_latest_versions()
            return
        templates = self._list_templates()
        with _source("ec2:DescribeLaunchTemplateVersions"):
            if mode == "all":
                for template in templates:
                    self._load_versions(LaunchTemplateId=template.template_id)
            else:
                for template in templates:
                    self._newest_versions(template, int(mode))
                loaded = self.templates.image_of
                if any(t.default is not None and (t.template_id, t.default) not in loaded for t in templates):
                    # One account-wide listing beats one call per template whose default is old.
                    self._load_versions(Versions=["$Default"])

    def _list_templates(self) -> list[_Template]:
        with _source("ec2:DescribeLaunchTemplates"):
            raws = _items(self.clients.ec2, "describe_launch_templates", "LaunchTemplates", 200)
            return [self.templates.add_template(raw) for raw in raws]

    def _load_versions(self, **params: Any) -> list[int]:
        """Loads versions (and claims their images); returns the numbers of the new ones."""
        raws = _items(
            self.clients.ec2, "describe_launch_template_versions", "LaunchTemplateVersions", 200, **params
        )
        return [number for raw in raws if (number := self._template_version(raw)) is not None]

    def _template_version(self, raw: Raw) -> int | None:
        template, number, new = self.templates.add_version(raw)
        if not new:
            return None
        image = self.templates.image_of[(template.template_id, number)]
        subject = f"launch template {template.template_id} ({template.name}) version {number}"
        self._claim(image, "launch-template", template.template_id, subject)
        return number

    def _default_and_latest_versions(self) -> None:
        # Without a template id the API lists $Latest and $Default of every template in one paginated call.
        with _source("ec2:DescribeLaunchTemplateVersions"):
            self._load_versions(Versions=["$Latest", "$Default"])
        for template_id, number in self.templates.image_of:
            template = self.templates.by_id[template_id]
            template.latest = max(template.latest or 0, number)

    def _newest_versions(self, template: _Template, count: int) -> None:
        """Loads the `count` newest existing versions of the template."""
        latest = template.latest or 0
        if latest < 1:
            return
        low = max(1, latest - count + 1)
        found = self._version_range(template, low, latest, count)
        if found < count and low > 1:
            # Some of the newest versions were deleted: reach further back, once.
            self._version_range(template, 1, low - 1, count - found)

    def _version_range(self, template: _Template, low: int, high: int, keep: int) -> int:
        """Loads the `keep` newest versions numbered low..high; returns how many there were."""
        raws = list(
            _items(
                self.clients.ec2,
                "describe_launch_template_versions",
                "LaunchTemplateVersions",
                200,
                LaunchTemplateId=template.template_id,
                MinVersion=str(low),
                MaxVersion=str(high),
            )
        )
        newest = sorted(raws, key=lambda raw: int(raw["VersionNumber"]), reverse=True)[:keep]
        # The default came along in the answer: keep it too, rather than ask for it again.
        default = [raw for raw in raws if raw.get("DefaultVersion") and raw not in newest]
        for raw in newest + default:
            self._template_version(raw)
        return len(newest)

    def _fetch_missing_versions(self, specs: Iterable[_Spec]) -> None:
        """Loads the versions that specs name and no listing covered (a pinned old version, say)."""
        numbers: dict[str, set[int]] = {}
        unknown: set[_Spec] = set()
        for spec in specs:
            if self.templates.locate(spec) is not None:
                continue
            template_id = self.templates.template_id(spec)
            number = self.templates.number(template_id, spec.version) if template_id else None
            if template_id is not None and number is not None:
                numbers.setdefault(template_id, set()).add(number)
            else:
                unknown.add(spec)
        for template_id, wanted in sorted(numbers.items()):
            for raw in self._fetch_versions(
                {"LaunchTemplateId": template_id}, [str(n) for n in sorted(wanted)]
            ):
                self.templates.add_version(raw)
        for spec in sorted(unknown, key=lambda s: (s.template_id or "", s.template_name or "", s.version)):
            self._fetch_unknown(spec)

    def _fetch_unknown(self, spec: _Spec) -> None:
        # A template absent from the listing (created meanwhile, or gone): ask for exactly what the spec says.
        where = (
            {"LaunchTemplateId": spec.template_id}
            if spec.template_id
            else {"LaunchTemplateName": spec.template_name}
        )
        for raw in self._fetch_versions(where, [spec.version]):
            template, number, _ = self.templates.add_version(raw)
            self.templates.by_spec[(spec.template_id or spec.template_name or "", spec.version)] = (
                template.template_id,
                number,
            )

    def _fetch_versions(self, where: dict[str, Any], versions: list[str]) -> list[Raw]:
        """The versions asked for; a missing template or version is simply absent from the answer."""
        raws: list[Raw] = []
        for chunk in _chunks(versions, 200):
            try:
                ec2 = self.clients.ec2
                raws += _items(
                    ec2,
                    "describe_launch_template_versions",
                    "LaunchTemplateVersions",
                    None,
                    Versions=chunk,
                    **where,
                )
            except ClientError as error:
                if not error_code(error).startswith("InvalidLaunchTemplate"):
                    raise
                # One missing version fails the whole call: ask for the others one by one.
                if len(chunk) > 1:
                    raws += [raw for version in chunk for raw in self._fetch_versions(where, [version])]
        return raws

    def _template_claims(self) -> None:
        with _source("ec2:DescribeLaunchTemplateVersions"):
            self._fetch_missing_versions(use.spec for use in self.template_uses)
        for use in self.template_uses:
            located = self.templates.locate(use.spec)
            if located is None:
                self._note(f"{use.subject} names launch template {use.spec.label}, which does not exist")
                continue
            template_id, number = located
            subject = f"{use.subject} (launch template {template_id} version {number})"
            self._claim(self.templates.image_of[located], use.kind, use.resource_id, subject)

    # -- Auto Scaling ------------------------------------------------------------------------------

    def _launch_configurations(self) -> None:
        with _source("autoscaling:DescribeLaunchConfigurations"):
            for raw in _items(
                self.clients.autoscaling, "describe_launch_configurations", "LaunchConfigurations", 100
            ):
                name = str(raw["LaunchConfigurationName"])
                self.launch_configurations[name] = str(raw.get("ImageId") or "")
                self._claim(raw.get("ImageId"), "launch-configuration", name, f"launch configuration {name}")

    def _auto_scaling_groups(self) -> None:
        with _source("autoscaling:DescribeAutoScalingGroups"):
            for group in _items(
                self.clients.autoscaling, "describe_auto_scaling_groups", "AutoScalingGroups", 100
            ):
                self._auto_scaling_group(group)

    def _auto_scaling_group(self, group: Raw) -> None:
        name = str(group["AutoScalingGroupName"])
        kind, subject = "auto-scaling-group", f"Auto Scaling group {name}"
        self._use_template(kind, name, subject, group.get("LaunchTemplate"))
        mixed = (group.get("MixedInstancesPolicy") or {}).get("LaunchTemplate") or {}
        self._use_template(kind, name, subject, mixed.get("LaunchTemplateSpecification"))
        for override in mixed.get("Overrides") or []:
            self._use_template(kind, name, subject, override.get("LaunchTemplateSpecification"))
            self._claim(override.get("ImageId"), kind, name, f"{subject} (mixed instances override)")
        configuration = group.get("LaunchConfigurationName")
        if configuration:
            image = self.launch_configurations.get(configuration)
            self._claim(image, kind, name, f"{subject} (launch configuration {configuration})")

    # -- fleets, Batch, EMR ------------------------------------------------------------------------

    def _spot_fleets(self) -> None:
        with _source("ec2:DescribeSpotFleetRequests"):
            for request in _items(
                self.clients.ec2, "describe_spot_fleet_requests", "SpotFleetRequestConfigs", 1000
            ):
                if request.get("SpotFleetRequestState") in _SPOT_FLEET_STATES:
                    request_id = str(request["SpotFleetRequestId"])
                    config = request.get("SpotFleetRequestConfig") or {}
                    subject = f"Spot Fleet request {request_id}"
                    for spec in config.get("LaunchSpecifications") or []:
                        self._claim(spec.get("ImageId"), "spot-fleet", request_id, subject)
                    self._launch_template_configs("spot-fleet", request_id, subject, config)

    def _ec2_fleets(self) -> None:
        with _source("ec2:DescribeFleets"):
            for fleet in _items(self.clients.ec2, "describe_fleets", "Fleets", 1000):
                if fleet.get("FleetState") in _EC2_FLEET_STATES:
                    fleet_id = str(fleet["FleetId"])
                    self._launch_template_configs("ec2-fleet", fleet_id, f"EC2 Fleet {fleet_id}", fleet)

    def _launch_template_configs(self, kind: str, resource_id: str, subject: str, config: Raw) -> None:
        for template_config in config.get("LaunchTemplateConfigs") or []:
            self._use_template(kind, resource_id, subject, template_config.get("LaunchTemplateSpecification"))
            for override in template_config.get("Overrides") or []:
                self._claim(override.get("ImageId"), kind, resource_id, f"{subject} (override)")

    def _batch_compute_environments(self) -> None:
        with _source("batch:DescribeComputeEnvironments"):
            for environment in _items(
                self.clients.batch, "describe_compute_environments", "computeEnvironments", 100
            ):
                self._batch_compute_environment(environment)

    def _batch_compute_environment(self, environment: Raw) -> None:
        name = str(environment["computeEnvironmentName"])
        kind, subject = "batch-compute-environment", f"Batch compute environment {name}"
        resources = environment.get("computeResources") or {}
        self._claim(resources.get("imageId"), kind, name, f"{subject} (imageId)")
        for configuration in resources.get("ec2Configuration") or []:
            image_type = configuration.get("imageType") or "ec2Configuration"
            self._claim(
                configuration.get("imageIdOverride"), kind, name, f"{subject} ({image_type} imageIdOverride)"
            )
        template = resources.get("launchTemplate") or {}
        self._use_template(kind, name, subject, template)
        for override in template.get("overrides") or []:
            self._use_template(kind, name, subject, override)

    def _emr_clusters(self) -> None:
        emr = self.clients.emr
        with _source("elasticmapreduce:ListClusters"):
            cluster_ids = [
                str(c["Id"]) for c in _items(emr, "list_clusters", "Clusters", ClusterStates=_EMR_LIVE_STATES)
            ]
        for cluster_id in cluster_ids:
            with _source("elasticmapreduce:DescribeCluster"):
                cluster = emr.describe_cluster(ClusterId=cluster_id)["Cluster"]
            self._emr_cluster(cluster_id, cluster)

    def _emr_cluster(self, cluster_id: str, cluster: Raw) -> None:
        emr, kind, subject = self.clients.emr, "emr-cluster", f"EMR cluster {cluster_id}"
        cluster_ami = cluster.get("CustomAmiId")
        self._claim(cluster_ami, kind, cluster_id, f"{subject} (CustomAmiId)")
        if cluster.get("InstanceCollectionType") == "INSTANCE_FLEET":
            with _source("elasticmapreduce:ListInstanceFleets"):
                for fleet in _items(emr, "list_instance_fleets", "InstanceFleets", ClusterId=cluster_id):
                    for spec in fleet.get("InstanceTypeSpecifications") or []:
                        if spec.get("CustomAmiId") != cluster_ami:
                            detail = f"{subject} (instance fleet {fleet.get('Id')} CustomAmiId)"
                            self._claim(spec.get("CustomAmiId"), kind, cluster_id, detail)
            return
        with _source("elasticmapreduce:ListInstanceGroups"):
            for group in _items(emr, "list_instance_groups", "InstanceGroups", ClusterId=cluster_id):
                if group.get("CustomAmiId") != cluster_ami:
                    detail = f"{subject} (instance group {group.get('Id')} CustomAmiId)"
                    self._claim(group.get("CustomAmiId"), kind, cluster_id, detail)

    # -- claims to references ----------------------------------------------------------------------

    def _references(self) -> list[Reference]:
        resolved = self._resolve_aliases({c.value for c in self.claims if c.value.startswith(ALIAS_PREFIX)})
        references: dict[tuple[str, str, str, str], Reference] = {}
        for claim in self.claims:
            if claim.value.startswith(ALIAS_PREFIX):
                target = resolved.get(claim.value)
                if target is None:
                    missing = "a parameter that does not exist or cannot be read"
                    self._note(f"{claim.subject} names {claim.value}, {missing}")
                    continue
                detail = f"{claim.subject} resolves {claim.value} to it"
            else:
                target, detail = claim.value, f"{claim.verb} {claim.subject}"
            for image_id in _AMI_ID.findall(target):
                key = (image_id, claim.kind, claim.resource_id, detail)
                references[key] = Reference(
                    image_id=image_id, kind=claim.kind, resource_id=claim.resource_id, detail=detail
                )
        return list(references.values())

    def _image_references(
        self, image_ids: list[str], known: list[Reference], pointers: _Pointers
    ) -> list[Reference]:
        """What DescribeImageReferences adds to the other sources (Image Builder recipes, mostly)."""
        if not image_ids:
            return []
        note = f"DescribeImageReferences is not available in {self.region}; "
        note += "the other reference sources were used"
        items = self._optional(
            "ec2:DescribeImageReferences", lambda: list(self._image_reference_items(image_ids)), note
        )
        seen = {(r.image_id, r.kind, r.resource_id) for r in known}
        references: list[Reference] = []
        for item in items or []:
            kind, resource_id = self._reference_target(
                str(item.get("ResourceType") or ""), str(item.get("Arn") or "")
            )
            image_id = str(item.get("ImageId") or "")
            if kind == "instance" and resource_id not in self.live_instances:
                continue  # the API also reports terminated instances
            key = (image_id, kind, resource_id)
            if key in seen or (kind == "ssm-parameter" and pointers.owns(resource_id)):
                continue
            seen.add(key)
            verb = "used by" if kind == "instance" else "referenced by"
            detail = f"{verb} {item.get('ResourceType')} {resource_id} (DescribeImageReferences)"
            references.append(Reference(image_id=image_id, kind=kind, resource_id=resource_id, detail=detail))
        return references

    def _image_reference_items(self, image_ids: list[str]) -> Iterator[Raw]:
        for batch in _chunks(image_ids, _IMAGE_REFERENCE_BATCH):
            # No MaxResults: the API documents no maximum, and a wrong guess would fail every region.
            yield from _items(
                self.clients.ec2,
                "describe_image_references",
                "ImageReferences",
                None,
                ImageIds=batch,
                IncludeAllResourceTypes=True,
            )

    def _reference_target(self, resource_type: str, arn: str) -> tuple[str, str]:
        """(kind, resource id) of a DescribeImageReferences item, named like the other sources name them."""
        resource = arn.split(":", 5)[5] if arn.count(":") >= 5 else arn
        path = resource.split("/", 1)[1] if "/" in resource else resource
        if resource_type == "ec2:Instance":
            return "instance", path
        if resource_type == "ec2:LaunchTemplate":
            return "launch-template", path.split("/", 1)[0]
        if resource_type == "ssm:Parameter":
            # An ARN drops a name's leading '/': use the name the parameter scan saw.
            if path in self.parameter_values and f"/{path}" not in self.parameter_values:
                return "ssm-parameter", path
            return "ssm-parameter", f"/{path}"
        if resource_type.startswith("imagebuilder:"):
            return "image-builder-recipe", arn
        return resource_type, arn

    # -- snapshots and Recycle Bin -----------------------------------------------------------------

    def _retired_snapshots(self) -> tuple[RetiredSnapshot, ...]:
        tag_filter = [{"Name": "tag-key", "Values": [RETIRED_FROM_TAG]}]
        with _source("ec2:DescribeSnapshots"):
            raws = _items(
                self.clients.ec2,
                "describe_snapshots",
                "Snapshots",
                1000,
                OwnerIds=["self"],
                Filters=tag_filter,
            )
            retired = [
                RetiredSnapshot(
                    snapshot_id=str(raw["SnapshotId"]), image_id=_tag(raw, RETIRED_FROM_TAG) or ""
                )
                for raw in raws
            ]
        return tuple(sorted(retired, key=lambda s: s.snapshot_id))

    def _recycle_bin_rules(self) -> tuple[str, ...]:
        note = f"Recycle Bin is not available in {self.region}; freed storage assumes no retention rule"
        rules = self._optional("rbin:ListRules", self._list_recycle_bin_rules, note, endpoint_may_lack=True)
        return tuple(rules or ())

    def _list_recycle_bin_rules(self) -> list[str]:
        lines: list[str] = []
        for resource_type in _RECYCLE_BIN_TYPES:
            for rule in _items(self.clients.rbin, "list_rules", "Rules", 1000, ResourceType=resource_type):
                period = rule.get("RetentionPeriod") or {}
                unit = str(period.get("RetentionPeriodUnit") or "DAYS").lower()
                line = f"Recycle Bin rule {rule.get('Identifier')} retains {resource_type} for "
                line += f"{period.get('RetentionPeriodValue')} {unit}"
                lines.append(line + (" (locked)" if rule.get("LockState") == "locked" else ""))
        return sorted(lines)


# ---- launch permissions (one call per AMI: only for the AMIs a decision needs) ---------------------


def load_launch_permissions(
    clients: RegionClients, inventory: RegionInventory, image_ids: Iterable[str]
) -> RegionInventory:
    """The inventory with `launch_permissions` loaded for those of `image_ids` it holds."""
    if inventory.error is not None:
        return inventory
    wanted = set(image_ids)
    permissions: dict[str, tuple[LaunchPermission, ...]] = {}
    try:
        with _source("ec2:DescribeImageAttribute"):
            for image in inventory.images:
                if image.image_id in wanted and image.image_id not in permissions:
                    permissions[image.image_id] = read_launch_permissions(clients.ec2, image.image_id)
    except _SourceFailed as failure:
        return RegionInventory(region=inventory.region, notes=inventory.notes, error=str(failure))
    images = tuple(
        image.model_copy(update={"launch_permissions": permissions[image.image_id]})
        if image.image_id in permissions
        else image
        for image in inventory.images
    )
    return inventory.model_copy(update={"images": images})


def read_launch_permissions(ec2: EC2Client, image_id: str) -> tuple[LaunchPermission, ...]:
    """One AMI's launch permissions (DescribeImageAttribute: one call per AMI); () once it is gone."""
    try:
        answer = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    except ClientError as error:
        if error_code(error).startswith("InvalidAMIID."):
            return ()  # deregistered since the inventory: nothing is shared any more
        raise
    return tuple(
        LaunchPermission.from_api({k: str(v) for k, v in p.items()})
        for p in answer.get("LaunchPermissions") or []
    )
