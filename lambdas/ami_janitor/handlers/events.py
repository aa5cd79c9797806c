"""Event and environment models of the Lambda handlers (parsed once, at the boundary)."""

from __future__ import annotations

import os
from typing import Literal

from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ami_janitor.core.model import AmiState
from ami_janitor.core.validation import describe_validation_error

# Powertools names (the deploy sets the same in POWERTOOLS_SERVICE_NAME / POWERTOOLS_METRICS_NAMESPACE;
# explicit here so a handler imported before its environment is set still has them).
SERVICE = "ami-janitor"
METRICS_NAMESPACE = "AmiJanitor"


class BadEvent(ValueError):
    """An event the handler cannot use: the message names the bad field. The invocation fails, so the
    event ends in the function's failure destination instead of being retried forever."""


class AmiStateDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    ImageId: str = Field(pattern=r"^ami-[0-9a-f]{8,17}$")
    State: AmiState
    RequestId: str | None = None
    ErrorMessage: str | None = None


class AmiStateChangeEvent(EventBridgeModel):
    source: Literal["aws.ec2"]
    detail_type: Literal["EC2 AMI State Change"] = Field(alias="detail-type")
    detail: AmiStateDetail


class ScheduledEvent(BaseModel):
    """The scheduled rule's event; only its time matters (the run uses the clock)."""

    model_config = ConfigDict(extra="allow")


class Environment(BaseModel):
    """What the deployed functions are given (infra/environment.py sets the same names)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    region: str = Field(alias="AWS_REGION", min_length=1)
    config: str = Field("policy.json", alias="AMI_JANITOR_CONFIG")
    report_bucket: str | None = Field(None, alias="REPORT_BUCKET")
    topic_arn: str | None = Field(None, alias="TOPIC_ARN")
    replication_queue_url: str | None = Field(None, alias="REPLICATION_QUEUE_URL")

    @classmethod
    def load(cls) -> Environment:
        try:
            return cls.model_validate(dict(os.environ))
        except ValidationError as error:
            raise RuntimeError(f"environment variable {describe_validation_error(error)}") from None


def parse_ami_event(raw: object) -> AmiStateChangeEvent:
    if not isinstance(raw, dict):
        raise BadEvent("the event is not a JSON object")
    try:
        return AmiStateChangeEvent.model_validate(raw)
    except ValidationError as error:
        raise BadEvent(f"malformed EC2 AMI State Change event: {describe_validation_error(error)}") from None
