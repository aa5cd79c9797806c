"""Where failed deliveries and failed asynchronous invocations land, with an alarm on each queue."""

from __future__ import annotations

from aws_cdk import aws_sqs as sqs
from constructs import Construct

from infra.alerts import Alerts
from infra.nag import acknowledge
from infra.queues import secure_queue

_IS_A_DLQ = "This queue is itself a dead-letter queue ({}); a DLQ of a DLQ would only hide failures."
EVENT_TARGETS = "EventBridge target dead-letter queue"
FAILED_INVOCATIONS = "Lambda on-failure destination"


def watched_dead_letter_queue(scope: Construct, id: str, *, alerts: Alerts, what: str) -> sqs.Queue:
    """A dead-letter queue (`what` it receives) with an alarm on any message in it."""
    queue = secure_queue(scope, id)
    acknowledge(queue, "AwsSolutions-SQS3", _IS_A_DLQ.format(what))
    alerts.alarm_on_dead_letters(
        queue, "Messages", queue=queue, description=f"ami-janitor: a message reached the {what}"
    )
    return queue


class DeadLetters(Construct):
    """Two queues shared by the region's rules and functions.

    An EventBridge target DLQ receives only delivery failures (EventBridge could not invoke the
    function); an exception inside an asynchronously invoked function goes through Lambda's own
    retries and then to the function's on-failure destination. Both are needed.
    """

    def __init__(self, scope: Construct, id: str, *, alerts: Alerts) -> None:
        super().__init__(scope, id)
        self.event_targets = watched_dead_letter_queue(
            self, "EventTargets", alerts=alerts, what=EVENT_TARGETS
        )
        self.failed_invocations = watched_dead_letter_queue(
            self, "FailedInvocations", alerts=alerts, what=FAILED_INVOCATIONS
        )
