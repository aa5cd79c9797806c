"""One Logger and one Metrics for every handler: the same service and namespace everywhere."""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics

from ami_janitor.core.policy import Policy
from ami_janitor.handlers.events import METRICS_NAMESPACE, SERVICE

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE)


def paused(policy: Policy, **context: object) -> bool:
    """The kill switch: True, said in the log, when the policy is paused (the function writes nothing)."""
    if policy.mode != "paused":
        return False
    logger.warning("policy mode is paused: nothing runs", extra=context)
    return True
