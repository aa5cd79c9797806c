"""Deployment to an organization: a service-managed StackSet of one member template for every region.

cdk-stacksets makes the StackSet and synthesizes the member template (uploaded as a file asset of the
parent stack, which the StackSet's TemplateURL names). Its own way of shipping Lambda code to the
member regions (StackSetStackSynthesizer with asset buckets) copies each asset with a BucketDeployment,
a Lambda-backed custom resource, in the parent stack; the janitor has no custom resources. So the
member stack has no file asset: its functions read the zip `make publish-org-code` uploads to the
bucket `<organization.code_bucket_prefix>-<region>` of the region they are deployed in (infra.code_bucket).
"""

from __future__ import annotations

from typing import cast

from aws_cdk import Annotations, Aws, CfnCondition, CfnParameter, Environment, Fn, Stack
from aws_cdk import aws_cloudformation as cloudformation
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_s3 as s3
from cdk_stacksets import (
    Capability,
    DeploymentType,
    OperationPreferences,
    RegionConcurrencyType,
    StackSet,
    StackSetStack,
    StackSetTarget,
    StackSetTemplate,
)
from constructs import Construct

from ami_janitor.core.policy import Organization, Policy
from infra.bundle import asset_object_key
from infra.janitor import compose_janitor
from infra.ledger import STACKSET_EXEC_ROLE

ORG_STACK_NAME = "AmiJanitorOrg"
STACK_SET_NAME = "AmiJanitor"
# The member parameter an account whose ledger table exists already is deployed with as true.
LEDGER_TABLE_EXISTS = "LedgerTableExists"
# A deployment to a large organization: a quarter of the accounts at a time, every region at once; an
# operation stops in a region where more than a tenth of the accounts failed.
MAX_CONCURRENT_PERCENTAGE = 25
FAILURE_TOLERANCE_PERCENTAGE = 10
# The default (STRICT_FAILURE_TOLERANCE) caps the concurrency at the failure tolerance plus one account:
# a tenth and one at a time, not a quarter. SOFT keeps the two apart.
CONCURRENCY_MODE = "SOFT_FAILURE_TOLERANCE"


class MemberStack(StackSetStack):
    """The member template: the regional stack's constructs (infra.janitor) in any account and region.
    The region is AWS::Region (the bake schedule is conditional on it) and the code is read from the
    region's code bucket; the ledger accepts writes from the StackSet's execution role (stacksets-exec-*)."""

    def __init__(
        self, scope: Construct, id: str, *, policy: Policy, organization: Organization, asset_hash: str
    ):
        super().__init__(scope, id)
        self.template_options.description = (
            "ami-janitor: AMI retention, rotation and replication (StackSet member, every managed region)"
        )
        bucket = s3.Bucket.from_bucket_name(
            self, "CodeBucket", Fn.join("-", [organization.code_bucket_prefix, Aws.REGION])
        )
        code = lambda_.Code.from_bucket(bucket, asset_object_key(asset_hash))
        Annotations.of(bucket).acknowledge_warning(
            "@aws-cdk/aws-lambda:codeFromBucketObjectVersionNotSpecified",
            "The key is the code's content hash: new code is a new key, which updates the functions.",
        )
        # An account whose ledger table `ami-janitor ledger create` made before the StackSet reached it:
        # its stack instance takes this parameter as true (README) and uses that table.
        table_exists = CfnParameter(
            self,
            LEDGER_TABLE_EXISTS,
            type="String",
            allowed_values=["false", "true"],
            default="false",
            description=f"true where the account already has the ledger table {policy.ledger.table}",
        )
        create_table = CfnCondition(
            self, "CreateLedgerTable", expression=Fn.condition_equals(table_exists.value_as_string, "false")
        )
        self.janitor = compose_janitor(
            self,
            policy=policy,
            code=code,
            ledger_table_condition=create_table,
            ledger_deployer=STACKSET_EXEC_ROLE,
            # The StackSet names each stack instance (StackSet-AmiJanitor-<id>) at deploy time.
            name_prefix=STACK_SET_NAME,
        )


class OrganizationStack(Stack):
    """`AmiJanitorOrg`, deployed with `cdk deploy` in the management account, in `regions[0]`: the
    StackSet, service-managed, deployed automatically to the accounts of `organization.deploy_to` (as
    they join) in every managed region. Service-managed StackSets never deploy to the management
    account: its regional stacks (`AmiJanitor-<region>`) are deployed with `cdk deploy`. With
    `delegated_admin` the stack is deployed from a delegated administrator of StackSets instead (CallAs
    DELEGATED_ADMIN)."""

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        policy: Policy,
        account: str | None,
        asset_hash: str,
        delegated_admin: bool = False,
    ) -> None:
        organization = policy.organization
        if organization is None:
            raise ValueError("the policy has no `organization`: there is no StackSet to make")
        super().__init__(
            scope,
            id,
            stack_name=id,
            env=Environment(account=account, region=policy.regions[0]),
            description="ami-janitor: the StackSet that deploys the janitor to the organization",
        )
        self.member = MemberStack(
            self, "Member", policy=policy, organization=organization, asset_hash=asset_hash
        )
        self.stack_set = StackSet(
            self,
            "StackSet",
            stack_set_name=STACK_SET_NAME,
            description="ami-janitor in every account of the organization's target OUs and every managed region",
            template=StackSetTemplate.from_stack_set_stack(self.member),
            target=StackSetTarget.from_organizational_units(
                regions=list(policy.managed_regions), organizational_units=list(organization.deploy_to)
            ),
            # An account that leaves the OUs keeps its stack: its ledger and reports are retained anyway,
            # and a named ledger table left behind would stop a later deployment to that account.
            deployment_type=DeploymentType.service_managed(
                auto_deploy_enabled=True, auto_deploy_retain_stacks=True, delegated_admin=delegated_admin
            ),
            capabilities=[Capability.NAMED_IAM],
            operation_preferences=OperationPreferences(
                region_concurrency_type=RegionConcurrencyType.PARALLEL,
                max_concurrent_percentage=MAX_CONCURRENT_PERCENTAGE,
                failure_tolerance_percentage=FAILURE_TOLERANCE_PERCENTAGE,
            ),
        )
        # cdk-stacksets' OperationPreferences has no concurrency mode.
        cast(cloudformation.CfnStackSet, self.stack_set.node.default_child).add_property_override(
            "OperationPreferences.ConcurrencyMode", CONCURRENCY_MODE
        )
