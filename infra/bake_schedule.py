"""Scheduled bakes: one rule per family with a bake.schedule, all invoking one bake function."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from aws_cdk import Duration
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from ami_janitor.core.policy import Family
from infra.alerts import Alerts
from infra.dead_letters import EVENT_TARGETS, DeadLetters, watched_dead_letter_queue
from infra.environment import BAKE_HANDLER
from infra.function import AsyncInvoke, JanitorFunction
from infra.permissions import Scope

MAX_EVENT_AGE = Duration.hours(1)
TARGET_RETRY_ATTEMPTS = 4
# CreateImage has no idempotency token. A repeated delivery names the image from the event's time, so
# it finds the first one (a duplicate name); a failed bake is still left to the on-failure queue, for a
# person, rather than retried by Lambda.
INVOKE_RETRY_ATTEMPTS = 0


class BakeSchedule(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        families: Sequence[Family],
        code: lambda_.Code,
        permissions: Sequence[str],
        permission_scope: Scope,
        alerts: Alerts,
        dead_letters: DeadLetters,
        own_event_dead_letters: bool = False,
    ) -> None:
        """`own_event_dead_letters`: the rules' delivery failures go to a queue of this construct rather
        than the region's shared one, whose policy would otherwise name rules that may not exist (the
        member template's bake schedule exists only where a condition holds)."""
        super().__init__(scope, id)
        self.function = JanitorFunction(
            self,
            "Function",
            description="scheduled bakes (CreateImage from a family's build instance)",
            handler=BAKE_HANDLER,
            code=code,
            permissions=permissions,
            permission_scope=permission_scope,
            alerts=alerts,
            # CreateImage returns once the image is pending, but a throttled one backs off through the
            # SDK's retries for up to about two minutes, then its duplicate name is looked up: the bake
            # must not end between the image made and its ledger record (it is not invoked again).
            timeout=Duration.minutes(5),
            memory_size=256,
            async_invoke=AsyncInvoke(
                retry_attempts=INVOKE_RETRY_ATTEMPTS,
                max_event_age=MAX_EVENT_AGE,
                on_failure=dead_letters.failed_invocations,
            ),
        )
        self.event_dead_letters = (
            watched_dead_letter_queue(self, "EventTargets", alerts=alerts, what=EVENT_TARGETS)
            if own_event_dead_letters
            else dead_letters.event_targets
        )
        self.rules: dict[str, events.Rule] = {}
        for family in families:
            if family.bake is None or family.bake.schedule is None:
                continue
            rule = events.Rule(
                self,
                f"Family-{family.name}",
                description=f"ami-janitor: bake {family.name}",
                schedule=events.Schedule.expression(family.bake.schedule),
            )
            rule.add_target(
                targets.LambdaFunction(
                    self.function.function,
                    # The scheduled time, the same in every delivery of the event, names the bake:
                    # a repeated delivery meets the image the first made.
                    event=events.RuleTargetInput.from_object(
                        {"family": family.name, "time": events.EventField.time}
                    ),
                    max_event_age=MAX_EVENT_AGE,
                    retry_attempts=TARGET_RETRY_ATTEMPTS,
                )
            )
            # The dead-letter queue is named here rather than through the target, which would add a
            # statement per rule to the queue's policy: SQS takes no policy of more than 20 statements
            # or 8 KB, so some 17 scheduled families would fail the deploy. One statement names them all.
            cast(events.CfnRule, rule.node.default_child).add_property_override(
                "Targets.0.DeadLetterConfig", {"Arn": self.event_dead_letters.queue_arn}
            )
            self.rules[family.name] = rule
        if self.rules:
            self.event_dead_letters.add_to_resource_policy(
                iam.PolicyStatement(
                    sid="AllowBakeRules",
                    principals=[iam.ServicePrincipal("events.amazonaws.com")],
                    actions=["sqs:SendMessage"],
                    resources=[self.event_dead_letters.queue_arn],
                    conditions={"ArnEquals": {"aws:SourceArn": [r.rule_arn for r in self.rules.values()]}},
                )
            )
