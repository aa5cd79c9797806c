"""The ledger table of the region: what the janitor did to each AMI (see ami_janitor.aws.ledger)."""

from __future__ import annotations

from typing import cast

from aws_cdk import CfnCondition, CfnResource, RemovalPolicy, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from constructs import Construct

from ami_janitor.aws import ledger

# The CloudFormation execution role of the CDK bootstrap (cdk-<qualifier>-cfn-exec-role-<account>-
# <region>) updates the table and its policy on later deploys; the resource policy lets it write.
CFN_EXEC_ROLE = "cdk-*-cfn-exec-role-*"
# A service-managed StackSet deploys its member stacks with the role it makes in each account.
STACKSET_EXEC_ROLE = "stacksets-exec-*"


class LedgerTable(Construct):
    """On demand, encrypted with the AWS managed key (aws/dynamodb: no key to administer, the table
    never leaves the account), point-in-time recovery, deletion protection, RETAIN, TTL, and a
    resource policy that denies writes to every principal outside the IAM path /ami-janitor/.

    With `existing=True` the stack references a table `ami-janitor ledger create` made instead of
    creating it (that command set the same guards; README, "Adopting a ledger table"); with `condition`,
    the table is created only where it holds (a StackSet member whose account may have one already:
    nothing else names the table's resource, its ARN is built from the name). `deployer` is the
    name pattern of the role that deploys the stack (it may write the table and its policy)."""

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        table_name: str,
        existing: bool = False,
        condition: CfnCondition | None = None,
        deployer: str = CFN_EXEC_ROLE,
    ) -> None:
        super().__init__(scope, id)
        stack = Stack.of(self)
        self.table_arn = stack.format_arn(service="dynamodb", resource="table", resource_name=table_name)
        if existing:
            self.table: dynamodb.ITable = dynamodb.Table.from_table_name(self, "Table", table_name)
            return
        deployer_arn = f"arn:{stack.partition}:iam::{stack.account}:role/{deployer}"
        document = ledger.resource_policy(self.table_arn, [deployer_arn], partition=stack.partition)
        self.table = dynamodb.Table(
            self,
            "Table",
            table_name=table_name,
            partition_key=dynamodb.Attribute(name="pk", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="sk", type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            deletion_protection=True,
            removal_policy=RemovalPolicy.RETAIN,  # the record of what was done outlives the stack
            time_to_live_attribute=ledger.TTL_ATTRIBUTE,
            resource_policy=iam.PolicyDocument.from_json(document),
        )
        if condition is not None:
            cast(CfnResource, self.table.node.default_child).cfn_options.condition = condition
