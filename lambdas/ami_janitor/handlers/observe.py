"""One Logger and one Metrics for every handler: the same service and namespace everywhere."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

from ami_janitor.core.policy import Policy
from ami_janitor.handlers.events import METRICS_NAMESPACE, SERVICE

if TYPE_CHECKING:
    from ami_janitor.aws.executor import ActionResult

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE)


def count_done(results: Iterable[ActionResult]) -> None:
    """ImagesRetired and SnapshotsDeleted: what this invocation did (a plan's counts are what it would do:
    in dry-run nothing, with slices queued their workers count what they do)."""
    done = list(results)
    retired = sum(1 for r in done if r.action == "deregister" and r.status == "ok")
    metrics.add_metric(name="ImagesRetired", unit=MetricUnit.Count, value=retired)
    metrics.add_metric(
        name="SnapshotsDeleted", unit=MetricUnit.Count, value=sum(len(r.snapshots_deleted) for r in done)
    )


def paused(policy: Policy, **context: object) -> bool:
    """The kill switch: True, said in the log, when the policy is paused (the function writes nothing)."""
    if policy.mode != "paused":
        return False
    logger.warning("policy mode is paused: nothing runs", extra=context)
    return True
