"""The policy file: pydantic models, loading, and error messages that name the key path."""

# Annotations evaluated when the module runs (no `from __future__ import annotations`): pydantic
# would otherwise compile and evaluate each field's annotation string at every cold start.

import bisect
import fnmatch
import functools
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ami_janitor.core.validation import describe_validation_error

# The characters EC2 allows in an AMI's name (CreateImage, RegisterImage, CopyImage), and how many.
AMI_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789()[] ./-'@_")
AMI_NAME_LENGTH = (3, 128)
JANITOR_TAG_PREFIX = "ami-janitor:"
CANDIDATE_TAG = "ami-janitor:candidate-since"
PRIOR_DEPRECATION_TAG = "ami-janitor:prior-deprecation"
PRIOR_PERMISSIONS_TAG = "ami-janitor:prior-launch-permissions"
SHARED_BY_JANITOR_TAG = "ami-janitor:shared"
RETIRED_FROM_TAG = "ami-janitor:retired-from"
SOURCE_IMAGE_TAG = "ami-janitor:source-image"
SOURCE_REGION_TAG = "ami-janitor:source-region"
SOURCE_CREATED_TAG = "ami-janitor:source-created"
COPY_GENERATION_TAG_PREFIX = "ami-janitor:copy-generation:"
DEFAULT_CONFIG_PATH = "janitor.yaml"
# A hundred years: any count of days above it is a typo, and dates that far away overflow.
MAX_DAYS = 36_500
DEFAULT_LEDGER_TABLE = "ami-janitor-ledger"

# What the deployed functions do: nothing (paused), say what they would do (dry-run), or act (enforce).
Mode = Literal["dry-run", "enforce", "paused"]

# Python's patterns: `\Z` ends the text (`$` also matches before a last newline), `[0-9]` is an ASCII
# digit (`\d` any Unicode digit). pydantic's `pattern`s are Rust's, where `$` ends the text. Those only
# some policies need are compiled at their first use (`re.match` keeps them), not at every cold start.
_REGION_RE = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]\Z")
_ACCOUNT = r"^[0-9]{12}\Z"
_KMS_ARN = r"^arn:aws[a-z-]*:kms:(?P<region>[a-z0-9-]+):[0-9]{12}:"
_KEY_ARN = _KMS_ARN + r"key/[A-Za-z0-9-]+\Z"
# Alias names: alias/ then letters, digits, '/', '_', '-' (alias/aws/ is reserved for AWS managed keys).
_ALIAS_NAME = r"alias/(?!aws/)[A-Za-z0-9/_-]+"
_ALIAS = f"^{_ALIAS_NAME}\\Z"
# s3://bucket or s3://bucket/prefix (S3 bucket names: 3-63 of lowercase letters, digits, '.', '-').
_INBOX_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9!_.*'()/-]*)?$"
_ALIAS_ARN = _KMS_ARN + f"(?P<alias>{_ALIAS_NAME})\\Z"
# EC2's image architectures (ArchitectureValues): what `{arch}` in a Latest SSM parameter becomes.
ARCHITECTURES = ("i386", "x86_64", "arm64", "x86_64_mac", "arm64_mac")


# The tags the janitor writes on AMIs (mirrors of its ledger, and of its copies and bakes); a long value
# goes on in `KEY:2`, `KEY:3`... keys.
_WRITTEN_TAGS = frozenset(
    {
        CANDIDATE_TAG,
        PRIOR_DEPRECATION_TAG,
        PRIOR_PERMISSIONS_TAG,
        SHARED_BY_JANITOR_TAG,
        RETIRED_FROM_TAG,
        SOURCE_IMAGE_TAG,
        SOURCE_REGION_TAG,
        SOURCE_CREATED_TAG,
        f"{JANITOR_TAG_PREFIX}baked-from",
    }
)


def _written_by_the_janitor(key: str) -> bool:
    if key.startswith(COPY_GENERATION_TAG_PREFIX) or key in _WRITTEN_TAGS:
        return True
    base, _, number = key.rpartition(":")
    return base in _WRITTEN_TAGS and number.isascii() and number.isdigit()


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the key path and the reason."""


# A part of one parent model (Family or Policy), validated only inside it: its schema is built with the
# parent's, not on its own as well.
_IN_ITS_PARENT = ConfigDict(defer_build=True)


class _Strict(BaseModel):
    # Values are taken as written: a bool, a string or a float never becomes an int, nor a bool or a
    # string a float, nor a number a string or a bool. An int is a float (`max_fraction_per_family: 1`).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Lifecycle(_Strict):
    """Days since the AMI first became a candidate; null skips the stage."""

    deprecate_after_days: int | None = Field(0, ge=0, le=MAX_DAYS)
    disable_after_days: int | None = Field(7, ge=0, le=MAX_DAYS)
    deregister_after_days: int | None = Field(14, ge=0, le=MAX_DAYS)

    @model_validator(mode="after")
    def _ordered(self) -> "Lifecycle":
        days = [d for d in self.stage_days() if d[1] is not None]
        for (earlier, a), (later, b) in itertools.pairwise(days):
            if a is not None and b is not None and b < a:
                raise ValueError(f"{later}_after_days ({b}) must be >= {earlier}_after_days ({a})")
        return self

    def stage_days(self) -> list[tuple[str, int | None]]:
        return [
            ("deprecate", self.deprecate_after_days),
            ("disable", self.disable_after_days),
            ("deregister", self.deregister_after_days),
        ]


class LifecycleOverride(_Strict):
    model_config = _IN_ITS_PARENT

    deprecate_after_days: int | None = Field(None, ge=0, le=MAX_DAYS)
    disable_after_days: int | None = Field(None, ge=0, le=MAX_DAYS)
    deregister_after_days: int | None = Field(None, ge=0, le=MAX_DAYS)


class Limits(_Strict):
    max_actions_per_run: int = Field(50, ge=0)
    max_fraction_per_family: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False)


class FamilyLimits(_Strict):
    model_config = _IN_ITS_PARENT

    max_fraction_per_family: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_region_budget(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_actions_per_run" in data:
            raise ValueError(
                "max_actions_per_run is a budget of each region's run, shared by its families: set it "
                "in defaults.limits"
            )
        return data


class Rules(_Strict):
    """The retention rules of `defaults`, and of a family once its overrides are merged."""

    keep_latest: int = Field(3, ge=1)
    min_age_days: int = Field(30, ge=0, le=MAX_DAYS)
    launched_within_days: int = Field(14, ge=0, le=MAX_DAYS)
    opt_out_tag: str = Field("ami-janitor:keep", min_length=1, max_length=128)
    allow_shared: bool = False
    lifecycle: Lifecycle = Lifecycle()
    limits: Limits = Limits()

    @field_validator("opt_out_tag")
    @classmethod
    def _not_written_by_the_janitor(cls, value: str) -> str:
        # A key the janitor itself writes on the AMIs it acts on would keep them for its own doing: a
        # candidate it marks is rescued by the next run, and marked again by the one after (nothing
        # retires); every replica or bake it makes would be kept for good.
        if _written_by_the_janitor(value):
            raise ValueError(
                f"{value!r} is a tag the janitor writes itself on the AMIs it acts on: an opt-out needs a "
                "key of its own (ami-janitor:keep, say)"
            )
        return value


class Match(_Strict):
    model_config = _IN_ITS_PARENT

    tags: dict[str, str] = {}
    name: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _something(self) -> "Match":
        if not self.tags and not self.name:
            raise ValueError("give tags and/or a name glob; an empty match would select every AMI")
        if not self.tags and self.name and _names_any(self.name):  # wildcards only: any name
            raise ValueError(f"name glob {self.name!r} alone would select every AMI: narrow it or add tags")
        if self.name and not _names_some(self.name):
            braces = " (fnmatch has no {a,b}: one family per name, or a bracket)" if "{" in self.name else ""
            raise ValueError(
                f"name glob {self.name!r} names no AMI: an AMI's name is 3 to 128 letters, digits, spaces "
                f"and ( ) [ ] . / - ' @ _{braces}"
            )
        return self

    @property
    def by_tags_alone(self) -> bool:
        """No name glob, or one that names any AMI (wildcards only, or brackets no name's character
        escapes): anyone who may tag an AMI can make it match (a name is set when the AMI is made and
        never changes)."""
        return self.name is None or _names_any(self.name)

    def names(self, name: str) -> bool:
        """Whether the name glob (if any) selects `name`: the AMI would match once tagged as asked."""
        return self.name is None or _glob(self.name)(name) is not None

    def matches(self, name: str, tags: dict[str, str]) -> bool:
        # Asked of every AMI for every family: the glob compiled once, a loop rather than a generator.
        if self.name is not None and _glob(self.name)(name) is None:
            return False
        for key, value in self.tags.items():  # noqa: SIM110 (a generator costs more per AMI)
            if tags.get(key) != value:
                return False
        return True

    def matcher(self) -> Callable[[str, dict[str, str]], bool]:
        """`matches`, with the glob and the tags looked up once: for a loop over a region's AMIs."""
        glob = _glob(self.name) if self.name is not None else None
        wanted = tuple(self.tags.items())

        def matches(name: str, tags: dict[str, str]) -> bool:
            if glob is not None and glob(name) is None:
                return False
            for key, value in wanted:  # noqa: SIM110 (a generator costs more per AMI)
                if tags.get(key) != value:
                    return False
            return True

        return matches


def _names_some(name: str) -> bool:
    """globs.names_some, read here where the glob holds no bracket (nearly every policy's: the module is
    then not loaded)."""
    if "[" in name:
        from ami_janitor.core.globs import names_some

        return names_some(name)
    fixed = len(name) - name.count("*")
    return (
        set(name) - {"*", "?"} <= AMI_NAME_CHARACTERS
        and fixed <= AMI_NAME_LENGTH[1]
        and ("*" in name or fixed >= AMI_NAME_LENGTH[0])
    )


def _names_any(name: str) -> bool:
    """globs.names_any, read here where the glob holds no bracket (nearly every policy's: the module is
    then not loaded)."""
    if "[" not in name:
        return not name.strip("*?")
    from ami_janitor.core.globs import names_any

    return names_any(name)


def _starting_with(entries: list[tuple[str, "Family"]], starts: list[str], start: str) -> Iterator["Family"]:
    """The families of `entries` (sorted by literal start, `starts`) whose literal start begins with `start`."""
    for index in range(bisect.bisect_left(starts, start), len(entries)):
        begins, family = entries[index]
        if not begins.startswith(start):
            return
        yield family


_WILDCARD = re.compile(r"[*?\[]")


def _literal_start(pattern: str) -> str:
    """What every name the glob matches starts with: its text before the first `*`, `?` or `[`."""
    wildcard = _WILDCARD.search(pattern)
    return pattern[: wildcard.start()] if wildcard else pattern


def _literal_end(pattern: str) -> str:
    """What every name the glob matches ends with: its text after the last `*`, `?` or `]` (none where
    a bracket may be left open: a literal `[` then)."""
    if "[" in pattern:
        return ""
    last = max(pattern.rfind("*"), pattern.rfind("?"))
    return pattern[last + 1 :]


@functools.lru_cache(maxsize=4096)
def _glob(pattern: str) -> Callable[[str], re.Match[str] | None]:
    """fnmatch.fnmatchcase's matcher of `pattern` (the same translation), without its per-call lookup."""
    return re.compile(fnmatch.translate(pattern)).match


_SSM_NAME = re.compile(r"[A-Za-z0-9_.\-/]+")


class Latest(_Strict):
    model_config = _IN_ITS_PARENT

    tag: str | None = Field("Latest", min_length=1, max_length=128)
    ssm_parameter: str | None = Field(None, min_length=1)

    @field_validator("tag")
    @classmethod
    def _tag_key(cls, value: str | None) -> str | None:
        # EC2's own rule, checked here rather than refused by CreateTags at every rotation.
        if value is not None and value[:4].lower() == "aws:":
            raise ValueError("EC2 reserves tag keys that begin with 'aws:' (in any case)")
        return value

    @field_validator("ssm_parameter")
    @classmethod
    def _parameter_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith("/"):
            raise ValueError("must be a full parameter path starting with '/'")
        if "{" in value.replace("{arch}", ""):
            raise ValueError("the only placeholder allowed is {arch}")
        # SSM's own rules, checked here rather than refused by PutParameter at every rotation. `{arch}`
        # stands for the longest architecture EC2 names (x86_64_mac).
        name = value.replace("{arch}", "x86_64_mac")
        if not _SSM_NAME.fullmatch(name):
            raise ValueError("SSM allows only letters, digits, '_', '.', '-' and '/' in a parameter name")
        if name[1:4].lower() in ("aws", "ssm"):
            raise ValueError("a parameter name may not begin with 'aws' or 'ssm' (SSM reserves them)")
        if name.count("/") > 15 or len(name) > 1011:
            raise ValueError("SSM allows at most 15 levels and 1011 characters in a parameter name")
        return value

    def parameter_for(self, architecture: str) -> str | None:
        if self.ssm_parameter is None:
            return None
        return self.ssm_parameter.replace("{arch}", architecture)

    @property
    def one_parameter(self) -> bool:
        """One SSM parameter for every architecture of the family (no `{arch}` in its name)."""
        return self.ssm_parameter is not None and "{arch}" not in self.ssm_parameter


class ReplicateTarget(_Strict):
    model_config = _IN_ITS_PARENT

    region: str
    # A key ARN, `alias/NAME` or an alias ARN; an alias is resolved (DescribeKey) in the target region.
    kms_key_id: str | None = None

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        return check_region(value)

    @field_validator("kms_key_id")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None and not (
            re.match(_KEY_ARN, value) or re.match(_ALIAS, value) or re.match(_ALIAS_ARN, value)
        ):
            raise ValueError(
                f"{value!r} is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID), an alias (alias/NAME) "
                "or an alias ARN (arn:aws:kms:REGION:ACCOUNT:alias/NAME)"
            )
        return value

    @model_validator(mode="after")
    def _key_in_target_region(self) -> "ReplicateTarget":
        # KMS keys and aliases are regional: CopyImage in the target region can use only one of its own.
        region = kms_arn_region(self.kms_key_id)
        if region is not None and region != self.region:
            raise ValueError(
                f"kms_key_id {self.kms_key_id} is in {region}, not in the target region {self.region}"
            )
        return self

    @property
    def kms_alias(self) -> str | None:
        """`alias/NAME` where kms_key_id names an alias (either form); None for a key ARN or no key."""
        return alias_name(self.kms_key_id)


class ShareWith(_Strict):
    accounts: list[str] = []
    organizations: list[str] = []
    organizational_units: list[str] = []

    @field_validator("accounts")
    @classmethod
    def _accounts(cls, value: list[str]) -> list[str]:
        for account in value:
            if not re.match(_ACCOUNT, account):
                raise ValueError(f"{account!r} is not a 12-digit account id")
        return value

    @field_validator("organizations", "organizational_units")
    @classmethod
    def _arns(cls, value: list[str]) -> list[str]:
        for arn in value:
            if not arn.startswith("arn:"):
                raise ValueError(f"{arn!r} is not an ARN")
        return value

    def grants(self) -> frozenset[str]:
        """Launch permissions as 'kind:value' strings (see model.LaunchPermission.key)."""
        return frozenset(
            [f"user:{a}" for a in self.accounts]
            + [f"org:{a}" for a in self.organizations]
            + [f"ou:{a}" for a in self.organizational_units]
        )


class Bake(_Strict):
    """The build instance: pinned by id, or the only live instance carrying the tags (see build_instance).

    With both, the pinned instance must also carry the tags."""

    model_config = _IN_ITS_PARENT
    instance_id: str | None = Field(None, pattern=r"^i-(?:[0-9a-f]{8}|[0-9a-f]{17})$")  # as the CLI's
    instance_tag: dict[str, str] | None = Field(None, min_length=1)
    schedule: str | None = None
    no_reboot: bool = False
    # Where the build instance lives (default: every region of `regions`); the schedule bakes there only.
    regions: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _names_an_instance(self) -> "Bake":
        if self.instance_id is None and not self.instance_tag:
            raise ValueError("give instance_id and/or instance_tag: they name the instance to bake")
        return self

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return value if value is None else _check_schedule(value)

    @field_validator("regions")
    @classmethod
    def _regions(cls, value: list[str] | None) -> list[str] | None:
        for region in value or ():
            check_region(region)
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a region is named twice")
        return value


class Family(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    match: Match
    latest: Latest | None = None
    replicate: list[ReplicateTarget] = []
    share_with: ShareWith = ShareWith()
    public: bool = False
    bake: Bake | None = None
    # Overrides of `defaults` (None = inherit).
    keep_latest: int | None = Field(None, ge=1)
    min_age_days: int | None = Field(None, ge=0, le=MAX_DAYS)
    launched_within_days: int | None = Field(None, ge=0, le=MAX_DAYS)
    opt_out_tag: str | None = Field(None, min_length=1, max_length=128)
    allow_shared: bool | None = None
    lifecycle: LifecycleOverride | None = None
    limits: FamilyLimits | None = None

    @model_validator(mode="after")
    def _bake_names_match(self) -> "Family":
        # A bake its own family does not select would never be rotated, shared or retired: at any time
        # of any day (`web-2026*` selects this year's bakes only), not only at one example time.
        if self.bake is None or not self.match.name:
            return self
        example = f"{self.name}-20261125T030000Z"
        if not fnmatch.fnmatchcase(example, self.match.name):
            raise ValueError(
                f"bake names images like {example}, which match.name {self.match.name!r} does not select"
            )
        from ami_janitor.core.globs import uncovered_name  # imports this module

        missed = uncovered_name(self.match.name, f"{self.name}-{_BAKE_TIMESTAMP_GLOB}")
        if missed is not None:
            raise ValueError(
                f"bake names images {self.name}-<UTC timestamp> (like {example}), and match.name "
                f"{self.match.name!r} does not select all of them ({missed}, for one): a bake it does not "
                "select is never rotated, shared or retired"
            )
        return self

    @model_validator(mode="after")
    def _shares_only_named_images(self) -> "Family":
        # Anyone who may tag an AMI could enroll it in a family matched by tags alone: its grants would
        # then share any AMI of the account, and a tag must never widen a launch permission.
        if self.match.by_tags_alone and (self.share_with.grants() or self.public):
            what = "public: true" if self.public else "share_with"
            raise ValueError(
                f"{what} needs a match.name glob that names the family's images: matched by tags alone, "
                "anyone who may tag an AMI could enroll it and have it shared"
            )
        return self

    @field_validator("replicate")
    @classmethod
    def _unique_targets(cls, value: list[ReplicateTarget]) -> list[ReplicateTarget]:
        regions = [t.region for t in value]
        duplicates = sorted({r for r in regions if regions.count(r) > 1})
        if duplicates:
            raise ValueError(f"region {duplicates[0]} is listed twice")
        return value


class References(_Strict):
    launch_template_versions: Literal["all", "default-and-latest"] | int = "all"

    @field_validator("launch_template_versions")
    @classmethod
    def _positive(cls, value: str | int) -> str | int:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be 'all', 'default-and-latest' or a number >= 1")
        return value


class Notify(_Strict):
    model_config = _IN_ITS_PARENT

    email: str | None = Field(None, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class Ledger(_Strict):
    """The ledger table of each managed region (same name in every region)."""

    # DynamoDB table names: 3-255 of letters, digits, '_', '-', '.'.
    table: str = Field(DEFAULT_LEDGER_TABLE, pattern=r"^[A-Za-z0-9_.-]{3,255}$")
    # Items of deregistered AMIs expire this many days after deregistration (DynamoDB TTL).
    retention_days: int = Field(90, ge=1, le=MAX_DAYS)


class UsageReports(_Strict):
    """Usage reports across accounts: each account's scheduled run writes the AMIs of other accounts it
    uses to `inbox` (under `reports/<its account id>/`), and an owner keeps what they report in use."""

    model_config = _IN_ITS_PARENT
    inbox: str = Field(pattern=_INBOX_PATTERN)
    # A report older than this is stale: the AMIs shared with its account are kept (fail safe). At most
    # 30 days: a report a month old says nothing of today's use.
    max_age_hours: int = Field(48, ge=1, le=720)
    # false: an account that never reported is taken as not using the AMIs shared with it (noted).
    required: bool = True
    # The account that owns the inbox's bucket: every call on it asks S3 to check so (a bucket name is
    # global: a mistyped or re-created name would otherwise reach an outsider's bucket).
    inbox_account: str | None = None

    @field_validator("inbox_account")
    @classmethod
    def _inbox_account(cls, value: str | None) -> str | None:
        if value is not None and not re.match(_ACCOUNT, value):
            raise ValueError(f"{value!r} is not a 12-digit account id")
        return value

    def owner_check(self) -> dict[str, Any]:
        """The parameters that make S3 refuse a call on a bucket of another account ({} where unset)."""
        return {"ExpectedBucketOwner": self.inbox_account} if self.inbox_account else {}

    @property
    def bucket(self) -> str:
        return self.inbox.removeprefix("s3://").split("/", 1)[0]

    @property
    def prefix(self) -> str:
        """The key prefix of the inbox, '' or ending with '/'."""
        rest = self.inbox.removeprefix("s3://").partition("/")[2].strip("/")
        return f"{rest}/" if rest else ""

    def account_prefix(self, account: str) -> str:
        return f"{self.prefix}reports/{account}/"

    def report_key(self, account: str, region: str) -> str:
        return f"{self.account_prefix(account)}{region}.json"


class Organization(_Strict):
    """Deployment to an organization with a service-managed StackSet (see the README)."""

    model_config = _IN_ITS_PARENT
    id: str = Field(pattern=r"^o-[a-z0-9]{10,32}$")
    # Organizational units (ou-...) or the root (r-...) the StackSet deploys to, automatically.
    deploy_to: list[str] = Field(min_length=1)
    # The function code of the member template: buckets `<prefix>-<region>`, one per region, in the
    # account that deploys the StackSet, readable by the organization.
    code_bucket_prefix: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,40}$")

    @field_validator("deploy_to")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        for target in value:
            if not re.match(r"^(ou-[a-z0-9]{4,32}-[a-z0-9]{8,32}|r-[a-z0-9]{4,32})\Z", target):
                raise ValueError(f"{target!r} is not an organizational unit (ou-...) or root (r-...) id")
        return value


class Policy(_Strict):
    mode: Mode = "dry-run"
    regions: list[str] = Field(min_length=1)
    schedule: str = "cron(0 3 * * ? *)"
    notify: Notify | None = None
    ledger: Ledger = Ledger()
    references: References = References()
    defaults: Rules = Rules()
    families: list[Family] = Field(min_length=1)
    usage_reports: UsageReports | None = None
    organization: Organization | None = None

    @field_validator("regions")
    @classmethod
    def _regions(cls, value: list[str]) -> list[str]:
        for region in value:
            check_region(region)
        # Named twice, a region would count as two where one is meant (the one region a bake runs in).
        twice = sorted({region for region in value if value.count(region) > 1})
        if twice:
            raise ValueError(f"region {twice[0]} is named twice")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        return _check_schedule(value)

    @model_validator(mode="after")
    def _families(self) -> "Policy":
        seen: set[str] = set()
        for family in self.families:
            if family.name in seen:
                raise ValueError(f"family {family.name!r} is defined twice")
            seen.add(family.name)
        self._latest_parameters_apart()
        self._shares_apart_by_name()
        self._bakes_where_their_instances_live()
        for index, family in enumerate(self.families):
            try:
                self.rules_for(family)
            except ValidationError as error:
                raise ValueError(
                    f"families[{index}]: {describe_validation_error(error, friendly=True)}"
                ) from None
        self._latest_tags_apart()
        self._bakes_in_their_family_alone()
        if (
            self.organization is not None
            and self.usage_reports is not None
            and not self.usage_reports.inbox_account
        ):
            # Member stacks read and write the inbox before, or without, the owner's stack that makes it:
            # until then its name is anyone's to take, with the reports it would receive and serve.
            raise ValueError(
                "usage_reports.inbox_account: required with organization (the account whose stack makes the "
                "inbox): S3 then refuses a bucket of any other account"
            )
        return self

    def _bakes_in_their_family_alone(self) -> None:
        # A bake's image matching another family too is kept as a policy error and never made Latest,
        # shared or copied: every scheduled bake would make an image its family never uses.
        for family in self.families:
            if family.bake is None:
                continue
            example = f"{family.name}-20261125T030000Z"
            others = [o.name for o in self.families if o is not family and _selects_bakes_of(o, family)]
            if others:
                raise ValueError(
                    f"family {family.name!r} bakes images like {example}, which family {others[0]!r} selects "
                    "too: such an image matches two families, and neither makes it Latest, shares or "
                    "copies it; narrow that family's match"
                )

    def _latest_parameters_apart(self) -> None:
        # Each family's rotation writes its own AMI to its parameter: two families that can name one
        # parameter (for any architecture of either) would flip it between their AMIs.
        writers: dict[str, tuple[str, str]] = {}  # parameter name: (family, its ssm_parameter)
        for family in self.families:
            template = family.latest.ssm_parameter if family.latest else None
            if template is None:
                continue
            for name in sorted({template.replace("{arch}", arch) for arch in ARCHITECTURES}):
                other, other_template = writers.setdefault(name, (family.name, template))
                if other != family.name:
                    raise ValueError(
                        f"families {other!r} (latest.ssm_parameter {other_template}) and {family.name!r} "
                        f"({template}) can both write the SSM parameter {name}: each family needs its own"
                    )

    def _latest_tags_apart(self) -> None:
        # The rotation puts a family's Latest tag on one AMI and takes that key off every other of its
        # group: a key with another role would be taken off with it (an opt-out, which alone keeps an
        # AMI; a family's match tag, which moves AMIs out of the family; the janitor's own records).
        roles: dict[str, str] = {}
        for family in self.families:
            for key in family.match.tags:
                roles.setdefault(key, f"a match tag of family {family.name!r}")
        for family in self.families:
            # (The family's own, else the defaults': not its whole rules made again for one key.)
            roles.setdefault(family.opt_out_tag or self.defaults.opt_out_tag, "an opt-out tag")
        for family in self.families:
            tag = family.latest.tag if family.latest else None
            if tag is None:
                continue
            role = roles.get(tag) or (
                "one of the janitor's own tags" if tag.startswith(JANITOR_TAG_PREFIX) else None
            )
            if role is not None:
                raise ValueError(
                    f"family {family.name!r}: latest.tag {tag!r} is {role}; the rotation takes the Latest tag "
                    "off every other AMI of the family, so it needs a key of its own"
                )

    def _shares_apart_by_name(self) -> None:
        # Two families whose matches both hold tags beside name globs that can name one AMI are told
        # apart by tags alone: anyone who may tag an AMI could move it from one to the other (take one
        # family's tag off, put the other's on). Where they share differently, that tag would grant or
        # revoke its launch permissions. (A family matched by tags alone names any AMI: it is left out
        # here, as README's "Trust" says.) Two globs name one AMI only where one's literal start is a
        # start of the other's and one's literal end an end of the other's: each sharing family is
        # compared with those alone, so that a policy of many families stays quick to load.
        named = sorted(
            (
                (_literal_start(family.match.name), family)
                for family in self.families
                if family.match.tags and family.match.name and not family.match.by_tags_alone
            ),
            key=lambda entry: entry[0],
        )
        starts = [start for start, _ in named]
        by_start: dict[str, list[Family]] = {}
        for start, family in named:
            by_start.setdefault(start, []).append(family)
        for start, family in named:
            shares = (family.share_with.grants(), family.public)
            if not (shares[0] or shares[1]):
                continue
            assert family.match.name is not None
            end = _literal_end(family.match.name)
            shorter = (other for k in range(len(start)) for other in by_start.get(start[:k], ()))
            for other in itertools.chain(_starting_with(named, starts, start), shorter):
                if other is family or (other.share_with.grants(), other.public) == shares:
                    continue
                assert other.match.name is not None
                other_end = _literal_end(other.match.name)
                if not (end.endswith(other_end) or other_end.endswith(end)):
                    continue
                from ami_janitor.core.globs import globs_overlap  # two sharing families' globs to compare

                if globs_overlap(family.match.name, other.match.name):
                    raise ValueError(
                        f"families {family.name!r} and {other.name!r} share differently, and only their tags "
                        f"tell their AMIs apart (match.name {family.match.name!r} and {other.match.name!r} "
                        "can name one AMI): anyone who may tag an AMI could move it from one to the other, "
                        "and so grant or revoke its launch permissions; give them names no AMI can have "
                        "both of, or match one of them by its name alone"
                    )

    def _bakes_where_their_instances_live(self) -> None:
        for index, family in enumerate(self.families):
            if family.bake is None:
                continue
            outside = sorted(set(family.bake.regions or ()) - set(self.regions))
            if outside:
                raise ValueError(
                    f"families[{index}].bake.regions: {', '.join(outside)} not in regions "
                    f"({', '.join(self.regions)}): builds are baked where the policy manages sources"
                )
            regions = self.bake_regions(family)
            if family.bake.instance_id is not None and len(regions) > 1:
                # An instance lives in one region: everywhere else its scheduled bake would fail daily.
                raise ValueError(
                    f"families[{index}].bake.instance_id: {family.bake.instance_id} is an instance of one "
                    f"region, and family {family.name} bakes in {', '.join(regions)}: set bake.regions to "
                    "the region it lives in"
                )

    def bake_regions(self, family: Family) -> list[str]:
        """The regions the family's bake runs in: its bake.regions, else the policy's regions."""
        if family.bake is None:
            return []
        return list(family.bake.regions or self.regions)

    @property
    def managed_regions(self) -> list[str]:
        regions = set(self.regions)
        for family in self.families:
            regions.update(t.region for t in family.replicate)
        return sorted(regions)

    def family(self, name: str) -> Family:
        for family in self.families:
            if family.name == name:
                return family
        raise KeyError(name)

    def rules_for(self, family: Family) -> Rules:
        """The family's rules: `defaults` with the family's overrides merged in."""
        merged: dict[str, Any] = self.defaults.model_dump()
        for key in ("keep_latest", "min_age_days", "launched_within_days", "opt_out_tag", "allow_shared"):
            value = getattr(family, key)
            if value is not None:
                merged[key] = value
        if family.lifecycle is not None:
            merged["lifecycle"].update(family.lifecycle.model_dump(exclude_unset=True))
        if family.limits is not None and family.limits.max_fraction_per_family is not None:
            merged["limits"]["max_fraction_per_family"] = family.limits.max_fraction_per_family
        return Rules.model_validate(merged)


def alias_name(kms_key_id: str | None) -> str | None:
    """`alias/NAME` of a kms_key_id naming an alias (`alias/NAME` or its ARN); None otherwise."""
    if kms_key_id is None:
        return None
    if re.match(_ALIAS, kms_key_id):
        return kms_key_id
    match = re.match(_ALIAS_ARN, kms_key_id)
    return match.group("alias") if match else None


def kms_arn_region(kms_key_id: str | None) -> str | None:
    """The region of a key or alias ARN (None: not an ARN)."""
    match = re.match(_KMS_ARN, kms_key_id or "")
    return match.group("region") if match else None


def check_region(value: str) -> str:
    if not _REGION_RE.match(value):
        raise ValueError(f"{value!r} is not an AWS region name (like us-east-1)")
    return value


class _CronField(NamedTuple):
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # names of the values from `low` on (JAN..., SUN...)
    special: str | None = None  # a pattern of what else the field takes (L, W, #)
    takes: str = ""


_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# EventBridge's cron fields: minutes, hours, day-of-month, month, day-of-week, year; each a list of
# `*`, values, ranges `a-b` and increments `x/n`.
_CRON_FIELDS = (
    _CronField("minutes", 0, 59, takes="0-59"),
    _CronField("hours", 0, 23, takes="0-23"),
    _CronField("day-of-month", 1, 31, special=r"L|LW|(?P<day>[0-9]{1,2})W", takes="1-31, L, W"),
    _CronField("month", 1, 12, _MONTHS, takes="1-12 or JAN-DEC"),
    _CronField(
        "day-of-week", 1, 7, _DAYS, special=r"L|(?P<day>[0-9A-Za-z]+)(L|#[1-5])", takes="1-7 or SUN-SAT, L, #"
    ),
    _CronField("year", 1970, 2199, takes="1970-2199"),
)


def _cron_value(text: str, field: _CronField) -> bool:
    if text.isascii() and text.isdigit():
        return field.low <= int(text) <= field.high
    return text.upper() in field.names


def _cron_item(item: str, field: _CronField) -> bool:
    """One item of a cron field's list as EventBridge takes it."""
    if field.special:
        special = re.fullmatch(field.special, item, re.IGNORECASE)
        if special:
            day = special.groupdict().get("day")
            return day is None or _cron_value(day, field)
    base, slash, step = item.partition("/")
    if slash and not (step.isascii() and step.isdigit() and int(step) >= 1):
        return False
    if base == "*":
        return True
    low, dash, high = base.partition("-")
    return all(_cron_value(part, field) for part in ((low, high) if dash else (low,)))


def _check_schedule(value: str) -> str:
    """An expression EventBridge takes: six cron fields, exactly one of day-of-month and day-of-week `?`;
    or a rate of a positive whole number, its unit singular for 1 and plural otherwise."""
    cron = re.match(r"^cron\((\S+) (\S+) (\S+) (\S+) (\S+) (\S+)\)\Z", value)
    if cron:
        if [cron.group(3), cron.group(5)].count("?") != 1:
            raise ValueError(
                f"{value}: exactly one of day-of-month and day-of-week must be ? (EventBridge's cron)"
            )
        for text, field in zip(cron.groups(), _CRON_FIELDS, strict=True):
            if text != "?" and not all(_cron_item(item, field) for item in text.split(",")):
                raise ValueError(
                    f"{value}: {field.name} {text!r} is not one EventBridge takes ({field.takes})"
                )
        return value
    rate = re.match(r"^rate\(([0-9]+) (minute|hour|day)(s?)\)\Z", value)
    if rate:
        count, plural = int(rate.group(1)), rate.group(3) == "s"
        if count < 1:
            raise ValueError(f"{value}: a rate is at least 1")
        if plural == (count == 1):
            unit = rate.group(2) + ("" if count == 1 else "s")
            raise ValueError(f"{value}: EventBridge writes it rate({count} {unit})")
        return value
    raise ValueError("must be an EventBridge expression: cron(m h dom mon dow year) or rate(N unit)")


_BAKE_TIMESTAMP_GLOB = "[0-9]" * 8 + "T" + "[0-9]" * 6 + "Z"


def _selects_bakes_of(other: Family, family: Family) -> bool:
    """Whether `other` can select some image `family` bakes (`<family>-<UTC timestamp>`, tagged with
    its match tags and a timestamp `Version`), at any time of any day, not only at one example time."""
    if other.match.name is not None:
        from ami_janitor.core.globs import globs_overlap  # imports this module

        # A family name holds no glob character: the bake names are exactly this glob's.
        if not globs_overlap(f"{family.name}-{_BAKE_TIMESTAMP_GLOB}", other.match.name):
            return False
    for key, value in other.match.tags.items():
        if key == "Version":  # every bake sets its own timestamp: some bake carries any such value
            if not fnmatch.fnmatchcase(value, _BAKE_TIMESTAMP_GLOB):
                return False
        elif family.match.tags.get(key) != value:
            return False
    return True


def parse_policy(data: Any, *, source: str = "policy") -> Policy:
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: the policy must be a mapping of keys (mode, regions, families, ...)")
    try:
        return Policy.model_validate(data)
    except ValidationError as error:
        problems = describe_validation_error(error, separator="\n", friendly=True)
        raise PolicyError(f"{source}: invalid policy\n{problems}") from None


def load_policy(path: str | os.PathLike[str] | None = None) -> Policy:
    """Load a policy from YAML or JSON (the deployed functions get JSON, so no YAML parser is needed)."""
    named = path or os.environ.get("AMI_JANITOR_CONFIG")
    file = Path(named or DEFAULT_CONFIG_PATH)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        if isinstance(error, FileNotFoundError) and not named:
            # Nothing named a file: say where the default was looked for and how to name another.
            raise PolicyError(
                f"no policy file {file} in {Path.cwd()}: pass --config FILE or set AMI_JANITOR_CONFIG"
            ) from None
        raise PolicyError(f"{file}: cannot read the policy file ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise PolicyError(f"{file}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    if file.suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as duplicate:
            raise PolicyError(f"{file}: not valid JSON ({duplicate})") from None
        except json.JSONDecodeError as error:
            raise PolicyError(f"{file}: not valid JSON (line {error.lineno}: {error.msg})") from None
        except (RecursionError, ValueError) as error:  # nested past the parser's depth; a giant number
            raise PolicyError(f"{file}: not valid JSON ({_unparsable(error)})") from None
    else:
        import yaml  # only the CLI and the deploy read YAML

        try:
            data = yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            what = getattr(error, "problem", None) or str(error)
            raise PolicyError(f"{file}: not valid YAML ({where}{what})") from None
        except (RecursionError, ValueError) as error:
            raise PolicyError(f"{file}: not valid YAML ({_unparsable(error)})") from None
    return parse_policy(data, source=str(file))


def _unparsable(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).split(";")[0]  # Python's limit on an integer's digits, say


# A key given twice in one mapping: both parsers would keep the last silently, so a policy could say
# `mode: dry-run` on top and `mode: enforce` further down. Refused, naming the key.
class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise _DuplicateKey(f"key {key!r} given twice in one object")
        mapping[key] = value
    return mapping


@functools.cache
def _unique_key_loader() -> type:
    """yaml's SafeLoader, refusing a key given twice in one mapping (a merge key `<<` may repeat keys:
    the mapping's own win, as YAML says)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: SafeLoader names it
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"key {key!r} given twice",
                        key_node.start_mark,
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

        def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
            _as_written(node, str(self.construct_scalar(node)))
            return int(super().construct_yaml_int(node))

        def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
            _as_written(node, str(self.construct_scalar(node)), integer=False)
            return float(super().construct_yaml_float(node))

    # YAML 1.1 (PyYAML's) reads `030` as octal 24 and `1:30` in base 60 (90): a policy's `min_age_days:
    # 030` would keep AMIs 24 days. Refused, where the line says what to write.
    UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_yaml_int)
    UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", UniqueKeyLoader.construct_yaml_float)
    return UniqueKeyLoader


def _as_written(node: Any, text: str, *, integer: bool = True) -> None:
    """Refuses a number YAML 1.1 reads otherwise than it is written (an integer's leading zero: octal;
    `:`: base 60)."""
    import yaml

    digits = text.replace("_", "").lstrip("+-")
    octal = integer and len(digits) > 1 and digits[0] == "0" and digits[1].isdigit()
    if octal or ":" in digits:
        why = "in base 60" if ":" in digits else "as octal"
        raise yaml.constructor.ConstructorError(
            None,
            None,
            f"the number {text} would be read {why} (YAML 1.1): write it without "
            + ("the ':'" if ":" in digits else "its leading zeros"),
            node.start_mark,
        )
