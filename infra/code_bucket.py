"""The member template's function code in one region: a bucket the organization's principals read."""

from __future__ import annotations

from aws_cdk import CfnOutput, Environment, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.buckets import access_log_bucket, private_bucket_settings
from infra.bundle import code_bucket_name

CODE_STACK_PREFIX = "AmiJanitorCode"


def code_stack_name(region: str) -> str:
    return f"{CODE_STACK_PREFIX}-{region}"


class CodeBucket(Construct):
    """Bucket `<prefix>-<region>`: the zip `make publish-org-code` uploads, which Lambda reads in the
    member accounts when CloudFormation creates their functions (a function's code must be in its
    region). Any principal of the organization may read objects; nobody else, and only this account
    writes (through its own IAM policies)."""

    def __init__(self, scope: Construct, id: str, *, bucket_name: str, organization_id: str) -> None:
        super().__init__(scope, id)
        self.access_logs = access_log_bucket(self, "AccessLogs")
        self.bucket = s3.Bucket(
            self,
            "Bucket",
            bucket_name=bucket_name,
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="code/",
            **private_bucket_settings(),
        )
        self.bucket.add_to_resource_policy(
            iam.PolicyStatement(
                sid="OrganizationReadsCode",
                principals=[iam.AnyPrincipal()],
                actions=["s3:GetObject"],
                resources=[self.bucket.arn_for_objects("*")],
                conditions={"StringEquals": {"aws:PrincipalOrgID": organization_id}},
            )
        )


class CodeBucketStack(Stack):
    """`AmiJanitorCode-<region>`, deployed with `cdk deploy` in the account that deploys the StackSet."""

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        region: str,
        account: str | None,
        prefix: str,
        organization_id: str,
    ) -> None:
        super().__init__(
            scope,
            id,
            stack_name=id,
            env=Environment(account=account, region=region),
            description=f"ami-janitor: the function code of the StackSet's member stacks in {region}",
        )
        self.code = CodeBucket(
            self, "Code", bucket_name=code_bucket_name(prefix, region), organization_id=organization_id
        )
        CfnOutput(self, "CodeBucketName", value=self.code.bucket.bucket_name)
