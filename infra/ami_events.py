"""Latest rotation (and copy retries) on EC2 AMI state-change events, one at a time per region."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration, Stack
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from ami_janitor.core.model import AMI_STATES
from infra.alerts import Alerts
from infra.dead_letters import DeadLetters
from infra.environment import AMI_EVENT_HANDLER, AMI_EVENTS_QUEUE_URL, REPLICATION_QUEUE_URL
from infra.function import JanitorFunction
from infra.permissions import Scope
from infra.queues import consume, consume_statement, secure_queue
from infra.replication import Replication

MAX_EVENT_AGE = Duration.hours(1)  # events are best effort anyway: the scheduled run reconciles
TARGET_RETRY_ATTEMPTS = 8
FUNCTION_TIMEOUT = Duration.minutes(5)
# The handler converges on current state, so a delivery again is safe; a record the invocation had no
# time left for counts a delivery too.
MAX_RECEIVE_COUNT = 5
BATCH_SIZE = 10
# The region's events are one FIFO message group: SQS hands out one batch at a time, in order, so two
# rotations never race on a Latest tag. (A reserved concurrency of 1 did that before: a new account's
# Lambda quota of 10 refuses any reservation, which failed the StackSet there.) The mapping's maximum
# concurrency is the smallest it takes; the one group is what serializes.
MESSAGE_GROUP = "ami-state-changes"
MAX_CONCURRENCY = 2


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
        name_prefix: str | None = None,
    ) -> None:
        super().__init__(scope, id)
        # Named: a FIFO queue's name must end in .fifo (see WorkSlices).
        prefix = name_prefix or Stack.of(self).stack_name
        self.dead_letters = secure_queue(
            self, "DeadLetters", fifo=True, queue_name=f"{prefix}-ami-events-dlq.fifo"
        )
        self.queue = secure_queue(
            self,
            "Queue",
            fifo=True,
            # EventBridge asks it of a FIFO target; a second delivery of one event within five minutes
            # (the same event, the same body) is dropped.
            content_based_deduplication=True,
            queue_name=f"{prefix}-ami-events.fifo",
            # Lambda's advice for SQS sources: at least six times the function timeout.
            visibility_timeout=Duration.seconds(FUNCTION_TIMEOUT.to_seconds() * 6),
            dead_letter_queue=sqs.DeadLetterQueue(
                queue=self.dead_letters, max_receive_count=MAX_RECEIVE_COUNT
            ),
        )
        self.function = JanitorFunction(
            self,
            "Function",
            description="AMI state-change events (Latest rotation, copy retries)",
            handler=AMI_EVENT_HANDLER,
            code=code,
            permissions=permissions,
            permission_scope=permission_scope,
            alerts=alerts,
            timeout=FUNCTION_TIMEOUT,
            memory_size=512,
            # Its own queue: a record to try again is made visible again soon (the handler's retry_soon).
            environment={
                REPLICATION_QUEUE_URL: replication.queue.queue_url,
                AMI_EVENTS_QUEUE_URL: self.queue.queue_url,
            },
            infra=[
                replication.send_statement(),
                # And the handler's ChangeMessageVisibilityBatch on the records to try again.
                consume_statement("ConsumeAmiEvents", self.queue, "sqs:ChangeMessageVisibility"),
            ],
        )
        consume(
            self,
            "Events",
            function=self.function.function,
            queue=self.queue,
            batch_size=BATCH_SIZE,
            max_concurrency=MAX_CONCURRENCY,
        )
        alerts.alarm_on_dead_letters(
            self.dead_letters,
            "Messages",
            queue=self.dead_letters,
            description=f"ami-janitor: an AMI state-change event failed {MAX_RECEIVE_COUNT} times",
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
                # Only this region's: a bus also receives events another region's rule forwards to it,
                # which keep their region; the handler refuses those, each held in the queue's one
                # message group through its deliveries, the region's own events behind it.
                region=[Stack.of(self).region],
                # EventBridge delivers "EC2 AMI State Change" with the state in detail.State (capital S).
                detail={"State": list(AMI_STATES)},
            ),
        )
        # Only this rule puts events on the queue: the handler re-reads EC2 for every event anyway, but
        # a principal of the account with a broad sqs:SendMessage could otherwise fill the one message
        # group and hold back the real events behind its own.
        self.queue.add_to_resource_policy(
            iam.PolicyStatement(
                sid="OnlyTheStateChangeRuleSends",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["sqs:SendMessage"],
                resources=[self.queue.queue_arn],
                conditions={"ArnNotEquals": {"aws:SourceArn": self.rule.rule_arn}},
            )
        )
        self.rule.add_target(
            targets.SqsQueue(
                self.queue,
                message_group_id=MESSAGE_GROUP,
                dead_letter_queue=dead_letters.event_targets,
                max_event_age=MAX_EVENT_AGE,
                retry_attempts=TARGET_RETRY_ATTEMPTS,
            )
        )
