"""The work queue and its slice worker: a region's due stages past one invocation (design.md, "Scale")."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from infra.alerts import Alerts
from infra.environment import REPORT_BUCKET, SLICE_HANDLER, TOPIC_ARN
from infra.function import JanitorFunction
from infra.permissions import Scope, Statement
from infra.queues import consume, consume_statement, secure_queue
from infra.reports import Reports

# A slice's paced calls take at most about 5 minutes (engine.SLICE_BUDGET_SECONDS), its reads and
# retries a few more: well inside this.
# The worker's own figure (handlers/slices.py WORKER_TIMEOUT_SECONDS, which the infra tests compare).
WORKER_TIMEOUT = Duration.minutes(15)
MAX_RECEIVE_COUNT = 3
# A region's slices are one FIFO message group: SQS hands out one at a time whatever this is (the
# smallest an event source mapping takes). No reserved concurrency: it would throttle the poller.
MAX_CONCURRENCY = 2


class WorkSlices(Construct):
    """A FIFO queue of slices (one message group per region), one record per invocation, a redrive DLQ."""

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        code: lambda_.Code,
        permissions: Sequence[str],
        permission_scope: Scope,
        alerts: Alerts,
        reports: Reports,
        name_prefix: str | None = None,
    ) -> None:
        super().__init__(scope, id)
        # Named: a FIFO queue's name must end in .fifo (CloudFormation adds it to a generated name, the
        # emulator's does not). One stack per account and region, so the stack's name makes it unique
        # (or `name_prefix`, for a stack whose name is made at deploy time).
        prefix = name_prefix or Stack.of(self).stack_name
        self.dead_letters = secure_queue(self, "DeadLetters", fifo=True, queue_name=f"{prefix}-work-dlq.fifo")
        self.queue = secure_queue(
            self,
            "Queue",
            fifo=True,
            queue_name=f"{prefix}-work.fifo",
            # Lambda's advice for SQS sources: at least six times the function timeout.
            visibility_timeout=Duration.seconds(WORKER_TIMEOUT.to_seconds() * 6),
            dead_letter_queue=sqs.DeadLetterQueue(
                queue=self.dead_letters, max_receive_count=MAX_RECEIVE_COUNT
            ),
        )
        self.worker = JanitorFunction(
            self,
            "Worker",
            description="slice worker (SQS work slices -> the due stages of a run)",
            handler=SLICE_HANDLER,
            code=code,
            permissions=permissions,
            permission_scope=permission_scope,
            alerts=alerts,
            timeout=WORKER_TIMEOUT,
            memory_size=1024,
            environment={REPORT_BUCKET: reports.bucket.bucket_name, TOPIC_ARN: alerts.topic.topic_arn},
            infra=[
                *reports.slice_statements(),
                Statement("PublishRunSummaries", ("sns:Publish",), (alerts.topic.topic_arn,)),
                consume_statement("ConsumeWorkSlices", self.queue),
            ],
        )
        consume(
            self,
            "Slices",
            function=self.worker.function,
            queue=self.queue,
            batch_size=1,
            max_concurrency=MAX_CONCURRENCY,
        )
        alerts.alarm_on_dead_letters(
            self.dead_letters,
            "Messages",
            queue=self.dead_letters,
            description=f"ami-janitor: a work slice failed {MAX_RECEIVE_COUNT} times",
        )

    def send_statement(self) -> Statement:
        """For the scheduled run, which queues the slices."""
        return Statement("QueueWorkSlices", ("sqs:SendMessage",), (self.queue.queue_arn,))

    def accept_slices_only_from(self, senders: Sequence[iam.IRole]) -> None:
        """Deny sending slices to every principal but the scheduled run's role (a slice is read again
        and checked against the policy before it acts, but only the janitor plans them)."""
        self.queue.add_to_resource_policy(
            iam.PolicyStatement(
                sid="OnlyJanitorSendsWorkSlices",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["sqs:SendMessage"],
                resources=[self.queue.queue_arn],
                conditions={"ArnNotEquals": {"aws:PrincipalArn": [role.role_arn for role in senders]}},
            )
        )
