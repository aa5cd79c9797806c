"""The ledger table's edge: what the janitor did to each AMI, in a DynamoDB table per region.

Key schema: partition key `pk` = "image#<ami id>", sort key `sk` = "item". One item per AMI, read
by key (GetItem, BatchGetItem): every question the engine asks is "what did I do to these AMIs". The
sort key costs nothing now and keeps room for more items under one AMI (or other kinds of items, as
"run#<time>") later, since a table's key schema cannot change once it exists. The `image#` prefix
keeps other kinds of partitions apart: a run's record (`run#`) and a scheduled event's claim
(`event#`, aws/runs.py), and the adoption record (`ledger#adoption`); the Scan reads each by its prefix
and leaves any other alone.

Writes are conditional so that two runs racing on one AMI record each step exactly once: the loser
gets "already-recorded" and must read the item again. Each write also stores a fresh id in
`last_write`: when the SDK sends a write again after its first answer was lost, the retry fails its
condition against that first attempt, and the id DynamoDB returns with the failure
(ReturnValuesOnConditionCheckFailure=ALL_OLD) tells our own write ("recorded") from another run's. The table lives in the region of its AMIs; its
resource policy denies writes to every principal outside the IAM path `/ami-janitor/` (where the
stacks put every role) and the writers `ledger create` names.
"""

import json
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast

from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, ValidationError

from ami_janitor.aws.attribute_values import from_attribute, to_attribute
from ami_janitor.aws.clients import RegionClients
from ami_janitor.core.model import (
    STAGES,
    LedgerBake,
    LedgerCopy,
    LedgerItem,
    LedgerStage,
    LedgerView,
    Stage,
    UnfinishedRun,
    iso,
    parse_time,
)
from ami_janitor.core.policy import Ledger as LedgerConfig
from ami_janitor.core.validation import describe_validation_error

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

# What the functions call: the item reads and conditional writes.
PERMISSIONS: list[str] = sorted(
    [
        "dynamodb:BatchGetItem",  # read_items
        "dynamodb:Scan",  # read_all
        # record_candidate, record_stage, close, record_copy, record_replica, record_grants,
        # confirm_grants, forget_grants, record_found, record_bake
        "dynamodb:UpdateItem",
    ]
)
# The existence check (exists), for those that write before they read the table: a rescue, a bake, a
# copy. A scheduled run's Scan says whether the table is there.
CHECK_PERMISSIONS: list[str] = ["dynamodb:DescribeTable"]
# What `ami-janitor ledger create` calls besides (with the caller's credentials).
CREATE_PERMISSIONS: list[str] = sorted(
    [
        "dynamodb:CreateTable",
        "dynamodb:DescribeContinuousBackups",
        "dynamodb:DescribeTimeToLive",
        "dynamodb:GetResourcePolicy",
        "dynamodb:PutResourcePolicy",
        "dynamodb:UpdateContinuousBackups",
        "dynamodb:UpdateTable",
        "dynamodb:UpdateTimeToLive",
    ]
)

ROLE_PATH = "/ami-janitor/"
TTL_ATTRIBUTE = "ttl"
POLICY_SID = "DenyWritesOutsideAmiJanitor"
# Everything that changes the table or its items. DeleteTable is blocked by deletion protection too,
# which only UpdateTable can lift.
WRITE_ACTIONS: list[str] = sorted(
    [
        "dynamodb:BatchWriteItem",
        "dynamodb:DeleteItem",
        "dynamodb:DeleteResourcePolicy",
        "dynamodb:DeleteTable",
        "dynamodb:PartiQLDelete",
        "dynamodb:PartiQLInsert",
        "dynamodb:PartiQLUpdate",
        "dynamodb:PutItem",
        "dynamodb:PutResourcePolicy",
        "dynamodb:UpdateContinuousBackups",
        "dynamodb:UpdateItem",
        "dynamodb:UpdateTable",
        "dynamodb:UpdateTimeToLive",
    ]
)
# The id of the write that last changed an item (see the module's docstring); never read as a record.
WRITE_ID_ATTRIBUTE = "last_write"
BATCH_GET_KEYS = 100  # BatchGetItem's limit per call
_BATCH_RETRIES = 5
# Unprocessed keys are asked again after a wait of up to this, doubled each time (DynamoDB's advice:
# exponential backoff with jitter); at most about 1.5 s in all.
_BATCH_BACKOFF_SECONDS = 0.1

Written = Literal["recorded", "already-recorded"]


def _unfinished_run(raw: dict[str, Any]) -> UnfinishedRun | None:
    """A run record (aws/runs.py: "run#<region>#<run>") whose slices were not all counted, or whose
    summary nobody holds (its last slice could not send it, and went to the dead-letter queue), and
    that no later run reported yet; None for any other. One that cannot be read, its start included, is
    a MalformedItem naming it."""
    if "slices" not in raw or "unfinished_reported" in raw:
        return None
    try:
        slices = int(raw["slices"]["N"])
        done = len(raw.get("done", {}).get("SS", []))
        # Sent: claimed, and confirmed where the claim expects it (a holder killed mid-send on its
        # slice's last delivery left a claim no delivery takes over).
        sent = "summary_sent" in raw and ("summary_confirmed" in raw or "summary_confirms" not in raw)
        if done >= slices and sent:
            return None
        run = raw["pk"]["S"].split("#", 2)[-1]
        # Every run record has its start (RunRecords.start): one that is no time would hide the run
        # from every later report (a run is named once it is old enough), never named.
        started = parse_time(raw.get("started", {}).get("S"))
        if started is None:
            raise ValueError(f"started: {raw.get('started')!r} is no time")
        return UnfinishedRun(run=run, slices=slices, done=done, started=started)
    except (KeyError, TypeError, ValueError, ValidationError) as error:
        raise malformed(raw, f"{type(error).__name__}: {error}") from None


def _adopted_at(raw: dict[str, Any]) -> datetime:
    """When the region's janitor tags were adopted: an unreadable record is a MalformedItem, never
    "not adopted yet" (the next enforce run would adopt the tags again, and `tampered` say nothing)."""
    at = parse_time((raw.get("at") or {}).get("S"))
    if at is None:
        raise malformed(raw, f"at: {raw.get('at')!r}")
    return at


class LedgerMissing(Exception):
    """Regions without a ledger table (or where it cannot be checked): an enforce run is refused.

    `absent` names the regions found without the table (all of `regions` unless told), `failures` the
    AWS errors of the checks that failed."""

    def __init__(
        self,
        regions: Sequence[str],
        table: str,
        *,
        details: Sequence[str] = (),
        absent: Sequence[str] | None = None,
        failures: Sequence[Exception] = (),
    ) -> None:
        self.regions = list(regions)
        self.table = table
        self.absent = list(regions if absent is None else absent)
        self.failures = list(failures)
        why = "; ".join(details) or f"no ledger table {table} in {', '.join(regions)}"
        super().__init__(
            f"{why}: enforce records every step in the ledger; `ami-janitor ledger create` makes it"
        )


class CreateResult(BaseModel):
    """What `ledger create` did in one region."""

    # Off the scheduled run's path: its validator is built when first used, not at each cold start.
    model_config = ConfigDict(defer_build=True)

    region: str
    table: str
    created: bool = False
    changes: list[str] = []
    writers: list[str] = []


def key(image_id: str) -> dict[str, Any]:
    return {"pk": {"S": f"image#{image_id}"}, "sk": {"S": "item"}}


# The one item that is not an AMI's: when an enforce run adopted the janitor tags of the region.
ADOPTION_KEY: dict[str, Any] = {"pk": {"S": "ledger#adoption"}, "sk": {"S": "item"}}
SCAN_PAGE = 1000  # Scan answers up to 1 MB a page whatever the limit; this only bounds the item count


def not_found(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in (
        "ResourceNotFoundException",
        "PolicyNotFoundException",
    )


def exists(clients: RegionClients, table: str) -> bool:
    try:
        clients.dynamodb.describe_table(TableName=table)
    except ClientError as error:
        if not_found(error):
            return False
        raise
    return True


def role_arn_of(caller_arn: str) -> list[str]:
    """The `aws:PrincipalArn` patterns of a GetCallerIdentity ARN.

    An assumed-role session (arn:aws:sts::N:assumed-role/NAME/SESSION) acts as its role, whose ARN
    has a path the session ARN drops: `role/NAME` and `role/*/NAME` match that role whatever its path
    (role names are unique in an account). Users and roles are returned as they are."""
    parts = caller_arn.split(":", 5)
    if len(parts) == 6 and parts[2] == "sts" and parts[5].startswith("assumed-role/"):
        name = parts[5].split("/")[1]
        prefix = f"arn:{parts[1]}:iam::{parts[4]}:role/"
        return [f"{prefix}{name}", f"{prefix}*/{name}"]
    return [caller_arn]


def caller_writers(clients: RegionClients) -> list[str]:
    """The caller's principal as resource policy patterns (GetCallerIdentity needs no permission)."""
    return role_arn_of(clients.sts.get_caller_identity()["Arn"])


def janitor_principal_pattern(partition: str) -> str:
    return f"arn:{partition}:iam::*:role{ROLE_PATH}*"


def resource_policy(table_arn: str, writers: Iterable[str], *, partition: str = "aws") -> dict[str, Any]:
    """Deny every write to principals outside the IAM path /ami-janitor/ and the named writers.

    A Deny alone grants nothing: the roles still need their identity policies. `table_arn` may be a
    CDK token (the stacks use the same document)."""
    principals = [janitor_principal_pattern(partition), *sorted(set(writers))]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": POLICY_SID,
                "Effect": "Deny",
                "Principal": "*",
                "Action": WRITE_ACTIONS,
                "Resource": [table_arn, f"{table_arn}/*"],
                "Condition": {"ArnNotLike": {"aws:PrincipalArn": principals}},
            }
        ],
    }


def writers_in(policy_json: str, partition: str) -> list[str]:
    """The writers a stored policy names besides the /ami-janitor/ path (kept when it is updated)."""
    try:
        document = json.loads(policy_json)
    except ValueError:
        return []
    for statement in document.get("Statement", []):
        if statement.get("Sid") == POLICY_SID:
            principals = statement.get("Condition", {}).get("ArnNotLike", {}).get("aws:PrincipalArn", [])
            if isinstance(principals, str):
                principals = [principals]
            return [p for p in principals if p != janitor_principal_pattern(partition)]
    return []


def _create(db: "DynamoDBClient", table: str) -> Any:
    """CreateTable; None where the table exists already. Sent again after a lost answer, CreateTable
    meets the table its first attempt made (ResourceInUseException): the caller then reads it and
    checks every setting, as for a table someone else made just before."""
    try:
        return db.create_table(
            TableName=table,
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            KeySchema=[
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"},
            ],
            BillingMode="PAY_PER_REQUEST",
            SSESpecification={"Enabled": True, "SSEType": "KMS"},  # the AWS managed key aws/dynamodb
            DeletionProtectionEnabled=True,
            Tags=[{"Key": "ami-janitor:ledger", "Value": "true"}],
        )["TableDescription"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "ResourceInUseException":
            raise
        return None


def _ttl_enabled(db: "DynamoDBClient", table: str) -> bool:
    ttl = db.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    return (
        ttl.get("TimeToLiveStatus") in ("ENABLED", "ENABLING") and ttl.get("AttributeName") == TTL_ATTRIBUTE
    )


def _enable_ttl(db: "DynamoDBClient", table: str) -> None:
    """UpdateTimeToLive. Sent again after a lost answer, it is refused (ValidationException: TTL is
    already enabled) by the TTL its first attempt enabled: done where the table now shows it."""
    try:
        db.update_time_to_live(
            TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE}
        )
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "ValidationException" or not _ttl_enabled(
            db, table
        ):
            raise


def create_table(clients: RegionClients, table: str, writer_arns: Sequence[str]) -> CreateResult:
    """Make the ledger table, or adopt an existing one: on-demand, encrypted with the AWS managed key,
    deletion protection, PITR, TTL and the resource policy. Idempotent: only what differs is changed.

    The resource policy is written last, so the writes before it are never refused to the caller."""
    db = clients.dynamodb
    result = CreateResult(region=clients.region, table=table)
    try:
        description = db.describe_table(TableName=table)["Table"]
    except ClientError as error:
        if not not_found(error):
            raise
        made = _create(db, table)
        if made is not None:
            result.created = True
            result.changes.append("created the table (on demand, KMS encryption, deletion protection)")
        description = made or db.describe_table(TableName=table)["Table"]
    # A table being created (here, or by someone else just before) takes its settings once ACTIVE.
    db.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 2, "MaxAttempts": 60})
    arn = description["TableArn"]
    partition = arn.split(":")[1]
    if not result.created and not description.get("DeletionProtectionEnabled"):
        db.update_table(TableName=table, DeletionProtectionEnabled=True)
        result.changes.append("enabled deletion protection")
    backups = db.describe_continuous_backups(TableName=table)["ContinuousBackupsDescription"]
    pitr = (backups.get("PointInTimeRecoveryDescription") or {}).get("PointInTimeRecoveryStatus")
    if pitr != "ENABLED":
        db.update_continuous_backups(
            TableName=table, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
        )
        result.changes.append("enabled point-in-time recovery")
    if not _ttl_enabled(db, table):
        _enable_ttl(db, table)
        result.changes.append(f"enabled TTL on {TTL_ATTRIBUTE}")
    try:
        stored: str | None = db.get_resource_policy(ResourceArn=arn)["Policy"]
    except ClientError as error:
        if not not_found(error):
            raise
        stored = None
    writers = sorted(set(writer_arns) | set(writers_in(stored, partition) if stored else []))
    wanted = resource_policy(arn, writers, partition=partition)
    if stored is None or json.loads(stored) != wanted:
        db.put_resource_policy(ResourceArn=arn, Policy=json.dumps(wanted))
        result.changes.append("wrote the resource policy (writes only from /ami-janitor/ and the writers)")
    result.writers = writers
    return result


class Prior(BaseModel):
    """What a stage changes, recorded before it changes it."""

    # Off the scheduled run's path: its validator is built when first used, not at each cold start.
    model_config = ConfigDict(defer_build=True)

    deprecation: datetime | None = None
    launch_permissions: tuple[str, ...] = ()
    already_disabled: bool = False

    def stage_at(self, at: datetime) -> LedgerStage:
        """The stage's record, made at `at`, holding this."""
        return LedgerStage(
            at=at,
            prior_deprecation=self.deprecation,
            prior_launch_permissions=self.launch_permissions,
            already_disabled=self.already_disabled,
        )


def _value(data: Any) -> Any:
    return to_attribute(data)


def _with_write_id(request: dict[str, Any], write_id: str) -> dict[str, Any]:
    """The request with `last_write = <write_id>` added to its SET clause (or a SET clause added)."""
    expression = str(request["UpdateExpression"])
    assignment = f"#{WRITE_ID_ATTRIBUTE} = :{WRITE_ID_ATTRIBUTE}"
    if expression.startswith("SET "):
        expression = f"SET {assignment}, {expression[4:]}"
    else:
        expression = f"SET {assignment} {expression}"
    return {
        **request,
        "UpdateExpression": expression,
        "ExpressionAttributeNames": {
            **request.get("ExpressionAttributeNames", {}),
            f"#{WRITE_ID_ATTRIBUTE}": WRITE_ID_ATTRIBUTE,
        },
        "ExpressionAttributeValues": {
            **request.get("ExpressionAttributeValues", {}),
            f":{WRITE_ID_ATTRIBUTE}": _value(write_id),
        },
    }


def _redone_as_read(stage: str, placeholder: str, seen: datetime | None, values: dict[str, Any]) -> str:
    """The condition that the stage (its name's placeholder) was done again last at `seen` (None: never),
    as the caller read it; its value put in `values`."""
    if seen is None:
        return f"attribute_not_exists(stages.{stage}.redone)"
    values[placeholder] = _value(iso(seen))
    return f"stages.{stage}.redone = {placeholder}"


def conditional_update(db: "DynamoDBClient", table: str, item_key: dict[str, Any], **request: Any) -> Written:
    """UpdateItem, "already-recorded" where its condition fails against another writer's item.

    The SDK sends a write again when its answer was lost (a timeout, a closed connection): that retry
    fails its condition against the first attempt, which took effect. The item DynamoDB returns with
    the failure still holds this call's write id then: the write is ours, so it is "recorded"."""
    write_id = uuid.uuid4().hex
    try:
        db.update_item(
            TableName=table,
            Key=item_key,
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
            **_with_write_id(request, write_id),
        )
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
            raise
        stored: Any = cast(Any, error.response).get("Item") or {}  # ALL_OLD: the item as it is now
        if stored.get(WRITE_ID_ATTRIBUTE, {}).get("S") == write_id:
            return "recorded"
        return "already-recorded"
    return "recorded"


class MalformedItem(ValueError):
    """An item the janitor cannot read back (written by hand, or by another tool): its key first, so
    that an operator finds it in a table of thousands (a region's error keeps 300 characters)."""


def _item(raw: dict[str, Any]) -> LedgerItem:
    """An AMI's item, which must be at its own key: one whose `image_id` names another AMI (written by
    hand) would be filed as that AMI's record, and its own AMI left with none."""
    internal = ("pk", "sk", "last_stage", WRITE_ID_ATTRIBUTE)
    try:
        data = {k: from_attribute(v) for k, v in raw.items() if k not in internal}
        if "last_stage" in raw:
            data["written_last_stage"] = from_attribute(raw["last_stage"])
        item = LedgerItem.model_validate(data)
    except ValidationError as error:
        problem = describe_validation_error(error)
    except (KeyError, TypeError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}"
    else:
        expected = key(item.image_id)
        if raw.get("pk") == expected["pk"] and raw.get("sk") == expected["sk"]:
            return item
        problem = f"image_id {item.image_id} is not the AMI of its key (image#<ami id>, sort key item)"
    raise malformed(raw, problem)


def malformed(raw: dict[str, Any], problem: str) -> "MalformedItem":
    """An item the janitor cannot read back, its key first (see MalformedItem)."""
    partition = str((raw.get("pk") or {}).get("S") or "?")
    return MalformedItem(f"ledger item {partition} cannot be read: {problem}")


class _Made:
    """The ledger's records of what the janitor made: copies (on the source), replicas (on the copy),
    grants and bakes. Ledger provides the table and the conditional update."""

    clients: RegionClients
    table: str

    def _update(self, image_id: str, **request: Any) -> Written:
        raise NotImplementedError

    def exists(self) -> bool:
        """The table is there (DescribeTable): what a writer checks before an EC2 change it records."""
        return exists(self.clients, self.table)

    def require(self) -> None:
        """LedgerMissing unless the table is there."""
        if not self.exists():
            raise LedgerMissing([self.clients.region], self.table)

    def record_copy(self, copy: LedgerCopy) -> Written:
        """Record a copy on its source's item before CopyImage is called, once per target region and
        generation: "already-recorded" when that generation was recorded before (by this copy's earlier
        attempt or a racing worker; CopyImage with the same ClientToken answers with the same copy).

        Copies are a map by "<region>#<generation>", so the condition can name one copy."""
        self._update(
            copy.source_image_id,
            UpdateExpression="SET image_id = if_not_exists(image_id, :id), copies = if_not_exists(copies, :none)",
            ExpressionAttributeValues={":id": _value(copy.source_image_id), ":none": _value({})},
        )
        entry = copy.model_dump(mode="json", exclude_none=True)
        return self._update(
            copy.source_image_id,
            UpdateExpression="SET copies.#copy = :copy",
            ConditionExpression="attribute_not_exists(copies.#copy)",
            ExpressionAttributeNames={"#copy": f"{copy.region}#{copy.generation}"},
            ExpressionAttributeValues={":copy": _value(entry)},
        )

    def confirm_copy(self, copy: LedgerCopy, image_id: str) -> Written:
        """After the copy's own item records it (record_replica): its id on the source's record of that
        generation, which is then made. The copy's item expires `retention_days` after the janitor
        retired it, and the source's record, without the id, would read as a generation started and
        never made: its token would be used again, and EC2 would answer with the deregistered copy."""
        return self._update(
            copy.source_image_id,
            UpdateExpression="SET copies.#copy.image_id = :image",
            ConditionExpression="attribute_exists(copies.#copy)",
            ExpressionAttributeNames={"#copy": f"{copy.region}#{copy.generation}"},
            ExpressionAttributeValues={":image": _value(image_id)},
        )

    def record_replica(self, image_id: str, replica: LedgerCopy) -> Written:
        """Record, on the new AMI's item in its own region's ledger, that the janitor made it as this copy
        (with the source's CreationDate: a replica's age and order). Repeating the same copy (same
        ClientToken) is "recorded" again; another record on the same AMI is refused."""
        entry = replica.model_copy(update={"image_id": image_id}).model_dump(mode="json", exclude_none=True)
        return self._update(
            image_id,
            UpdateExpression="SET image_id = :id, replica = :replica",
            ConditionExpression="attribute_not_exists(replica) OR replica.#token = :token",
            ExpressionAttributeNames={"#token": "token"},
            ExpressionAttributeValues={
                ":id": _value(image_id),
                ":replica": _value(entry),
                ":token": _value(replica.token),
            },
        )

    def record_grants(self, image_id: str, grants: Iterable[str]) -> Written:
        """Add launch permissions (LaunchPermission keys) to what the janitor granted on this AMI, before
        granting them, marked as not yet made (`granting`) until confirm_grants (string sets: adding one
        twice is a no-op)."""
        keys = set(grants)
        if not keys:
            return "already-recorded"
        return self._update(
            image_id,
            # A grant found in place before (somebody else's) and gone since is the janitor's once it makes it.
            UpdateExpression="SET image_id = :id ADD grants :grants, granting :grants DELETE grants_found :grants",
            ExpressionAttributeValues={":id": _value(image_id), ":grants": {"SS": sorted(keys)}},
        )

    def confirm_grants(self, image_id: str, grants: Iterable[str]) -> Written:
        """After ModifyImageAttribute granted them: they are made (the mark goes; the record stays)."""
        keys = set(grants)
        if not keys:
            return "already-recorded"
        return self._update(
            image_id,
            UpdateExpression="DELETE granting :grants",
            ConditionExpression="attribute_exists(granting)",
            ExpressionAttributeValues={":grants": {"SS": sorted(keys)}},
        )

    def record_found(self, image_id: str, grants: Iterable[str]) -> Written:
        """Record launch permissions the family lists that EC2 showed before the janitor granted them:
        somebody else made them, so they are kept apart from the janitor's own (`grants_found`, never
        revoked); recorded so that the next run does not plan them again."""
        keys = set(grants)
        if not keys:
            return "already-recorded"
        return self._update(
            image_id,
            UpdateExpression="SET image_id = :id ADD grants_found :grants",
            ExpressionAttributeValues={":id": _value(image_id), ":grants": {"SS": sorted(keys)}},
        )

    def forget_grants(self, image_id: str, grants: Iterable[str]) -> Written:
        """Remove launch permissions from what the janitor granted, after revoking them (the set goes
        with its last element)."""
        keys = set(grants)
        if not keys:
            return "already-recorded"
        return self._update(
            image_id,
            UpdateExpression="DELETE grants :grants, granting :grants",
            ConditionExpression="attribute_exists(grants)",
            ExpressionAttributeValues={":grants": {"SS": sorted(keys)}},
        )

    def record_bake(self, image_id: str, bake: LedgerBake) -> Written:
        """Record, on a new AMI's item, the instance it was baked from and when (once: an AMI has one)."""
        return self._update(
            image_id,
            UpdateExpression="SET image_id = :id, bakes = :bakes",
            ConditionExpression="attribute_not_exists(bakes)",
            ExpressionAttributeValues={
                ":id": _value(image_id),
                ":bakes": _value([bake.model_dump(mode="json")]),
            },
        )


class Ledger(_Made):
    """The ledger table of one region: the item API the engine uses."""

    def __init__(
        self,
        clients: RegionClients,
        table: str,
        *,
        retention_days: int = 90,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.clients = clients
        self.table = table
        self.retention_days = retention_days
        self.sleep = sleep  # passed in: the wait before unprocessed keys are asked again

    @property
    def _db(self) -> "DynamoDBClient":
        return self.clients.dynamodb

    def _update(self, image_id: str, **request: Any) -> Written:
        return conditional_update(self._db, self.table, key(image_id), **request)

    def record_candidate(self, image_id: str, at: datetime) -> Written:
        """Start the candidate clock, once: only where no open candidate record exists (an item closed
        by a rescue starts afresh; its grants and copies stay)."""
        return self._update(
            image_id,
            UpdateExpression="SET image_id = :id, first_candidate = :at, stages = :none "
            "REMOVE closed, last_stage, snapshots, deregistered, #ttl",
            ConditionExpression="attribute_not_exists(first_candidate) OR attribute_exists(closed)",
            ExpressionAttributeNames={"#ttl": TTL_ATTRIBUTE},
            ExpressionAttributeValues={":id": _value(image_id), ":at": _value(iso(at)), ":none": _value({})},
        )

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
        """Record a stage before applying it, once: only where the last recorded stage is `previous`
        (by default the stage before it; None for the first stage applied), on an open candidate.

        Two runs that both saw `previous` race here: one records, the other gets "already-recorded".
        Deregistration records the AMI's own `snapshots` (the only ones a later run may delete without
        it); its confirmation sets the TTL."""
        if previous == "default":
            index = STAGES.index(stage)
            previous = STAGES[index - 1] if index else None
        entry = prior.stage_at(at)
        values: dict[str, Any] = {
            ":stage": _value(stage),
            ":entry": _value(entry.model_dump(mode="json", exclude_defaults=True)),
        }
        condition = "attribute_exists(first_candidate) AND attribute_not_exists(closed)"
        if previous is None:
            condition += " AND attribute_not_exists(last_stage)"
        else:
            condition += " AND last_stage = :previous"
            values[":previous"] = _value(previous)
        update = "SET stages.#stage = :entry"
        if previous is None or STAGES.index(stage) > STAGES.index(previous):
            # The table's last stage is the latest by order, as the item is read back (LedgerItem).
            update += ", last_stage = :stage"
        else:
            del values[":stage"]
        names: dict[str, str] = {"#stage": stage}
        if stage == "deregister":
            update += ", snapshots = :snapshots"
            values[":snapshots"] = _value(
                [{"snapshot_id": s, "image_id": image_id} for s in sorted(set(snapshots))]
            )
        return self._update(
            image_id,
            UpdateExpression=update,
            ConditionExpression=condition,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    def redo_stage(
        self, image_id: str, stage: Stage, at: datetime, prior: Prior, seen: datetime | None = None
    ) -> Written:
        """Before a stage an earlier run recorded (and EC2 no longer shows, or never took) is done again:
        "recorded" only where the item still records it, is still open, and the stage was not done again
        since the caller read the item (`seen`: its `redone` as read, None where it had none). A rescue
        since the caller read the item closed it (or a new candidate clock replaced it): the stage is
        not done again. Another run that did it again since (two runs that both read it undone)
        recorded what it changed, which stands, as a first record does against a second run's. Writes
        when it is done again (`redone`: the next stage's delay counts from then, not from the first
        record) and `prior`, what it changes this time, in place of the first record's (the owner may
        have enabled the AMI and shared it, or set a deprecation time, since): a rescue restores that.
        The record is the janitor's own from then on, no longer one adopted from tags."""
        entry = prior.stage_at(at).model_dump(mode="json", exclude_defaults=True)
        recorded = ("prior_deprecation", "prior_launch_permissions", "already_disabled")
        values: dict[str, Any] = {":at": _value(iso(at))}
        assignments = ["stages.#stage.redone = :at"]
        for name in recorded:
            if name in entry:
                assignments.append(f"stages.#stage.{name} = :{name}")
                values[f":{name}"] = _value(entry[name])
        removed = [f"stages.#stage.{name}" for name in (*recorded, "adopted") if name not in entry]
        condition = "attribute_exists(stages.#stage) AND attribute_not_exists(closed) AND " + _redone_as_read(
            "#stage", ":seen", seen, values
        )
        return self._update(
            image_id,
            UpdateExpression=f"SET {', '.join(assignments)} REMOVE {', '.join(removed)}",
            ConditionExpression=condition,
            ExpressionAttributeNames={"#stage": stage},
            ExpressionAttributeValues=values,
        )

    def confirm_stage(self, image_id: str, stage: Stage, at: datetime) -> Written:
        """EC2 accepted the stage's change: a later run no longer does it again."""
        return self._update(
            image_id,
            UpdateExpression="SET stages.#stage.confirmed = :at",
            ConditionExpression="attribute_exists(stages.#stage) AND attribute_not_exists(closed)",
            ExpressionAttributeNames={"#stage": stage},
            ExpressionAttributeValues={":at": _value(iso(at))},
        )

    def confirm_deregistered(self, image_id: str, at: datetime) -> Written:
        """The AMI is gone and its recorded snapshots were handled: nothing is left to finish; the item
        expires retention_days later (TTL)."""
        return self._update(
            image_id,
            UpdateExpression="SET deregistered = :at, #ttl = :ttl",
            ConditionExpression="attribute_exists(stages.deregister) AND attribute_not_exists(deregistered)",
            ExpressionAttributeNames={"#ttl": TTL_ATTRIBUTE},
            ExpressionAttributeValues={
                ":at": _value(iso(at)),
                ":ttl": _value(int((at + timedelta(days=self.retention_days)).timestamp())),
            },
        )

    def adopt(self, item: LedgerItem) -> Written:
        """Write an item adopted from an older janitor's tags, only where the AMI has none yet."""
        data = item.model_dump(mode="json", exclude_none=True)
        data = {k: v for k, v in data.items() if v not in ((), [], {}) or k == "stages"}
        for grants in ("grants", "granting", "grants_found"):
            if getattr(item, grants):
                data[grants] = set(getattr(item, grants))  # string sets: grants come and go one by one
        if item.last_stage is not None:
            data["last_stage"] = item.last_stage
        names = {f"#{k}": k for k in data}
        return self._update(
            item.image_id,
            UpdateExpression="SET " + ", ".join(f"#{k} = :{k}" for k in data),
            ConditionExpression="attribute_not_exists(pk)",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues={f":{k}": _value(v) for k, v in data.items()},
        )

    def close(
        self,
        image_id: str,
        at: datetime,
        last_stage: Stage | None,
        redone: Mapping[Stage, datetime | None] | None = None,
    ) -> Written:
        """Close an open candidate record (a rescue) whose last stage is still `last_stage`, the last the
        rescue undid, and whose stages were done again no later than the rescue read (`redone`: each
        recorded stage's `redone` as read): a stage recorded or done again since it read the item (a
        slice that read the AMI before it came back into use) fails the condition, and the rescue reads
        the AMI again. Its history stays until a new candidate clock."""
        condition = "attribute_exists(first_candidate) AND attribute_not_exists(closed)"
        values: dict[str, Any] = {":at": _value(iso(at))}
        names: dict[str, str] = {}
        if last_stage is None:
            condition += " AND attribute_not_exists(last_stage)"
        else:
            condition += " AND last_stage = :seen"
            values[":seen"] = _value(last_stage)
        for index, (stage, when) in enumerate(sorted((redone or {}).items())):
            names[f"#s{index}"] = stage
            condition += " AND " + _redone_as_read(f"#s{index}", f":r{index}", when, values)
        return self._update(
            image_id,
            UpdateExpression="SET closed = :at",
            ConditionExpression=condition,
            ExpressionAttributeValues=values,
            **({"ExpressionAttributeNames": names} if names else {}),
        )

    def reopen(self, image_id: str, stage: Stage) -> Written:
        """Open again a clock a rescue closed while `stage` was being applied (recorded before the rescue
        read the item, taken by EC2 after it): the next run judges the AMI from what EC2 shows, and
        rescues it again where it is still in use. Only where `stage` is still the last recorded."""
        return self._update(
            image_id,
            UpdateExpression="REMOVE closed",
            ConditionExpression="attribute_exists(closed) AND last_stage = :stage",
            ExpressionAttributeValues={":stage": _value(stage)},
        )

    def read_all(self) -> LedgerView:
        """Every item of the table, read once per run (Scan, consistent, 1 MB pages): what the janitor
        has done in the region. The table holds only AMIs it acted on (items of deregistered AMIs
        expire), so this is the janitor's own work, not the fleet."""
        items: dict[str, LedgerItem] = {}
        adopted = None
        unfinished: list[UnfinishedRun] = []
        request: dict[str, Any] = {"TableName": self.table, "ConsistentRead": True, "Limit": SCAN_PAGE}
        while True:
            page = self._db.scan(**request)
            for raw in page.get("Items", []):
                partition = raw.get("pk", {}).get("S", "")
                if partition == ADOPTION_KEY["pk"]["S"]:
                    adopted = _adopted_at(raw)
                elif partition.startswith("image#"):
                    item = _item(raw)
                    items[item.image_id] = item
                elif partition.startswith("run#") and (run := _unfinished_run(raw)) is not None:
                    unfinished.append(run)
            if not page.get("LastEvaluatedKey"):
                return LedgerView(
                    table=self.table, items=items, adopted=adopted, unfinished_runs=tuple(unfinished)
                )
            request["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def record_adoption(self, at: datetime) -> Written:
        """Mark the region's janitor tags adopted, once (the first enforce run with a ledger)."""
        return conditional_update(
            self._db,
            self.table,
            ADOPTION_KEY,
            UpdateExpression="SET #at = :at",
            ConditionExpression="attribute_not_exists(#at)",
            ExpressionAttributeNames={"#at": "at"},
            ExpressionAttributeValues={":at": _value(iso(at))},
        )

    def read_items(self, image_ids: Iterable[str]) -> dict[str, LedgerItem]:
        """The items of these AMIs (absent ones are left out): BatchGetItem, 100 keys a call,
        consistent reads, unprocessed keys asked again."""
        wanted = sorted(set(image_ids))
        found: dict[str, LedgerItem] = {}
        for start in range(0, len(wanted), BATCH_GET_KEYS):
            keys: list[Any] = [key(i) for i in wanted[start : start + BATCH_GET_KEYS]]
            for attempt in range(_BATCH_RETRIES):
                if attempt:
                    self.sleep(random.uniform(0, _BATCH_BACKOFF_SECONDS * 2 ** (attempt - 1)))
                answer = self._db.batch_get_item(
                    RequestItems={self.table: {"Keys": keys, "ConsistentRead": True}}
                )
                for raw in answer.get("Responses", {}).get(self.table, []):
                    item = _item(raw)
                    found[item.image_id] = item
                unprocessed: dict[str, Any] = dict(answer.get("UnprocessedKeys") or {})
                keys = list(unprocessed.get(self.table, {}).get("Keys", []))
                if not keys:
                    break
            else:
                # As DynamoDB names the throttling it reports: every caller handles an AWS error.
                message = f"{self.table}: BatchGetItem left {len(keys)} keys unprocessed after {_BATCH_RETRIES} tries"
                raise ClientError(
                    {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": message}},
                    "BatchGetItem",
                )
        return found


LedgerFor = Callable[[str], Ledger]


def ledgers(clients_for: Callable[[str], RegionClients], config: LedgerConfig) -> LedgerFor:
    """The ledger of each region, as the policy names it."""
    return lambda region: Ledger(clients_for(region), config.table, retention_days=config.retention_days)
