"""A run's record in the ledger table: how many slices its due stages were cut into, which are done,
and their counts, so that the run's summary waits for its last slice and is sent once.

Key: `pk` = "run#<region>#<run>" (the plan's generated_at), `sk` = "item"; a scheduled event's claim
(the run that queued its slices, and when it claimed the event) `pk` = "event#<region>#<event id>".
The ledger's Scan reads them only for the runs whose slices were not all counted
(LedgerView.unfinished_runs): the next scheduled run reports one once it is older than a queued
slice may be, and marks it reported. They expire with the ledger's retention.
Every write is conditional: a slice delivered twice (SQS is at least once) or a write the SDK sent
again is counted once, and only one worker claims the summary.
"""

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict

from ami_janitor.aws.ledger import TTL_ATTRIBUTE, Written, conditional_update, malformed
from ami_janitor.core.model import iso, parse_time

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

PERMISSIONS: list[str] = sorted(["dynamodb:GetItem", "dynamodb:UpdateItem"])
# What slices add up (ActionResult counts); the plan's own summary is stored once at the start.
# not_run: AMIs whose stages a slice dropped whole (the policy or its mode changed, or it went stale).
COUNTERS = ("snapshots_deleted", "actions_failed", "held_back", "not_run")


class RunProgress(BaseModel):
    """A run's record as read back: its slices, those done, and the counts they added."""

    # Off the scheduled run's path: its validator is built when first used, not at each cold start.
    model_config = ConfigDict(defer_build=True)

    slices: int
    done: frozenset[int] = frozenset()
    counts: dict[str, int] = {}
    plan_summary: dict[str, int] = {}
    summary_sent: str | None = None
    # Each slice's digest (core.slices.slice_digest), by index, as the run queued it.
    digests: dict[int, str] = {}

    @property
    def complete(self) -> bool:
        return len(self.done) >= self.slices


class RunNotStarted(RuntimeError):
    """A slice of a run whose record is not in the table (never started, or expired)."""


class SliceNotRecorded(RuntimeError):
    """A slice that differs from what its run recorded when it queued it: not the run's own."""


def run_key(region: str, run: str) -> dict[str, Any]:
    return {"pk": {"S": f"run#{region}#{run}"}, "sk": {"S": "item"}}


def event_key(region: str, event_id: str) -> dict[str, Any]:
    return {"pk": {"S": f"event#{region}#{event_id}"}, "sk": {"S": "item"}}


# A scheduled event's claim outlives every delivery of the event: Lambda runs a failed invocation again
# within the event's maximum age (two hours), EventBridge delivers it again within a day.
EVENT_CLAIM_DAYS = 2
# The scheduled function's timeout (infra/scheduled_run.py): the run that claimed an event at T (its
# `now`, taken when its invocation began) is over by T plus this, killed if not done. A younger claim
# not yet recorded may be its run's, between the claim and the record (two calls): it holds.
SCHEDULED_RUN_TIMEOUT = timedelta(minutes=15)


def _progress(raw: dict[str, Any]) -> RunProgress:
    """A run's record as read back (one with `slices`); one that cannot be read is a MalformedItem
    naming it (a ValidationError is a ValueError)."""
    try:
        return RunProgress(
            slices=int(raw["slices"]["N"]),
            done=frozenset(int(i) for i in raw.get("done", {}).get("SS", [])),
            counts={name: int(raw.get(f"n_{name}", {}).get("N", "0")) for name in COUNTERS},
            plan_summary={k: int(v["N"]) for k, v in raw.get("plan_summary", {}).get("M", {}).items()},
            summary_sent=raw.get("summary_sent", {}).get("S"),
            digests={int(k): v["S"] for k, v in raw.get("digests", {}).get("M", {}).items()},
        )
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise malformed(raw, f"{type(error).__name__}: {error}") from None


class RunRecords:
    def __init__(self, db: "DynamoDBClient", table: str, *, retention_days: int = 90) -> None:
        self.db = db
        self.table = table
        self.retention_days = retention_days

    def start(
        self,
        region: str,
        run: str,
        *,
        slices: int,
        plan_summary: Mapping[str, int],
        counts: Mapping[str, int],
        digests: Mapping[int, str],
        at: datetime,
    ) -> Written:
        """Record a run's slices before the first is queued: their digests (a worker runs only a slice
        that matches its run's record), the plan's summary and what the run did before its slices
        (rescues, clocks...). Once per run."""
        expires = int((at + timedelta(days=self.retention_days)).timestamp())
        return conditional_update(
            self.db,
            self.table,
            run_key(region, run),
            UpdateExpression=(
                "SET slices = :slices, started = :at, plan_summary = :summary, digests = :digests, "
                "#ttl = :ttl, " + ", ".join(f"n_{name} = :n_{name}" for name in COUNTERS)
            ),
            ConditionExpression="attribute_not_exists(slices)",
            ExpressionAttributeNames={"#ttl": TTL_ATTRIBUTE},
            ExpressionAttributeValues={
                ":slices": {"N": str(slices)},
                ":at": {"S": iso(at) or ""},
                ":summary": {"M": {k: {"N": str(v)} for k, v in sorted(plan_summary.items())}},
                ":digests": {"M": {str(i): {"S": d} for i, d in sorted(digests.items())}},
                ":ttl": {"N": str(expires)},
                **{f":n_{name}": {"N": str(int(counts.get(name, 0)))} for name in COUNTERS},
            },
        )

    def claim_event(
        self, region: str, event_id: str, run: str, at: datetime, invocation: str | None = None
    ) -> str | None:
        """Claim a scheduled event's slices in `region` for `run` at `at` (the run's `now`), by
        `invocation` (Lambda's request id, which its retries of a failed invocation keep): None where
        this run claims it, else the run that claimed it first (a delivery of the same event before
        this one) and recorded its slices, or may still record them: its claim is younger than
        SCHEDULED_RUN_TIMEOUT and another invocation's (EventBridge delivered the event twice, and that
        run is between its claim and its record). A claim that recorded nothing is taken over where
        it is this invocation's own (Lambda runs a failed invocation again about a minute later: the
        earlier attempt is over, killed or failed before it recorded its slices), older than that, or
        says not when it was made. A claim this call wrote, whose answer was lost and sent again, is
        this run's (conditional_update)."""
        expires = int((at + timedelta(days=EVENT_CLAIM_DAYS)).timestamp())

        def claim(condition: str, **values: str) -> bool:
            return (
                conditional_update(
                    self.db,
                    self.table,
                    event_key(region, event_id),
                    UpdateExpression="SET #run = :run, claimed = :at, invocation = :invocation, #ttl = :ttl",
                    ConditionExpression=condition,
                    ExpressionAttributeNames={"#run": "run", "#ttl": TTL_ATTRIBUTE},
                    ExpressionAttributeValues={
                        ":run": {"S": run},
                        ":at": {"S": iso(at) or ""},
                        ":invocation": {"S": invocation or ""},
                        ":ttl": {"N": str(expires)},
                        **{f":{name}": {"S": value} for name, value in values.items()},
                    },
                )
                == "recorded"
            )

        if claim("attribute_not_exists(#run)"):
            return None
        claimed, claimed_at, by = self._claim(region, event_id)
        if claimed and self._recorded(region, claimed):
            return claimed
        retried = bool(invocation) and by == invocation
        if claimed and not retried and claimed_at is not None and at - claimed_at < SCHEDULED_RUN_TIMEOUT:
            return claimed
        if claim("attribute_not_exists(#run) OR #run = :claimed", claimed=claimed):
            return None
        return self._claim(region, event_id)[0] or claimed

    def _claim(self, region: str, event_id: str) -> tuple[str, datetime | None, str]:
        """The run that holds the event's claim ("" for none), when it claimed it, and by which
        invocation ("" where it says not)."""
        answer = self.db.get_item(TableName=self.table, Key=event_key(region, event_id), ConsistentRead=True)
        item = answer.get("Item", {})
        return (
            item.get("run", {}).get("S", ""),
            parse_time(item.get("claimed", {}).get("S")),
            item.get("invocation", {}).get("S", ""),
        )

    def release_event(self, region: str, event_id: str, run: str) -> None:
        """Give back `run`'s claim of a scheduled event none of whose slices were queued (SQS refused
        them all, or the run failed before): a retry of the event queues them."""
        try:
            self.db.update_item(
                TableName=self.table,
                Key=event_key(region, event_id),
                UpdateExpression="REMOVE #run",
                ConditionExpression="#run = :run",
                ExpressionAttributeNames={"#run": "run"},
                ExpressionAttributeValues={":run": {"S": run}},
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise

    def _recorded(self, region: str, run: str) -> bool:
        answer = self.db.get_item(TableName=self.table, Key=run_key(region, run), ConsistentRead=True)
        return "slices" in answer.get("Item", {})

    def finish_slice(
        self, region: str, run: str, index: int, counts: Mapping[str, int]
    ) -> RunProgress | None:
        """Count a slice as done with its counts; the record after it, or None where this slice was
        counted before (a second delivery, or this same write sent again by the SDK)."""
        try:
            answer = self.db.update_item(
                TableName=self.table,
                Key=run_key(region, run),
                UpdateExpression="ADD done :index, " + ", ".join(f"n_{name} :n_{name}" for name in COUNTERS),
                ConditionExpression="attribute_exists(slices) AND NOT contains(done, :one)",
                ExpressionAttributeValues={
                    ":index": {"SS": [str(index)]},
                    ":one": {"S": str(index)},
                    **{f":n_{name}": {"N": str(int(counts.get(name, 0)))} for name in COUNTERS},
                },
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise
            if "slices" not in (cast(Any, error.response).get("Item") or {}):
                raise RunNotStarted(f"no record of run {run} in {region}") from None
            return None
        return _progress(cast(dict[str, Any], answer["Attributes"]))

    def read(self, region: str, run: str) -> RunProgress:
        """The run's record; RunNotStarted where it has none, or only an item without its slices (a
        write after the record expired: finish_slice reads it the same way)."""
        answer = self.db.get_item(TableName=self.table, Key=run_key(region, run), ConsistentRead=True)
        item = cast(dict[str, Any], answer.get("Item") or {})
        if "slices" not in item:
            raise RunNotStarted(f"no record of run {run} in {region}")
        return _progress(item)

    def check_slice(self, region: str, run: str, index: int, digest: str) -> RunProgress:
        """The run's record, once it shows the run recorded this slice, by its digest, when it queued
        it; raises otherwise (RunNotStarted where the run has no record). Only the scheduled run's role
        writes the ledger table; others may be able to send to the queue."""
        progress = self.read(region, run)
        recorded = progress.digests.get(index)
        if recorded != digest:
            raise SliceNotRecorded(
                f"slice {index + 1} of run {run} in {region} is not the one its run recorded in the "
                f"ledger table ({'no digest' if recorded is None else 'another digest'}): not run"
            )
        return progress

    def claim_summary(self, region: str, run: str, at: datetime, *, index: int, delivery: int = 1) -> bool:
        """True for the one caller that sends the run's summary (after its last slice): the first to
        claim it, or a later delivery (`delivery`: SQS's receive count) of the slice whose delivery
        claimed it. SQS delivers a slice again only once the earlier delivery's invocation is over, so
        that one was killed mid-send (a timeout: no `release_summary` ran) and will send nothing."""
        written = conditional_update(
            self.db,
            self.table,
            run_key(region, run),
            # summary_confirmed expected (a run record without it, from before, counts as sent once
            # claimed): a claim whose holder was killed mid-send, on its slice's last delivery, is
            # then told from a summary sent (confirm_summary).
            UpdateExpression=(
                "SET summary_sent = :at, summary_slice = :index, summary_delivery = :delivery, "
                "summary_confirms = :yes"
            ),
            ConditionExpression=(
                "attribute_exists(slices) AND (attribute_not_exists(summary_sent) "
                "OR (summary_slice = :index AND summary_delivery < :delivery))"
            ),
            ExpressionAttributeValues={
                ":at": {"S": iso(at) or ""},
                ":index": {"N": str(index)},
                ":delivery": {"N": str(delivery)},
                ":yes": {"BOOL": True},
            },
        )
        return written == "recorded"

    def confirm_summary(self, region: str, run: str, at: datetime) -> None:
        """The run's summary was sent: its record says so (without it, the next run's Scan names the run,
        whose claimed summary may never have gone out)."""
        self.db.update_item(
            TableName=self.table,
            Key=run_key(region, run),
            UpdateExpression="SET summary_confirmed = :at",
            ExpressionAttributeValues={":at": {"S": iso(at) or ""}},
        )

    def mark_unfinished_reported(self, region: str, run: str, at: datetime) -> bool:
        """Mark this run reported as never finished, once a later run's report named it (the Scan then
        skips it); False where a run marked it already."""
        written = conditional_update(
            self.db,
            self.table,
            run_key(region, run),
            UpdateExpression="SET unfinished_reported = :at",
            ConditionExpression="attribute_exists(slices) AND attribute_not_exists(unfinished_reported)",
            ExpressionAttributeValues={":at": {"S": iso(at) or ""}},
        )
        return written == "recorded"

    def release_summary(self, region: str, run: str) -> None:
        """Give the claim back when the summary could not be sent: the slice is delivered again, and
        whoever claims next sends it (a summary may come twice, never not at all)."""
        self.db.update_item(
            TableName=self.table, Key=run_key(region, run), UpdateExpression="REMOVE summary_sent"
        )
