"""The replication queue and its worker, which calls CopyImage in the destination regions."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import CfnOutput, Duration
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from infra.alerts import Alerts
from infra.environment import REPLICATE_HANDLER, REPLICATION_QUEUE_URL
from infra.function import JanitorFunction
from infra.permissions import Scope, Statement
from infra.queues import consume, consume_statement, secure_queue

# CopyImage only starts a copy and returns in seconds, but a throttled one backs off through the SDK's
# retries for up to about two minutes (handlers.replicate.RESERVE_MILLIS): room for a batch of them.
WORKER_TIMEOUT = Duration.minutes(5)
MAX_RECEIVE_COUNT = 5
# CopyImage refills at 1 request per second per account and region: two pollers at most.
MAX_CONCURRENCY = 2
BATCH_SIZE = 5


class Replication(Construct):
    """Copy requests paced through SQS: bounded concurrency, partial batch failures, a redrive DLQ."""

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        code: lambda_.Code,
        permissions: Sequence[str],
        permission_scope: Scope,
        alerts: Alerts,
    ) -> None:
        super().__init__(scope, id)
        self.dead_letters = secure_queue(self, "DeadLetters")
        self.queue = secure_queue(
            self,
            "Queue",
            # Lambda's advice for SQS sources: at least six times the function timeout.
            visibility_timeout=Duration.seconds(WORKER_TIMEOUT.to_seconds() * 6),
            dead_letter_queue=sqs.DeadLetterQueue(
                queue=self.dead_letters, max_receive_count=MAX_RECEIVE_COUNT
            ),
        )
        self.worker = JanitorFunction(
            self,
            "Worker",
            description="replication worker (SQS copy requests -> CopyImage)",
            handler=REPLICATE_HANDLER,
            code=code,
            permissions=permissions,
            permission_scope=permission_scope,
            alerts=alerts,
            timeout=WORKER_TIMEOUT,
            memory_size=512,
            # The records an invocation has no time left for are sent again to the queue (or, where that
            # fails, made visible again at once).
            environment={REPLICATION_QUEUE_URL: self.queue.queue_url},
            infra=[
                consume_statement("ConsumeCopyRequests", self.queue, "sqs:ChangeMessageVisibility"),
                Statement("SendCopyRequestsAgain", ("sqs:SendMessage",), (self.queue.queue_arn,)),
            ],
        )
        consume(
            self,
            "CopyRequests",
            function=self.worker.function,
            queue=self.queue,
            batch_size=BATCH_SIZE,
            max_concurrency=MAX_CONCURRENCY,
        )
        alerts.alarm_on_dead_letters(
            self.dead_letters,
            "Messages",
            queue=self.dead_letters,
            description=f"ami-janitor: a copy request failed {MAX_RECEIVE_COUNT} times",
        )

        # The target regions' KMS key policies must allow this role (README, "The KMS key a target needs").
        CfnOutput(
            self,
            "WorkerRoleArn",
            value=self.worker.role.role_arn,
            description="Role that calls CopyImage: allow it in each replicate target's KMS key policy",
        )

    def send_statement(self) -> Statement:
        """For the functions that enqueue copies."""
        return Statement("EnqueueCopyRequests", ("sqs:SendMessage",), (self.queue.queue_arn,))

    def accept_requests_only_from(self, senders: Sequence[iam.IRole]) -> None:
        """Deny sending copy requests to every principal but `senders` (the roles of the functions that
        enqueue) and the worker (which sends again, unchanged, the requests it received and had no time
        left for). An identity policy elsewhere in the account (an administrator's sqs:*) could otherwise
        queue a copy; the worker rebuilds every request from the policy as well."""
        senders = [*senders, self.worker.role]
        self.queue.add_to_resource_policy(
            iam.PolicyStatement(
                sid="OnlyJanitorSendsCopyRequests",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["sqs:SendMessage"],
                resources=[self.queue.queue_arn],
                # A role session's aws:PrincipalArn is the role's ARN; a principal without one is denied.
                conditions={"ArnNotEquals": {"aws:PrincipalArn": [role.role_arn for role in senders]}},
            )
        )
