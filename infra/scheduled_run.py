"""The scheduled run: reconcile (rotation, shares, replication) and clean up this region."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from infra.alerts import Alerts
from infra.dead_letters import DeadLetters
from infra.environment import (
    REPLICATION_QUEUE_URL,
    REPORT_BUCKET,
    SCHEDULED_HANDLER,
    TOPIC_ARN,
    WORK_QUEUE_URL,
)
from infra.function import AsyncInvoke, JanitorFunction
from infra.permissions import Scope, Statement
from infra.replication import Replication
from infra.reports import Reports
from infra.work_slices import WorkSlices

# A run that misses its slot by hours is better skipped: the next one reconciles everything.
MAX_EVENT_AGE = Duration.hours(2)
TARGET_RETRY_ATTEMPTS = 4
# One retry: a failed run usually fails again, and the next scheduled run starts afresh.
INVOKE_RETRY_ATTEMPTS = 1


class ScheduledRun(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        schedule: str,
        code: lambda_.Code,
        permissions: Sequence[str],
        permission_scope: Scope,
        alerts: Alerts,
        dead_letters: DeadLetters,
        reports: Reports,
        replication: Replication,
        work_slices: WorkSlices,
    ) -> None:
        super().__init__(scope, id)
        self.function = JanitorFunction(
            self,
            "Function",
            description="scheduled run (reconcile and clean up the region)",
            handler=SCHEDULED_HANDLER,
            code=code,
            permissions=permissions,
            permission_scope=permission_scope,
            alerts=alerts,
            # A large region's inventory and paced writes take minutes. aws/runs.py holds an event's claim
            # as long (SCHEDULED_RUN_TIMEOUT; the infra tests compare them).
            timeout=Duration.minutes(15),
            memory_size=1024,
            environment={
                REPORT_BUCKET: reports.bucket.bucket_name,
                TOPIC_ARN: alerts.topic.topic_arn,
                REPLICATION_QUEUE_URL: replication.queue.queue_url,
                WORK_QUEUE_URL: work_slices.queue.queue_url,
            },
            infra=[
                reports.write_statement(),
                Statement("PublishRunSummaries", ("sns:Publish",), (alerts.topic.topic_arn,)),
                replication.send_statement(),
                work_slices.send_statement(),
            ],
            async_invoke=AsyncInvoke(
                retry_attempts=INVOKE_RETRY_ATTEMPTS,
                max_event_age=MAX_EVENT_AGE,
                on_failure=dead_letters.failed_invocations,
            ),
        )
        self.rule = events.Rule(
            self,
            "Schedule",
            description="ami-janitor scheduled run",
            schedule=events.Schedule.expression(schedule),
        )
        self.rule.add_target(
            targets.LambdaFunction(
                self.function.function,
                dead_letter_queue=dead_letters.event_targets,
                max_event_age=MAX_EVENT_AGE,
                retry_attempts=TARGET_RETRY_ATTEMPTS,
            )
        )
