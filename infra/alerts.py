"""The region's alert topic and the alarms that publish to it."""

from __future__ import annotations

from aws_cdk import Duration, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from infra.environment import METRIC_ACTIONS_FAILED, METRIC_REGION_SKIPPED, METRICS_NAMESPACE, SERVICE_NAME

ALARM_PERIOD = Duration.minutes(5)


class Alerts(Construct):
    """An encrypted, TLS-only SNS topic (optional email subscription) and alarm helpers.

    The topic key is a customer managed key: CloudWatch alarms cannot publish to a topic encrypted
    with the AWS managed alias/aws/sns, whose key policy cannot name cloudwatch.amazonaws.com.
    """

    def __init__(self, scope: Construct, id: str, *, email: str | None) -> None:
        super().__init__(scope, id)
        stack = Stack.of(self)
        self.key = kms.Key(
            self,
            "TopicKey",
            description="Encrypts the ami-janitor alert topic",
            enable_key_rotation=True,
        )
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchAlarmsPublish",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey"],
                resources=["*"],  # in a key policy "*" is this key
                conditions={"StringEquals": {"aws:SourceAccount": stack.account}},
            )
        )
        # Publishers use the key only through SNS, as with the AWS managed key: sns:Publish on the
        # topic stays the one permission a role needs (naming roles here would make a cycle:
        # key -> role -> topic -> key).
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="PublishThroughSns",
                principals=[iam.AnyPrincipal()],
                actions=["kms:Decrypt", "kms:GenerateDataKey"],
                resources=["*"],
                conditions={
                    "StringEquals": {
                        "kms:CallerAccount": stack.account,
                        "kms:ViaService": f"sns.{stack.region}.amazonaws.com",
                    }
                },
            )
        )
        self.topic = sns.Topic(
            self,
            "Topic",
            display_name="ami-janitor",
            master_key=self.key,
            enforce_ssl=True,
        )
        # The explicit topic policy (TLS only) replaces SNS's default one: let the alarms in.
        self.topic.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchAlarmsPublish",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["sns:Publish"],
                resources=[self.topic.topic_arn],
                conditions={"StringEquals": {"aws:SourceAccount": stack.account}},
            )
        )
        if email:
            self.topic.add_subscription(subscriptions.EmailSubscription(email))
        self._action = cloudwatch_actions.SnsAction(self.topic)
        for metric_name, description in (
            (METRIC_ACTIONS_FAILED, "An ami-janitor action failed (see the run report and function logs)"),
            (METRIC_REGION_SKIPPED, "ami-janitor skipped a region: a reference source failed to load"),
        ):
            self.alarm(
                self,
                metric_name,
                metric=cloudwatch.Metric(
                    namespace=METRICS_NAMESPACE,
                    metric_name=metric_name,
                    dimensions_map={"service": SERVICE_NAME},
                    statistic=cloudwatch.Stats.SUM,
                    period=ALARM_PERIOD,
                ),
                description=description,
            )

    def alarm(
        self, scope: Construct, id: str, *, metric: cloudwatch.IMetric, description: str
    ) -> cloudwatch.Alarm:
        """Alarm on any occurrence within one period; no data is no trouble."""
        alarm = cloudwatch.Alarm(
            scope,
            id,
            metric=metric,
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            alarm_description=description,
        )
        alarm.add_alarm_action(self._action)
        return alarm

    def alarm_on_dead_letters(
        self, scope: Construct, id: str, *, queue: sqs.IQueue, description: str
    ) -> cloudwatch.Alarm:
        return self.alarm(
            scope,
            id,
            metric=queue.metric_approximate_number_of_messages_visible(
                period=ALARM_PERIOD, statistic=cloudwatch.Stats.MAXIMUM
            ),
            description=description,
        )
