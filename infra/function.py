"""One janitor Lambda function: its own role, log group, failure handling and Errors alarm."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from ami_janitor.aws import ledger
from infra.alerts import ALARM_PERIOD, Alerts
from infra.environment import common_environment
from infra.nag import acknowledge, wildcard_resource_findings
from infra.permissions import Scope, Statement, policy_statement, require_inline_fits, statements_for

RUNTIME = lambda_.Runtime.PYTHON_3_13  # must match infra.bundle.PYTHON_VERSION
ARCHITECTURE = lambda_.Architecture.ARM_64  # must match infra.bundle.PIP_PLATFORM

# Why a statement's resource has a wildcard, by statement id (ids ending in a number share a reason).
WILDCARD_REASONS = {
    "ReadInventory": "Read-only Describe/List/Get calls of the inventory sources (EC2, Auto Scaling, SSM, "
    "Batch, EMR, Image Builder, Recycle Bin): most take no resource ARN, the others must read every "
    "resource of the region to find what references an AMI.",
    "ReadOrganization": "Organizations reads take no resource ARN; granted only with usage_reports, to "
    "expand a share to an organization or OU into the accounts whose usage reports count.",
    "RetireCandidates": "AMI ids are not known at deploy time; limited to this region's AMIs that carry "
    "the ami-janitor:candidate-since tag the janitor sets before any stage.",
    "RestoreAndShareImages": "AMI ids are not known at deploy time; limited to this region's AMIs "
    "(rescue of candidates and launch permissions from the families' share_with).",
    "TagJanitorKeys": "AMI and snapshot ids are not known at deploy time; only tag keys starting "
    "ami-janitor: and the families' Latest tags may change (aws:TagKeys condition).",
    "CopyImages": "A copy creates an AMI and snapshots with new ids; limited to this region and the "
    "policy's replication target regions.",
    "CreateImages": "A bake creates an AMI and snapshots with new ids in this region.",
    "ReadRunReportParts": "Run report keys are made per run at run time; only the runs/ prefix of the "
    "stack's own report bucket.",
    "CreateImagesFromInstances": "A family without bake.instance_id names its build instance by tags "
    "alone; limited to instances carrying its bake.instance_tag.",
    "RunShellDocument": "AWS-RunShellScript is owned by AWS: its ARN has no account, which only a "
    "wildcard account matches; the document name is fixed.",
    "SendBakeCommands": "A family without bake.instance_id names its build instance by tags alone; "
    "Run Command only on instances carrying its bake.instance_tag.",
    "TagOnCreate": "Tags given at creation of a new AMI or snapshot only (ec2:CreateAction condition).",
    "DeleteRetiredSnapshots": "Snapshot ids are not known at deploy time; limited to snapshots the "
    "janitor tagged ami-janitor:retired-from before deregistering their AMI.",
    "WriteLatestParameters": "The {arch} placeholder of a family's Latest parameter name becomes a "
    "wildcard over architectures.",
    "PutJanitorMetrics": "PutMetricData has no resource type; limited to the AmiJanitor namespace.",
    "DescribeReplicaKeysByAlias": "A replicate target names its key by alias, which cannot be a Resource; "
    "limited to the target region's keys that carry the alias (kms:ResourceAliases).",
    "UseReplicaKeysThroughEc2ByAlias": "A replicate target names its key by alias, which cannot be a "
    "Resource; limited to the target region's keys that carry the alias, through EC2 only.",
    "GrantReplicaKeysToEc2ByAlias": "A replicate target names its key by alias, which cannot be a "
    "Resource; grants for EC2 only, on the target region's keys that carry the alias.",
    "PublishUsageReport": "The usage inbox's report keys name the region (reports/<account>/<region>.json); "
    "PutObject only under this account's own prefix of the inbox.",
    "ReadUsageReports": "An owner reads the report of each account it shares an AMI with, whichever they are; "
    "GetObject only under the reports/ prefix of the usage inbox.",
    "WriteRunReports": "Report object keys are made per run; PutObject only, under runs/ in the report bucket.",
}
# Every role the stacks make: the ledger's resource policy lets only this path (and named writers) write.
ROLE_PATH = ledger.ROLE_PATH


def acknowledge_wildcards(role: iam.Role, statements: Sequence[Statement]) -> None:
    """One cdk-nag acknowledgement per wildcard resource, with the reasons of every statement using it."""
    reasons: dict[str, list[str]] = {}
    for statement in statements:
        reason = WILDCARD_REASONS.get(statement.sid.rstrip("0123456789"))
        for finding in wildcard_resource_findings(role, list(statement.resources)):
            if reason is None:
                raise ValueError(f"{statement.sid}: give WILDCARD_REASONS a reason for {finding}")
            if reason not in reasons.setdefault(finding, []):
                reasons[finding].append(reason)
    for finding, why in reasons.items():
        acknowledge(role, finding, " ".join(why))


@dataclass(frozen=True)
class AsyncInvoke:
    """Lambda's own handling of a failed asynchronous invocation."""

    retry_attempts: int
    max_event_age: Duration
    on_failure: sqs.IQueue


class JanitorFunction(Construct):
    """A function whose role grants exactly its `permissions` (ami_janitor.roles) plus `infra` (its own
    resources)."""

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        description: str,
        handler: str,
        code: lambda_.Code,
        permissions: Sequence[str],
        permission_scope: Scope,
        alerts: Alerts,
        timeout: Duration,
        memory_size: int,
        infra: Sequence[Statement] = (),
        environment: Mapping[str, str] | None = None,
        async_invoke: AsyncInvoke | None = None,
    ) -> None:
        super().__init__(scope, id)
        self.log_group = logs.LogGroup(
            self,
            "Logs",
            retention=logs.RetentionDays.THREE_MONTHS,
            removal_policy=RemovalPolicy.RETAIN,  # the record of what was retired outlives the stack
        )
        infra_statements = self._own_statements(infra, async_invoke)
        provided = {action for statement in infra_statements for action in statement.actions}
        self.statements: list[Statement] = [
            *statements_for(permissions, permission_scope, provided=provided),
            *infra_statements,
        ]
        require_inline_fits(self.statements, f"the role of the {description} function")
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            path=ROLE_PATH,
            description=f"ami-janitor {description}",
            # Inline, so the permissions exist before the function and its event invoke config.
            inline_policies={
                "Permissions": iam.PolicyDocument(statements=[policy_statement(s) for s in self.statements])
            },
        )
        acknowledge_wildcards(self.role, self.statements)
        self.function = lambda_.Function(
            self,
            "Function",
            description=f"ami-janitor {description}",
            runtime=RUNTIME,
            architecture=ARCHITECTURE,
            handler=handler,
            code=code,
            role=self.role,
            timeout=timeout,
            memory_size=memory_size,
            environment={**common_environment(), **(environment or {})},
            log_group=self.log_group,
        )
        acknowledge(
            self.function,
            "AwsSolutions-L1",
            "Python 3.13 matches the wheels bundled for the asset (infra.bundle.PYTHON_VERSION, "
            "pydantic-core is compiled per Python version); the two move together.",
        )
        if async_invoke is not None:
            self._invoke_config(async_invoke)
        alerts.alarm(
            self,
            "Errors",
            metric=self.function.metric_errors(period=ALARM_PERIOD, statistic=cloudwatch.Stats.SUM),
            description=f"ami-janitor {description}: the function raised an error",
        )

    def _invoke_config(self, async_invoke: AsyncInvoke) -> None:
        """Lambda's own retries of an asynchronous invocation, then its on-failure destination."""
        lambda_.CfnEventInvokeConfig(
            self,
            "AsyncInvoke",
            function_name=self.function.function_name,
            qualifier="$LATEST",
            maximum_retry_attempts=async_invoke.retry_attempts,
            maximum_event_age_in_seconds=int(async_invoke.max_event_age.to_seconds()),
            destination_config=lambda_.CfnEventInvokeConfig.DestinationConfigProperty(
                on_failure=lambda_.CfnEventInvokeConfig.OnFailureProperty(
                    destination=async_invoke.on_failure.queue_arn
                )
            ),
        )

    def _own_statements(
        self, infra: Sequence[Statement], async_invoke: AsyncInvoke | None
    ) -> list[Statement]:
        """Its own log group (created here, so no logs:CreateLogGroup), `infra`, and the on-failure queue
        (Lambda sends the failure record with the function's own role)."""
        own = [
            Statement(
                "WriteOwnLogs", ("logs:CreateLogStream", "logs:PutLogEvents"), (self.log_group.log_group_arn,)
            ),
            *infra,
        ]
        if async_invoke is not None:
            own.append(
                Statement("SendFailedInvocations", ("sqs:SendMessage",), (async_invoke.on_failure.queue_arn,))
            )
        return own
