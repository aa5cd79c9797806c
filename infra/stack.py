"""One self-contained stack per managed region, the organization's stacks, and the app that holds them."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aws_cdk import Annotations, App, AssetHashType, Environment, Stack, Token, Validations
from aws_cdk import aws_lambda as lambda_
from cdk_nag import AwsSolutionsChecks
from constructs import Construct

from ami_janitor.core.policy import Policy
from infra.bundle import code_asset
from infra.code_bucket import CodeBucketStack, code_stack_name
from infra.janitor import compose_janitor
from infra.organization import ORG_STACK_NAME, OrganizationStack
from infra.usage_inbox import UsageInbox

STACK_PREFIX = "AmiJanitor"
CDK_JSON = Path(__file__).resolve().parent.parent / "cdk.json"


def stack_name(region: str) -> str:
    return f"{STACK_PREFIX}-{region}"


class JanitorStack(Stack):
    """Everything one region needs (infra.janitor); no custom resources (nothing runs Lambda at deploy
    time)."""

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
        usage_inbox: bool = False,
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
        self.janitor = compose_janitor(
            self, policy=policy, code=code, ledger_table_exists=ledger_table_exists
        )
        self.usage_inbox = self._usage_inbox(policy) if usage_inbox else None

    def _usage_inbox(self, policy: Policy) -> UsageInbox | None:
        """The inbox's bucket policy names the organization whose janitors may write: without
        `organization` the stack makes no inbox (README, "Deploy to an organization")."""
        if policy.usage_reports is None:
            return None
        if policy.organization is None:
            Annotations.of(self).add_warning_v2(
                "ami-janitor:usage-inbox",
                f"usage_reports without organization: no inbox is made; create s3://{policy.usage_reports.bucket} "
                "yourself (the janitor's roles are granted its use in this account)",
            )
            return None
        expected = policy.usage_reports.inbox_account
        if expected and not Token.is_unresolved(self.account) and expected != self.account:
            # This stack makes the inbox in its own account: every janitor would refuse that bucket.
            raise ValueError(
                f"usage_reports.inbox_account is {expected}, but this stack makes the inbox "
                f"s3://{policy.usage_reports.bucket} in account {self.account}"
            )
        return UsageInbox(
            self, "UsageInbox", settings=policy.usage_reports, organization_id=policy.organization.id
        )


def cdk_json_context() -> dict[str, Any]:
    return dict(json.loads(CDK_JSON.read_text(encoding="utf-8")).get("context", {}))


def _flag(app: App, name: str) -> bool:
    return str(app.node.try_get_context(name) or "").lower() in ("true", "1", "yes")


def build_app(
    policy: Policy,
    *,
    context: Mapping[str, Any] | None = None,
    outdir: str | None = None,
    nag: bool = True,
) -> App:
    """The app with one stack per managed region (`regions` plus every replicate target); with
    `organization`, also the code bucket stacks (one per managed region) and the StackSet's stack.

    The account comes from the `account` context value or CDK_DEFAULT_ACCOUNT; without either the
    stacks stay account-agnostic (no credentials or STS call are needed to synthesize).
    """
    # cdk.json's context (feature flags) also applies when app.py runs without the CDK CLI; the
    # CLI's own context (CDK_CONTEXT_JSON) still takes precedence over these defaults.
    app = App(context={**cdk_json_context(), **(context or {})}, outdir=outdir)
    account = app.node.try_get_context("account") or os.environ.get("CDK_DEFAULT_ACCOUNT") or None
    # A table `ami-janitor ledger create` made before the stack: referenced, not created (README).
    existing = _flag(app, "ledger_table_exists")
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
            # One inbox per organization, made with the first region's stack in the owner's account.
            usage_inbox=region == policy.regions[0],
        )
    if policy.organization is not None:
        for region in policy.managed_regions:
            CodeBucketStack(
                app,
                code_stack_name(region),
                region=region,
                account=account,
                prefix=policy.organization.code_bucket_prefix,
                organization_id=policy.organization.id,
            )
        OrganizationStack(
            app,
            ORG_STACK_NAME,
            policy=policy,
            account=account,
            asset_hash=asset_hash,
            # Deployed from a delegated administrator of StackSets, not the management account (README).
            delegated_admin=_flag(app, "stackset_delegated_admin"),
        )
    if nag:
        Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app
