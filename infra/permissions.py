"""Maps a function's list of IAM actions to IAM statements.

Each module declares the IAM actions its code calls (`PERMISSIONS`), and `ami_janitor.roles` gathers
them per function; this module decides where each action may apply:
- read-only calls (Describe*, List*, Get*) on "*": EC2, Auto Scaling, Batch, EMR, SSM reads and the
  Recycle Bin do not support resource-level permissions for them;
- mutating EC2 calls only on the images and snapshots of the function's region, with tag conditions
  that say "the janitor marked this": disable and deregister need the candidate tag, DeleteSnapshot the
  retired-from tag, tag changes are limited to janitor-owned keys and the families' Latest tags;
- KMS calls only on the key ARNs the policy configures for replication, and only through EC2; for a
  target named by an alias, on the keys of its region that carry the alias (`kms:ResourceAliases`), and
  DescribeKey (which resolves the alias) directly;
- SSM writes only on the families' Latest parameters;
- the usage inbox's S3 calls (`usage_reports`) only in the inbox: a report written only under
  `<prefix>reports/<the account>/`, reports read and listed only under `<prefix>reports/`; without
  `usage_reports` they are dropped (there is no inbox to grant), and so are the Organizations reads
  that only expand shares for the reports;
- DynamoDB calls only on the region's ledger table (the table's resource policy also denies writes to
  every principal outside the IAM path /ami-janitor/), and on the ledger tables of the replication
  targets: their reads (a plan knows the copies there), and, for a role that copies, the item reads and
  writes that record each copy where it is made.
An action without a rule fails the synth: adding one is a decision to take here, not a default.

Image and snapshot ARNs carry no account (`arn:aws:ec2:REGION::image/ami-...`, same for
`snapshot/snap-...`), as the Service Authorization Reference lists them and as EC2 evaluates them.

The statements are plain data so tests can check the mapping without synthesizing a stack.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ami_janitor.aws import ledger, runs, usage
from ami_janitor.aws.baker import RUN_SHELL_DOCUMENT
from ami_janitor.core.policy import CANDIDATE_TAG, JANITOR_TAG_PREFIX, RETIRED_FROM_TAG, Family, Policy
from infra.environment import METRICS_NAMESPACE

READ_ONLY_PREFIXES = ("Describe", "List", "Get")
# Read calls of these services can reach data, or target resources of the stack itself: no "*".
NO_WILDCARD_READS = frozenset({"kms", "s3", "secretsmanager", "sqs", "sns", "logs", "dynamodb", "lambda"})
# Services whose resources belong to the stack: the constructs grant them on their own resources.
INFRA_SERVICES = frozenset({"logs", "s3", "sns", "sqs"})

# The retirement stages that stop launches: only on AMIs the janitor has marked as candidates.
RETIRE_ACTIONS = frozenset({"ec2:DeregisterImage", "ec2:DisableImage"})
# Rescue and rotation helpers: they make an AMI usable again, put back its owner's deprecation time, or
# change its launch permissions. A deprecation only hides an AMI (it still launches): it is not bound
# to the candidate tag, whose removal would otherwise stop a rescue from restoring the owner's time.
RESTORE_ACTIONS = frozenset(
    {
        "ec2:EnableImage",
        "ec2:DisableImageDeprecation",
        "ec2:EnableImageDeprecation",
        "ec2:ModifyImageAttribute",
    }
)
TAG_ACTIONS = frozenset({"ec2:CreateTags", "ec2:DeleteTags"})
CREATE_ACTIONS = frozenset({"ec2:CopyImage", "ec2:CreateImage"})
SNAPSHOT_DELETE_ACTIONS = frozenset({"ec2:DeleteSnapshot"})
SSM_WRITE_ACTIONS = frozenset(
    {
        "ssm:PutParameter",
        "ssm:DeleteParameter",
        "ssm:DeleteParameters",
        "ssm:AddTagsToResource",
        "ssm:RemoveTagsFromResource",
        "ssm:LabelParameterVersion",
    }
)
# What EC2 needs of a replica key while it copies (CreateGrant, Decrypt, ReEncrypt*, GenerateDataKey*,
# DescribeKey), spelled out: a key administration call has no rule.
KMS_GRANT_ACTIONS = frozenset({"kms:CreateGrant"})
KMS_METADATA_ACTIONS = frozenset({"kms:DescribeKey"})
KMS_CRYPTO_ACTIONS = frozenset(
    {
        "kms:Decrypt",
        "kms:Encrypt",
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
        "kms:GenerateDataKey",
        "kms:GenerateDataKeyWithoutPlaintext",
    }
)
KMS_ACTIONS = KMS_GRANT_ACTIONS | KMS_METADATA_ACTIONS | KMS_CRYPTO_ACTIONS
METRIC_ACTIONS = frozenset({"cloudwatch:PutMetricData"})
# Run Command on a build instance (the CLI's bake --stop-command/--start-command).
SEND_COMMAND_ACTIONS = frozenset({"ssm:SendCommand"})
# The ledger's item calls and what `ledger create` calls: on the ledger table only.
LEDGER_ACTIONS = (
    frozenset(ledger.PERMISSIONS)
    | frozenset(ledger.CHECK_PERMISSIONS)
    | frozenset(ledger.CREATE_PERMISSIONS)
    | frozenset(runs.PERMISSIONS)
)
# The usage inbox (`usage_reports`): a report written under the account's own prefix, reports read; and
# Organizations, read to expand a share to an organization or OU into the accounts whose reports count.
ORGANIZATIONS_ACTIONS = frozenset(usage.ORGANIZATIONS_PERMISSIONS)
USAGE_ACTIONS = (
    frozenset(usage.PUBLISH_PERMISSIONS) | frozenset(usage.READ_PERMISSIONS) | ORGANIZATIONS_ACTIONS
)
# On the ledger tables of the copy targets: what reading a target's inventory calls ...
TARGET_LEDGER_READS = frozenset({"dynamodb:DescribeTable", "dynamodb:Scan"})
# ... and what recording a copy there calls (a role with ec2:CopyImage only).
TARGET_LEDGER_RECORDS = frozenset({"dynamodb:BatchGetItem", "dynamodb:DescribeTable", "dynamodb:UpdateItem"})

_ACTION_RE = re.compile(r"^[a-z0-9-]+:[A-Za-z0-9]+$")


class PermissionsError(ValueError):
    """A PERMISSIONS entry that this module has no rule for, or that is malformed."""


@dataclass(frozen=True)
class Statement:
    """One Allow statement, as plain data (ARNs may contain CDK tokens for partition and account)."""

    sid: str
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    conditions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildInstanceScope:
    """The instance a family's bake may image: its pinned id (else any), carrying its tags (if any)."""

    instance_id: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    # The regions the family bakes in (aws:RequestedRegion), where the role is the scheduled bake's: a
    # template for any region (the organization's) cannot leave the others' statements out.
    regions: tuple[str, ...] = ()


def build_instance_scope(family: Family, regions: Iterable[str] = ()) -> BuildInstanceScope:
    """The instance the family's bake images: its bake.instance_id and bake.instance_tag (in `regions`
    alone, where given)."""
    bake = family.bake
    if bake is None:
        raise PermissionsError(f"family {family.name} has no bake section")
    return BuildInstanceScope(
        bake.instance_id, tuple(sorted((bake.instance_tag or {}).items())), tuple(sorted(regions))
    )


@dataclass(frozen=True)
class Scope:
    """What a function's mutating calls may touch."""

    partition: str
    account: str
    region: str
    # Destination regions of CopyImage besides `region` (replication only).
    copy_regions: tuple[str, ...] = ()
    latest_tag_keys: tuple[str, ...] = ()
    # The opt-out tags (defaults' and families'): keys the janitor never writes or removes.
    opt_out_tag_keys: tuple[str, ...] = ()
    kms_key_arns: tuple[str, ...] = ()
    # Targets whose key is named by an alias: (region, account, alias/NAME); its key is found at run time.
    kms_aliases: tuple[tuple[str, str, str], ...] = ()
    ssm_parameters: tuple[str, ...] = ()
    # One entry per baked family: the build instance its bake.instance_id and bake.instance_tag name.
    build_instances: tuple[BuildInstanceScope, ...] = ()
    ledger_table: str = ""
    # The usage inbox of `usage_reports`: its bucket ("" without one) and key prefix ("" or ending in /).
    usage_bucket: str = ""
    usage_prefix: str = ""
    # The account that owns that bucket ("" where usage_reports.inbox_account is unset).
    usage_account: str = ""

    @classmethod
    def from_policy(
        cls, policy: Policy, *, partition: str, account: str, region: str, copies: bool = False
    ) -> Scope:
        families = policy.families
        copy_regions: set[str] = set()
        if copies:
            for family in families:
                copy_regions.update(t.region for t in family.replicate)
        copy_regions.discard(region)
        return cls(
            partition=partition,
            account=account,
            region=region,
            copy_regions=tuple(sorted(copy_regions)),
            latest_tag_keys=tuple(sorted({f.latest.tag for f in families if f.latest and f.latest.tag})),
            opt_out_tag_keys=tuple(sorted({policy.rules_for(f).opt_out_tag for f in families})),
            kms_key_arns=tuple(
                sorted(
                    {
                        t.kms_key_id
                        for f in families
                        for t in f.replicate
                        if t.kms_key_id is not None and t.kms_alias is None
                    }
                )
            ),
            kms_aliases=tuple(
                sorted(
                    {
                        (t.region, _alias_account(t.kms_key_id) or account, t.kms_alias)
                        for f in families
                        for t in f.replicate
                        if t.kms_key_id is not None and t.kms_alias is not None
                    }
                )
            ),
            ssm_parameters=tuple(
                sorted({f.latest.ssm_parameter for f in families if f.latest and f.latest.ssm_parameter})
            ),
            build_instances=tuple(build_instance_scope(f) for f in families if f.bake is not None),
            ledger_table=policy.ledger.table,
            usage_bucket=policy.usage_reports.bucket if policy.usage_reports else "",
            usage_prefix=policy.usage_reports.prefix if policy.usage_reports else "",
            usage_account=(policy.usage_reports.inbox_account or "") if policy.usage_reports else "",
        )

    def image_arn(self, region: str) -> str:
        return f"arn:{self.partition}:ec2:{region}::image/*"

    def snapshot_arn(self, region: str) -> str:
        return f"arn:{self.partition}:ec2:{region}::snapshot/*"

    def instance_arn(self, instance_id: str | None = None) -> str:
        return f"arn:{self.partition}:ec2:{self.region}:{self.account}:instance/{instance_id or '*'}"

    def parameter_arn(self, name: str) -> str:
        # "/ami/x/{arch}/latest" -> parameter/ami/x/*/latest (the ARN drops the leading slash). In IAM `*`
        # crosses `/` (the role may write /ami/x/a/b/latest too, under the family's own prefix and suffix):
        # one ARN per architecture instead would fill a role's 10,240 characters of inline policy at
        # about 20 such families.
        return f"arn:{self.partition}:ssm:{self.region}:{self.account}:parameter/{name.lstrip('/')}".replace(
            "{arch}", "*"
        )

    def ledger_table_arn(self, region: str | None = None) -> str:
        where = region or self.region
        return f"arn:{self.partition}:dynamodb:{where}:{self.account}:table/{self.ledger_table}"

    def tag_keys(self) -> list[str]:
        return [f"{JANITOR_TAG_PREFIX}*", *self.latest_tag_keys]

    def usage_bucket_arn(self) -> str:
        return f"arn:{self.partition}:s3:::{self.usage_bucket}"

    def usage_reports_prefix(self) -> str:
        """Where the accounts' reports are, under the inbox's prefix (keys `reports/<account>/<region>.json`)."""
        return f"{self.usage_prefix}reports/"


def _alias_account(kms_key_id: str) -> str | None:
    """The account of an alias ARN (None for `alias/NAME`: the stack's own)."""
    parts = kms_key_id.split(":")
    return parts[4] if kms_key_id.startswith("arn:") and len(parts) > 5 else None


def is_read_only(action: str) -> bool:
    service, name = action.split(":", 1)
    return name.startswith(READ_ONLY_PREFIXES) and service not in NO_WILDCARD_READS


def validate_actions(actions: Iterable[str]) -> list[str]:
    """The actions, sorted and deduplicated; wildcards and malformed names are refused."""
    result = sorted(set(actions))
    for action in result:
        if "*" in action:
            raise PermissionsError(f"{action}: list the actions the code calls, not a wildcard")
        if not _ACTION_RE.match(action):
            raise PermissionsError(f"{action}: not an IAM action name like 'ec2:DescribeImages'")
    return result


def statements_for(actions: Iterable[str], scope: Scope, *, provided: Iterable[str] = ()) -> list[Statement]:
    """IAM statements granting exactly `actions` within `scope`.

    `provided` lists the actions the function's construct already grants on the stack's own
    resources (its queue, bucket, topic, log group); a handler may name those, nothing else of
    the services the stack owns.
    """
    wanted = validate_actions(actions)
    provided_set = set(provided)
    unknown: list[str] = []
    read: list[str] = []
    for action in wanted:
        service = action.split(":", 1)[0]
        if action in USAGE_ACTIONS:
            continue  # the inbox's, not the stack's own resources: _usage_statements
        if service in INFRA_SERVICES:
            if action not in provided_set:
                raise PermissionsError(
                    f"{action}: the stack grants {service} actions on its own resources; "
                    "add it to the construct that owns the resource (infra/)"
                )
        elif is_read_only(action):
            read.append(action)
        elif not _has_rule(action):
            unknown.append(action)
    if unknown:
        raise PermissionsError(
            f"no scoping rule for {', '.join(unknown)}: add one in infra/permissions.py "
            "(which resources, which conditions)"
        )
    chosen = set(wanted)
    statements: list[Statement] = []
    if read:
        statements.append(Statement("ReadInventory", tuple(read), ("*",)))
    statements.extend(_ec2_statements(chosen, scope))
    statements.extend(_ssm_statements(chosen, scope))
    statements.extend(_kms_statements(chosen, scope))
    statements.extend(_ledger_statements(chosen, scope))
    statements.extend(_usage_statements(chosen, scope))
    metrics = sorted(chosen & METRIC_ACTIONS)
    if metrics:
        # PutMetricData has no resource type; the namespace condition is its only scope.
        statements.append(
            Statement(
                "PutJanitorMetrics",
                tuple(metrics),
                ("*",),
                {"StringEquals": {"cloudwatch:namespace": METRICS_NAMESPACE}},
            )
        )
    return statements


def _ledger_statements(chosen: set[str], scope: Scope) -> list[Statement]:
    used = sorted(chosen & LEDGER_ACTIONS)
    if not used:
        return []
    if not scope.ledger_table:
        raise PermissionsError(f"{', '.join(used)}: the scope names no ledger table")
    out = [Statement("UseLedger", tuple(used), (scope.ledger_table_arn(),))]
    wanted = TARGET_LEDGER_READS | (TARGET_LEDGER_RECORDS if "ec2:CopyImage" in chosen else frozenset())
    targets = sorted(chosen & wanted)
    if targets and scope.copy_regions:
        tables = tuple(scope.ledger_table_arn(region) for region in scope.copy_regions)
        out.append(Statement("UseCopyTargetLedgers", tuple(targets), tables))
    return out


def _usage_statements(chosen: set[str], scope: Scope) -> list[Statement]:
    """The usage inbox: an account writes its report only under its own id (the inbox's bucket policy
    says the same for every account of the organization), reads and lists only the reports."""
    if not scope.usage_bucket:
        return []  # no inbox configured: nothing to grant
    reports = scope.usage_reports_prefix()
    objects = f"{scope.usage_bucket_arn()}/{reports}"
    # A bucket name is global: with the owner's account known, no statement reaches a bucket of that
    # name in another account, even by a call that does not pass ExpectedBucketOwner.
    owner = {"StringEquals": {"s3:ResourceAccount": scope.usage_account}} if scope.usage_account else {}
    out: list[Statement] = []
    organizations = sorted(chosen & ORGANIZATIONS_ACTIONS)
    if organizations:
        # Organizations has no resource-level permissions for these reads.
        out.append(Statement("ReadOrganization", tuple(organizations), ("*",)))
    if "s3:PutObject" in chosen:
        out.append(
            Statement("PublishUsageReport", ("s3:PutObject",), (f"{objects}{scope.account}/*",), owner)
        )
    if "s3:GetObject" in chosen:
        out.append(Statement("ReadUsageReports", ("s3:GetObject",), (f"{objects}*",), owner))
    if "s3:ListBucket" in chosen:
        # No s3:prefix condition: S3 checks ListBucket when GetObject meets a missing key (404 rather
        # than 403) without a prefix in the request context, so a condition would make every missing
        # report look unreadable. Listing shows only which accounts reported.
        out.append(Statement("ListUsageReports", ("s3:ListBucket",), (scope.usage_bucket_arn(),), owner))
    return out


def _has_rule(action: str) -> bool:
    return action in (
        KMS_ACTIONS
        | RETIRE_ACTIONS
        | RESTORE_ACTIONS
        | TAG_ACTIONS
        | CREATE_ACTIONS
        | SNAPSHOT_DELETE_ACTIONS
        | SSM_WRITE_ACTIONS
        | METRIC_ACTIONS
        | LEDGER_ACTIONS
        | SEND_COMMAND_ACTIONS
    )


def _ec2_statements(chosen: set[str], scope: Scope) -> list[Statement]:
    region = scope.region
    out: list[Statement] = []
    retire = sorted(chosen & RETIRE_ACTIONS)
    if retire:
        out.append(
            Statement(
                "RetireCandidates",
                tuple(retire),
                (scope.image_arn(region),),
                {"Null": {f"aws:ResourceTag/{CANDIDATE_TAG}": "false"}},
            )
        )
    restore = sorted(chosen & RESTORE_ACTIONS)
    if restore:
        out.append(Statement("RestoreAndShareImages", tuple(restore), (scope.image_arn(region),)))
    tags = sorted(chosen & TAG_ACTIONS)
    # A role that creates AMIs and never removes a tag (the bake, the copier) tags only what it creates,
    # at creation (TagOnCreate below): it gets no tag change on existing AMIs and snapshots.
    edits_tags = bool(tags) and ("ec2:DeleteTags" in chosen or not chosen & CREATE_ACTIONS)
    if edits_tags:
        # Tag changes on existing AMIs and snapshots: janitor-owned keys and Latest tags only, never an
        # opt-out tag (`ami-janitor:keep` is one of the janitor's keys by name, and alone keeps an AMI:
        # the janitor's roles may neither write nor remove it). The Null check refuses a DeleteTags
        # without keys, which would remove every tag.
        keys: dict[str, Mapping[str, Any]] = {
            "ForAllValues:StringLike": {"aws:TagKeys": scope.tag_keys()},
            "Null": {"aws:TagKeys": "false"},
        }
        if scope.opt_out_tag_keys:
            keys["ForAllValues:StringNotEquals"] = {"aws:TagKeys": list(scope.opt_out_tag_keys)}
        out.append(
            Statement(
                "TagJanitorKeys", tuple(tags), (scope.image_arn(region), scope.snapshot_arn(region)), keys
            )
        )
    creates = sorted(chosen & CREATE_ACTIONS)
    created_in = [region, *scope.copy_regions] if "ec2:CopyImage" in creates else [region]
    new_resources = tuple(arn for r in created_in for arn in (scope.image_arn(r), scope.snapshot_arn(r)))
    if "ec2:CopyImage" in creates:
        # Called in the destination region; the source AMI and its snapshots are in this region.
        out.append(Statement("CopyImages", ("ec2:CopyImage",), new_resources))
    if "ec2:CreateImage" in creates:
        out.append(
            Statement(
                "CreateImages", ("ec2:CreateImage",), (scope.image_arn(region), scope.snapshot_arn(region))
            )
        )
        # The build instance of each family: its bake.instance_id, and carrying its bake.instance_tag
        # (in the regions it bakes in, where the scope says).
        out += _build_instance_statements(scope, "CreateImagesFromInstances", "ec2:CreateImage", regions=True)
    if creates and "ec2:CreateTags" in chosen:
        # Tags given at creation (TagSpecifications) are the new AMI's own: any key, new resources only.
        out.append(
            Statement(
                "TagOnCreate",
                ("ec2:CreateTags",),
                new_resources,
                {"StringEquals": {"ec2:CreateAction": [a.split(":", 1)[1] for a in creates]}},
            )
        )
    deletes = sorted(chosen & SNAPSHOT_DELETE_ACTIONS)
    if deletes:
        out.append(
            Statement(
                "DeleteRetiredSnapshots",
                tuple(deletes),
                (scope.snapshot_arn(region),),
                {"Null": {f"aws:ResourceTag/{RETIRED_FROM_TAG}": "false"}},
            )
        )
    return out


def _build_instance_statements(scope: Scope, sid: str, action: str, *, regions: bool) -> list[Statement]:
    """`action` on each family's build instance, merged where that widens nothing, so that a role's
    inline policy stays within IAM's 10,240 characters with many families that bake (a statement per
    family filled the operator role's at about 17): the families whose instances are told apart by one
    tag alone, of the same key, on the same instance ARN (and in the same regions) share a statement
    listing the tag's values (StringEquals on a list is any of them); those pinned by id alone (in the
    same regions) share one listing their instances. Families matched by several tags keep their own:
    lists under two keys would let either family's value of one key pair with the other's of the next."""
    grants: dict[tuple[object, ...], tuple[list[str], dict[str, list[str]]]] = {}
    for index, build in enumerate(scope.build_instances):
        resource = scope.instance_arn(build.instance_id)
        where = build.regions if regions else ()
        if len(build.tags) == 1:
            group: tuple[object, ...] = ("tag", build.tags[0][0], resource, where)
        elif not build.tags:
            group = ("untagged", where)
        else:
            group = ("tags", index)
        resources, values = grants.setdefault(group, ([], {}))
        if resource not in resources:
            resources.append(resource)
        for key, value in build.tags:
            listed = values.setdefault(f"aws:ResourceTag/{key}", [])
            if value not in listed:
                listed.append(value)
        if where:
            values["aws:RequestedRegion"] = list(where)
    out = []
    for index, (resources, values) in enumerate(grants.values()):
        condition = {
            key: listed if key == "aws:RequestedRegion" or len(listed) > 1 else listed[0]
            for key, listed in values.items()
        }
        out.append(
            Statement(
                f"{sid}{index}", (action,), tuple(resources), {"StringEquals": condition} if condition else {}
            )
        )
    return out


def _ssm_statements(chosen: set[str], scope: Scope) -> list[Statement]:
    out: list[Statement] = []
    if chosen & SEND_COMMAND_ACTIONS:
        # SendCommand is authorized on the document and on each instance: the build instances of the
        # baked families only. An AWS-owned document's ARN has no account: "*" matches it (empty).
        document = f"arn:{scope.partition}:ssm:{scope.region}:*:document/{RUN_SHELL_DOCUMENT}"
        out.append(Statement("RunShellDocument", ("ssm:SendCommand",), (document,)))
        out += _build_instance_statements(scope, "SendBakeCommands", "ssm:SendCommand", regions=False)
    writes = sorted(chosen & SSM_WRITE_ACTIONS)
    if not writes or not scope.ssm_parameters:
        return out
    return [
        *out,
        Statement(
            "WriteLatestParameters",
            tuple(writes),
            tuple(scope.parameter_arn(name) for name in scope.ssm_parameters),
        ),
    ]


def _kms_statements(chosen: set[str], scope: Scope) -> list[Statement]:
    kms = sorted(chosen & KMS_ACTIONS)
    if not kms:
        return []
    out: list[Statement] = []
    if scope.kms_key_arns and "ec2:CopyImage" in chosen:
        # A key named by its ARN is used by EC2 alone, while it copies: a role that only resolves
        # aliases (DescribeKey) has no use for it.
        out.extend(_key_statements(kms, scope.kms_key_arns, {}, ""))
    # An alias cannot be a Resource: any key of a target region (and account) that carries an alias a
    # target there names, one statement per region (a key of one region carrying another region's
    # alias is none of the policy's). The ledger's record of each copy's key ARN catches an alias moved
    # to another key.
    by_place: dict[tuple[str, str], set[str]] = {}
    for region, account, alias in scope.kms_aliases:
        by_place.setdefault((region, account), set()).add(alias)
    for index, ((region, account), aliases) in enumerate(sorted(by_place.items())):
        keys = (f"arn:{scope.partition}:kms:{region}:{account}:key/*",)
        which = {"ForAnyValue:StringEquals": {"kms:ResourceAliases": sorted(aliases)}}
        out.extend(_key_statements(kms, keys, which, f"ByAlias{index if len(by_place) > 1 else ''}"))
    return out


def _key_statements(
    kms: list[str], keys: tuple[str, ...], which: Mapping[str, Mapping[str, Any]], suffix: str
) -> list[Statement]:
    """The replica keys' statements on `keys`, narrowed by `which` (the alias condition, if any)."""
    via_ec2 = {"StringLike": {"kms:ViaService": "ec2.*.amazonaws.com"}}
    out: list[Statement] = []
    metadata = [a for a in kms if a in KMS_METADATA_ACTIONS]
    if metadata:
        # Called by EC2 while it copies, and directly to resolve an alias: no ViaService.
        out.append(Statement(f"DescribeReplicaKeys{suffix}", tuple(metadata), keys, dict(which)))
    crypto = [a for a in kms if a in KMS_CRYPTO_ACTIONS]
    if crypto:
        # EC2 uses the key on the caller's behalf while it copies the snapshots.
        out.append(Statement(f"UseReplicaKeysThroughEc2{suffix}", tuple(crypto), keys, {**which, **via_ec2}))
    grants = [a for a in kms if a in KMS_GRANT_ACTIONS]
    if grants:
        out.append(
            Statement(
                f"GrantReplicaKeysToEc2{suffix}",
                tuple(grants),
                keys,
                {**which, **via_ec2, "Bool": {"kms:GrantIsForAWSResource": "true"}},
            )
        )
    return out


# IAM: a role's inline policies together take at most this many characters (whitespace not counted).
MAX_INLINE_CHARACTERS = 10_240


def inline_characters(statements: Sequence[Statement]) -> int:
    """The characters of a policy of `statements` as IAM counts them (no whitespace). An unresolved CDK
    token (an account, a partition) counts as its placeholder, longer than its value: an upper bound."""
    document = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": s.sid,
                "Effect": "Allow",
                "Action": list(s.actions),
                "Resource": list(s.resources),
                **({"Condition": {k: dict(v) for k, v in s.conditions.items()}} if s.conditions else {}),
            }
            for s in statements
        ],
    }
    return len(json.dumps(document, separators=(",", ":")))


def require_inline_fits(statements: Sequence[Statement], role: str) -> None:
    """Refuse at synth a role whose inline policy IAM would refuse at deploy (the stack rolling back)."""
    size = inline_characters(statements)
    if size > MAX_INLINE_CHARACTERS:
        raise ValueError(
            f"{role}: its permissions take {size:,} characters of inline policy, over IAM's "
            f"{MAX_INLINE_CHARACTERS:,}. Each family that bakes adds its build instance; those whose "
            "bake.instance_tag is one tag of the same key, or that pin bake.instance_id alone, share a "
            "statement: fewer families with several tags would fit"
        )


def policy_statement(statement: Statement) -> Any:
    """The CDK form of a statement (imported lazily so the mapping is testable without CDK)."""
    from aws_cdk import aws_iam as iam

    return iam.PolicyStatement(
        sid=statement.sid,
        actions=list(statement.actions),
        resources=list(statement.resources),
        conditions={k: dict(v) for k, v in statement.conditions.items()} or None,
    )
