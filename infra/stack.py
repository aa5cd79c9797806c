"""One self-contained stack per managed region, and the app that holds them."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aws_cdk import App, AssetHashType, CfnOutput, Environment, Stack, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from cdk_nag import AwsSolutionsChecks
from constructs import Construct

from ami_janitor import engine
from ami_janitor.core.policy import Policy
from ami_janitor.handlers import ami_event, bake, replicate, scheduled, slices
from infra.alerts import Alerts
from infra.ami_events import AmiEvents
from infra.bake_schedule import BakeSchedule
from infra.bundle import code_asset
from infra.dead_letters import DeadLetters
from infra.function import ROLE_PATH, acknowledge_wildcards
from infra.ledger import LedgerTable
from infra.permissions import Scope, policy_statement, statements_for
from infra.replication import Replication
from infra.reports import Reports
from infra.scheduled_run import ScheduledRun
from infra.work_slices import WorkSlices

STACK_PREFIX = "AmiJanitor"
CDK_JSON = Path(__file__).resolve().parent.parent / "cdk.json"


def stack_name(region: str) -> str:
    return f"{STACK_PREFIX}-{region}"


class JanitorStack(Stack):
    """Everything one region needs; no custom resources (nothing runs Lambda at deploy time)."""

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        policy: Policy,
        region: str,
        account: str | None,
        asset_dir: Path,
        asset_hash: str,
        ledger_table_exists: bool = False,
    ) -> None:
        super().__init__(
            scope,
            id,
            stack_name=id,
            env=Environment(account=account, region=region),
            description=f"ami-janitor: AMI retention, rotation and replication for {region}",
        )
        # One Code per stack: an asset belongs to the stack that binds it first.
        code = lambda_.Code.from_asset(
            str(asset_dir), asset_hash=asset_hash, asset_hash_type=AssetHashType.CUSTOM
        )
        own_region = Scope.from_policy(policy, partition=self.partition, account=self.account, region=region)
        with_copies = Scope.from_policy(
            policy, partition=self.partition, account=self.account, region=region, copies=True
        )
        self.ledger = LedgerTable(
            self, "Ledger", table_name=policy.ledger.table, existing=ledger_table_exists
        )
        self.alerts = Alerts(self, "Alerts", email=policy.notify.email if policy.notify else None)
        self.dead_letters = DeadLetters(self, "DeadLetters", alerts=self.alerts)
        self.reports = Reports(self, "Reports")
        self.replication = Replication(
            self,
            "Replication",
            code=code,
            permissions=replicate.PERMISSIONS,
            permission_scope=with_copies,
            alerts=self.alerts,
        )
        self.work_slices = WorkSlices(
            self,
            "WorkSlices",
            code=code,
            permissions=slices.PERMISSIONS,
            permission_scope=own_region,
            alerts=self.alerts,
            reports=self.reports,
        )
        self.scheduled_run = ScheduledRun(
            self,
            "ScheduledRun",
            schedule=policy.schedule,
            code=code,
            permissions=scheduled.PERMISSIONS,
            permission_scope=with_copies,  # its plan reads the copy targets' ledgers (it copies nothing)
            alerts=self.alerts,
            dead_letters=self.dead_letters,
            reports=self.reports,
            replication=self.replication,
            work_slices=self.work_slices,
        )
        self.work_slices.accept_slices_only_from([self.scheduled_run.function.role])
        self.ami_events = AmiEvents(
            self,
            "AmiEvents",
            code=code,
            permissions=ami_event.PERMISSIONS,
            permission_scope=own_region,
            alerts=self.alerts,
            dead_letters=self.dead_letters,
            replication=self.replication,
        )
        # Only the functions that plan copies may queue them.
        self.replication.accept_requests_only_from(
            [self.scheduled_run.function.role, self.ami_events.function.role]
        )
        self.bake_schedule = self._bake_schedule(policy, region, code, own_region)
        self.operator_role = self._operator_role(with_copies)

    def _bake_schedule(
        self, policy: Policy, region: str, code: lambda_.Code, scope: Scope
    ) -> BakeSchedule | None:
        """The bake rules of the families that bake here: build instances live where the sources are, so
        replication-only regions get none."""
        baked = [
            f
            for f in policy.families
            if f.bake is not None and f.bake.schedule is not None and region in policy.regions
        ]
        if not baked:
            return None
        return BakeSchedule(
            self,
            "BakeSchedule",
            families=baked,
            code=code,
            permissions=bake.PERMISSIONS,
            permission_scope=scope,
            alerts=self.alerts,
            dead_letters=self.dead_letters,
        )

    def _operator_role(self, scope: Scope) -> iam.Role:
        """The role `ami-janitor` assumes to act in this region: what the CLI calls (engine.CLI_PERMISSIONS,
        the ledger's calls included), under /ami-janitor/ so the ledger accepts its writes. Any principal
        of the account that its own IAM policy allows to assume it may (the account root is trusted)."""
        statements = statements_for(engine.CLI_PERMISSIONS, scope)
        role = iam.Role(
            self,
            "OperatorRole",
            assumed_by=iam.AccountRootPrincipal(),
            path=ROLE_PATH,
            description="ami-janitor operator: the CLI's permissions in this region",
            inline_policies={
                "Permissions": iam.PolicyDocument(statements=[policy_statement(s) for s in statements])
            },
        )
        acknowledge_wildcards(role, statements)
        CfnOutput(
            self, "OperatorRoleArn", value=role.role_arn, description="Role for `ami-janitor --role-arn`"
        )
        return role


def cdk_json_context() -> dict[str, Any]:
    return dict(json.loads(CDK_JSON.read_text(encoding="utf-8")).get("context", {}))


def build_app(
    policy: Policy,
    *,
    context: Mapping[str, Any] | None = None,
    outdir: str | None = None,
    nag: bool = True,
) -> App:
    """The app with one stack per managed region (`regions` plus every replicate target).

    The account comes from the `account` context value or CDK_DEFAULT_ACCOUNT; without either the
    stacks stay account-agnostic (no credentials or STS call are needed to synthesize).
    """
    # cdk.json's context (feature flags) also applies when app.py runs without the CDK CLI; the
    # CLI's own context (CDK_CONTEXT_JSON) still takes precedence over these defaults.
    app = App(context={**cdk_json_context(), **(context or {})}, outdir=outdir)
    account = app.node.try_get_context("account") or os.environ.get("CDK_DEFAULT_ACCOUNT") or None
    # A table `ami-janitor ledger create` made before the stack: referenced, not created (README).
    existing = str(app.node.try_get_context("ledger_table_exists") or "").lower() in ("true", "1", "yes")
    asset_dir, asset_hash = code_asset(policy)
    for region in policy.managed_regions:
        JanitorStack(
            app,
            stack_name(region),
            policy=policy,
            region=region,
            account=account,
            asset_dir=asset_dir,
            asset_hash=asset_hash,
            ledger_table_exists=existing,
        )
    if nag:
        Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app
