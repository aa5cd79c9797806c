"""What one region's janitor is made of, composed in a stack.

The regional stacks (`AmiJanitor-<region>`, deployed with `cdk deploy`) and the StackSet's member
template (one template for every account and region) compose the same constructs with the same ids,
so their resources have the same logical ids. The stack's region is a literal in a regional stack and
the AWS::Region pseudo parameter in the member template: what depends on it (the bake schedule exists
only in `policy.regions`) is then decided at synth, or by a CloudFormation condition at deploy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from aws_cdk import Aws, CfnCondition, CfnOutput, CfnResource, Fn, ICfnConditionExpression, Stack, Token
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from constructs import IConstruct

from ami_janitor import roles
from ami_janitor.core.policy import Policy
from infra.alerts import Alerts
from infra.ami_events import AmiEvents
from infra.bake_schedule import BakeSchedule
from infra.dead_letters import DeadLetters
from infra.function import ROLE_PATH, acknowledge_wildcards
from infra.ledger import CFN_EXEC_ROLE, LedgerTable
from infra.permissions import (
    Scope,
    build_instance_scope,
    policy_statement,
    require_inline_fits,
    statements_for,
)
from infra.replication import Replication
from infra.reports import Reports
from infra.scheduled_run import ScheduledRun
from infra.work_slices import WorkSlices

# Fn::Or takes 2 to 10 conditions.
_MAX_OR = 10


@dataclass(frozen=True)
class Janitor:
    ledger: LedgerTable
    alerts: Alerts
    dead_letters: DeadLetters
    reports: Reports
    replication: Replication
    work_slices: WorkSlices
    scheduled_run: ScheduledRun
    ami_events: AmiEvents
    bake_schedule: BakeSchedule | None
    operator_role: iam.Role


def compose_janitor(
    stack: Stack,
    *,
    policy: Policy,
    code: lambda_.Code,
    ledger_table_exists: bool = False,
    ledger_table_condition: CfnCondition | None = None,
    ledger_deployer: str = CFN_EXEC_ROLE,
    name_prefix: str | None = None,
) -> Janitor:
    """Everything one region needs, in `stack`; no custom resources (nothing runs Lambda at deploy time).

    `ledger_table_condition`: see LedgerTable; `ledger_deployer` is the role name pattern that deploys the
    stack (it updates the ledger table); `name_prefix` names the resources that need a name where the stack's own name is not known at synth
    (the StackSet names its stacks)."""
    region = stack.region
    own_region = Scope.from_policy(policy, partition=stack.partition, account=stack.account, region=region)
    with_copies = Scope.from_policy(
        policy, partition=stack.partition, account=stack.account, region=region, copies=True
    )
    ledger = LedgerTable(
        stack,
        "Ledger",
        table_name=policy.ledger.table,
        existing=ledger_table_exists,
        condition=ledger_table_condition,
        deployer=ledger_deployer,
    )
    alerts = Alerts(stack, "Alerts", email=policy.notify.email if policy.notify else None)
    dead_letters = DeadLetters(stack, "DeadLetters", alerts=alerts)
    reports = Reports(stack, "Reports")
    # Copies start only from the policy's `regions` (replication.allowed_target refuses any other source,
    # and a failed replica is retried by its source region's run): in a region that is only a replicate
    # target the worker never copies, and its role gets none of the copy's grants (the member template,
    # for any region, keeps them).
    copies_here = Token.is_unresolved(region) or region in policy.regions
    replication = Replication(
        stack,
        "Replication",
        code=code,
        permissions=roles.REPLICATE_PERMISSIONS if copies_here else [],
        permission_scope=with_copies,
        alerts=alerts,
    )
    work_slices = WorkSlices(
        stack,
        "WorkSlices",
        code=code,
        permissions=roles.SLICE_PERMISSIONS,
        permission_scope=own_region,
        alerts=alerts,
        reports=reports,
        name_prefix=name_prefix,
    )
    scheduled_run = ScheduledRun(
        stack,
        "ScheduledRun",
        schedule=policy.schedule,
        code=code,
        permissions=roles.SCHEDULED_PERMISSIONS,
        permission_scope=with_copies,  # its plan reads the copy targets' ledgers (it copies nothing)
        alerts=alerts,
        dead_letters=dead_letters,
        reports=reports,
        replication=replication,
        work_slices=work_slices,
    )
    work_slices.accept_slices_only_from([scheduled_run.function.role])
    ami_events = _ami_events(
        stack, code, own_region, alerts, dead_letters, replication, scheduled_run, name_prefix
    )
    bake_schedule = _bake_schedule(stack, policy, code, own_region, alerts, dead_letters)
    operator_role = _operator_role(stack, with_copies)
    return Janitor(
        ledger=ledger,
        alerts=alerts,
        dead_letters=dead_letters,
        reports=reports,
        replication=replication,
        work_slices=work_slices,
        scheduled_run=scheduled_run,
        ami_events=ami_events,
        bake_schedule=bake_schedule,
        operator_role=operator_role,
    )


def _ami_events(
    stack: Stack,
    code: lambda_.Code,
    scope: Scope,
    alerts: Alerts,
    dead_letters: DeadLetters,
    replication: Replication,
    scheduled_run: ScheduledRun,
    name_prefix: str | None,
) -> AmiEvents:
    """The AMI event function; only it and the scheduled run (the functions that plan copies) may queue
    new copies (the replication worker sends again only the requests it received and had no time for)."""
    ami_events = AmiEvents(
        stack,
        "AmiEvents",
        code=code,
        permissions=roles.EVENT_PERMISSIONS,
        permission_scope=scope,
        alerts=alerts,
        dead_letters=dead_letters,
        replication=replication,
        name_prefix=name_prefix,
    )
    replication.accept_requests_only_from([scheduled_run.function.role, ami_events.function.role])
    return ami_events


def _bake_schedule(
    stack: Stack, policy: Policy, code: lambda_.Code, scope: Scope, alerts: Alerts, dead_letters: DeadLetters
) -> BakeSchedule | None:
    """The bake rules of the families that bake here (Policy.bake_regions: where their build instances
    live, never a replication-only region). The member template has the rules of every family, in the
    regions where any bakes (a condition on the region); the function leaves the others' to their
    regions."""
    agnostic = Token.is_unresolved(stack.region)
    baked = [
        f
        for f in policy.families
        if f.bake is not None
        and f.bake.schedule is not None
        and (agnostic or stack.region in policy.bake_regions(f))
    ]
    if not baked:
        return None
    schedule = BakeSchedule(
        stack,
        "BakeSchedule",
        families=baked,
        code=code,
        permissions=roles.BAKE_PERMISSIONS,
        # The build instances of the families it bakes here alone, each in its bake regions (a template
        # for any region has every baking family's): CreateImage reboots an instance.
        permission_scope=replace(
            scope, build_instances=tuple(build_instance_scope(f, policy.bake_regions(f)) for f in baked)
        ),
        alerts=alerts,
        dead_letters=dead_letters,
        own_event_dead_letters=agnostic,  # nothing outside the condition may name its rules
    )
    if agnostic:
        bake_regions = sorted({region for family in baked for region in policy.bake_regions(family)})
        in_regions = CfnCondition(stack, "BakeRegion", expression=region_in(bake_regions))
        only_if(schedule, in_regions)
    return schedule


def region_in(regions: Sequence[str]) -> ICfnConditionExpression:
    """AWS::Region is one of `regions`: Fn::Equals, or Fn::Or of them (nested past ten)."""
    tests = [Fn.condition_equals(Aws.REGION, region) for region in regions]
    while len(tests) > 1:
        groups = [tests[i : i + _MAX_OR] for i in range(0, len(tests), _MAX_OR)]
        tests = [group[0] if len(group) == 1 else Fn.condition_or(*group) for group in groups]
    return tests[0]


def only_if(construct: IConstruct, condition: CfnCondition) -> None:
    """Every CloudFormation resource of `construct` exists only where `condition` holds."""
    for child in construct.node.find_all():
        if isinstance(child, CfnResource):
            child.cfn_options.condition = condition


def _operator_role(stack: Stack, scope: Scope) -> iam.Role:
    """The role `ami-janitor` assumes to act in this region: what the CLI calls but `ledger create`
    (roles.OPERATOR_PERMISSIONS: the stack owns the table), under /ami-janitor/ so the ledger accepts
    its writes. Any principal of the account that its own IAM policy allows to assume it may (the
    account root is trusted)."""
    statements = statements_for(roles.OPERATOR_PERMISSIONS, scope)
    require_inline_fits(statements, "the operator role")
    role = iam.Role(
        stack,
        "OperatorRole",
        assumed_by=iam.AccountRootPrincipal(),
        path=ROLE_PATH,
        description="ami-janitor operator: the CLI's permissions in this region",
        inline_policies={
            "Permissions": iam.PolicyDocument(statements=[policy_statement(s) for s in statements])
        },
    )
    acknowledge_wildcards(role, statements)
    CfnOutput(stack, "OperatorRoleArn", value=role.role_arn, description="Role for `ami-janitor --role-arn`")
    return role
