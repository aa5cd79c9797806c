"""The boundary of the Lambda handlers: their events and environment (parsed once, into models) and the
answer of the scheduled run. The AMI state change event is its handler's (handlers.ami_event: only it
loads Powertools' EventBridge model). The other answers are the engine's (engine.BakeOutcome,
rotator.AmiEventOutcome) and Powertools' (the replication worker's partial batch response)."""

import os
from datetime import UTC, datetime
from typing import Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from ami_janitor.core.model import Outcome
from ami_janitor.core.policy import Mode, Policy, load_policy
from ami_janitor.core.validation import describe_validation_error
from ami_janitor.engine import RunSummary

# Powertools names (the deploy sets the same in POWERTOOLS_SERVICE_NAME / POWERTOOLS_METRICS_NAMESPACE;
# explicit here so a handler imported before its environment is set still has them).
SERVICE = "ami-janitor"
METRICS_NAMESPACE = "AmiJanitor"


class BadEvent(ValueError):
    """An event the handler cannot use: the message names the bad field. The invocation fails, so the
    event ends in the function's failure destination instead of being retried forever."""


class ScheduledEvent(BaseModel):
    """The schedule rule's event (EventBridge's Scheduled Event, or `{}` invoked by hand). Nothing in it
    steers the plan, which reads the clock: its time is only logged. Its id is the same in every
    delivery of it (a retry of a failed invocation, a second delivery): a run queues its slices once
    per event (engine.run's `event_id`)."""

    model_config = ConfigDict(extra="allow")

    id: str | None = Field(None, min_length=1)
    time: datetime | None = None
    # Another rule's event sent here (an AMI's state change, say) is refused, not taken for a run.
    detail_type: Literal["Scheduled Event"] | None = Field(None, alias="detail-type")


class BakeEvent(BaseModel):
    """The bake rule's input: `{"family": NAME, "time": SCHEDULED_TIME}`. The time is the scheduled
    event's, the same in every delivery of it (EventBridge delivers at least once), so the bake it
    names is the same: a repeated delivery meets its own image instead of making a second. Without
    it (`{"family": NAME}`, invoked by hand) the bake is named from the clock."""

    # Off the scheduled run's path: its validator is built when first used, not at each cold start.
    model_config = ConfigDict(defer_build=True, extra="forbid")

    family: str = Field(min_length=1)
    time: AwareDatetime | None = None

    @field_validator("time")
    @classmethod
    def _in_utc(cls, value: datetime | None) -> datetime | None:
        # The bake is named from its UTC time: one that has none (9999-12-31T23:00:00-05:00) is refused.
        if value is None:
            return None
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("has no UTC time within the years 1 to 9999") from None


class ScheduledRunResult(Outcome):
    """The scheduled run's answer: `{"mode": "paused"}`, or the mode, region and summary of the run."""

    mode: Mode
    region: str | None = None
    summary: RunSummary | None = None
    slices_queued: int = 0


class Environment(BaseModel):
    """What the deployed functions are given (infra/environment.py sets the same names)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    region: str = Field(alias="AWS_REGION", min_length=1)
    config: str = Field("policy.json", alias="AMI_JANITOR_CONFIG")
    report_bucket: str | None = Field(None, alias="REPORT_BUCKET")
    topic_arn: str | None = Field(None, alias="TOPIC_ARN")
    replication_queue_url: str | None = Field(None, alias="REPLICATION_QUEUE_URL")
    ami_events_queue_url: str | None = Field(None, alias="AMI_EVENTS_QUEUE_URL")
    work_queue_url: str | None = Field(None, alias="WORK_QUEUE_URL")

    @classmethod
    def load(cls) -> "Environment":
        try:
            return cls.model_validate(dict(os.environ))
        except ValidationError as error:
            raise RuntimeError(f"environment variable {describe_validation_error(error)}") from None


EventModel = TypeVar("EventModel", bound=BaseModel)


def parse_event(model: type[EventModel], raw: object, what: str, shape: str = "") -> EventModel:
    """The event as its model, or BadEvent naming what is wrong."""
    if not isinstance(raw, dict):
        raise BadEvent(f"the event is not a JSON object{shape}")
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise BadEvent(f"malformed {what}: {describe_validation_error(error)}") from None


def check_sqs_batch(raw: object, queue: str) -> None:
    """A batch as SQS hands it to a function: `Records`, each with its messageId, body and attributes.
    Anything else (an invocation by hand) is BadEvent naming what is wrong, before any record is read:
    the batch processor would fail on it as a TypeError or KeyError, or answer that it has no records."""
    records = raw.get("Records") if isinstance(raw, dict) else None
    if not isinstance(records, list) or not records:
        raise BadEvent(f"not a batch of the {queue}: a JSON object with a non-empty list `Records`")
    for index, record in enumerate(records):
        fields = record if isinstance(record, dict) else {}
        wanted = {"messageId": str, "body": str, "attributes": dict}
        missing = [name for name, kind in wanted.items() if not isinstance(fields.get(name), kind)]
        if missing:
            raise BadEvent(f"Records[{index}] is no SQS record: {', '.join(missing)} missing or malformed")


def parse_scheduled_event(raw: object) -> ScheduledEvent:
    return parse_event(ScheduledEvent, raw, "scheduled event")


def parse_bake_event(raw: object) -> BakeEvent:
    return parse_event(BakeEvent, raw, "bake event", ' like {"family": "NAME"}')


def configured() -> tuple[Environment, Policy]:
    """The function's environment and the policy it ships with (validated at synth, checked again)."""
    env = Environment.load()
    return env, load_policy(env.config)
