"""Latest rotation (and copy retries) on EC2 AMI state-change events."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration, Stack
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from ami_janitor.core.model import AMI_STATES
from infra.alerts import Alerts
from infra.dead_letters import DeadLetters
from infra.environment import AMI_EVENT_HANDLER, REPLICATION_QUEUE_URL
from infra.function import AsyncInvoke, JanitorFunction
from infra.permissions import Scope
from infra.replication import Replication

MAX_EVENT_AGE = Duration.hours(1)  # events are best effort anyway: the scheduled run reconciles
TARGET_RETRY_ATTEMPTS = 8
INVOKE_RETRY_ATTEMPTS = 2  # the handler converges on current state, so a retry is safe


class AmiEvents(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        code: lambda_.Code,
        permissions: Sequence[str],
        permission_scope: Scope,
        alerts: Alerts,
        dead_letters: DeadLetters,
        replication: Replication,
    ) -> None:
        super().__init__(scope, id)
        self.function = JanitorFunction(
            self,
            "Function",
            description="AMI state-change events (Latest rotation, copy retries)",
            handler=AMI_EVENT_HANDLER,
            code=code,
            permissions=permissions,
            permission_scope=permission_scope,
            alerts=alerts,
            timeout=Duration.minutes(5),
            memory_size=512,
            # One rotation at a time per region: concurrent events would race on the Latest tag.
            reserved_concurrency=1,
            environment={REPLICATION_QUEUE_URL: replication.queue.queue_url},
            infra=[replication.send_statement()],
            async_invoke=AsyncInvoke(
                retry_attempts=INVOKE_RETRY_ATTEMPTS,
                max_event_age=MAX_EVENT_AGE,
                on_failure=dead_letters.failed_invocations,
            ),
        )
        self.rule = events.Rule(
            self,
            "StateChange",
            description="ami-janitor: EC2 AMI state changes",
            event_pattern=events.EventPattern(
                source=["aws.ec2"],
                detail_type=["EC2 AMI State Change"],
                # Only this account's AMIs: a bus that receives other accounts' events (forwarded to it)
                # would otherwise have every such event rotate the region's groups.
                account=[Stack.of(self).account],
                # EventBridge delivers "EC2 AMI State Change" with the state in detail.State (capital S).
                detail={"State": list(AMI_STATES)},
            ),
        )
        self.rule.add_target(
            targets.LambdaFunction(
                self.function.function,
                dead_letter_queue=dead_letters.event_targets,
                max_event_age=MAX_EVENT_AGE,
                retry_attempts=TARGET_RETRY_ATTEMPTS,
            )
        )
