"""The usage inbox (`usage_reports`): where the organization's janitors leave their usage reports."""

from __future__ import annotations

from aws_cdk import CfnOutput, Duration, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

from ami_janitor.aws import ledger
from ami_janitor.core.policy import UsageReports
from infra.buckets import access_log_bucket, private_bucket_settings

# A report never expires: one that vanished would read as missing, which `required: false` takes as
# "not used", while a stale one keeps its AMIs (fail safe). Each account's report of a region is one
# object, overwritten by every scheduled run: the inbox does not grow.
# What changes a report: a write, a delete (of the object or of a version of it: the "null" version of
# an unversioned bucket is the object itself), a replication into the bucket. The bucket policy denies
# them to all but each account's own janitor roles, under that account's prefix.
REPORT_WRITES = sorted(
    ["s3:DeleteObject", "s3:DeleteObjectVersion", "s3:PutObject", "s3:ReplicateDelete", "s3:ReplicateObject"]
)


class UsageInbox(Construct):
    """Bucket `usage_reports.bucket`. Principals of the organization under the IAM path /ami-janitor/
    (the janitor's roles in every account) may write only under `<prefix>reports/<their own account>/`
    and read and list `<prefix>reports/`; objects belong to the bucket owner whoever wrote them. No other
    principal, of the bucket's own account included, may write or delete an object, and none anywhere
    but under its own account's prefix."""

    def __init__(self, scope: Construct, id: str, *, settings: UsageReports, organization_id: str) -> None:
        super().__init__(scope, id)
        stack = Stack.of(self)
        reports = f"{settings.prefix}reports/"
        self.access_logs = access_log_bucket(self, "AccessLogs")
        self.bucket = s3.Bucket(
            self,
            "Bucket",
            bucket_name=settings.bucket,
            lifecycle_rules=[
                s3.LifecycleRule(prefix=reports, abort_incomplete_multipart_upload_after=Duration.days(1))
            ],
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="inbox/",
            **private_bucket_settings(),
        )
        janitor_roles = ledger.janitor_principal_pattern(stack.partition)
        janitors = {
            "StringEquals": {"aws:PrincipalOrgID": organization_id},
            "ArnLike": {"aws:PrincipalArn": janitor_roles},
        }
        own_reports = self.bucket.arn_for_objects(f"{reports}${{aws:PrincipalAccount}}/*")
        for sid, action, resource in (
            # ${aws:PrincipalAccount} is the writer's own account: no account writes another's report.
            ("JanitorsWriteOwnReports", "s3:PutObject", own_reports),
            ("JanitorsReadReports", "s3:GetObject", self.bucket.arn_for_objects(f"{reports}*")),
            # No s3:prefix condition: S3 checks ListBucket for a GetObject of a missing key (to answer
            # 404, not 403) without a prefix in the context.
            ("JanitorsListReports", "s3:ListBucket", self.bucket.bucket_arn),
        ):
            self.bucket.add_to_resource_policy(
                iam.PolicyStatement(
                    sid=sid,
                    principals=[iam.AnyPrincipal()],
                    actions=[action],
                    resources=[resource],
                    conditions=janitors,
                )
            )
        # In the inbox's own account an identity policy alone grants access, whatever the Allows above
        # say: these Denies hold the write rules for every principal, that account's own included.
        self.bucket.add_to_resource_policy(
            iam.PolicyStatement(
                sid="DenyWritesOutsideOwnReports",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=REPORT_WRITES,
                # Every object but those under the writer's own account's prefix.
                not_resources=[own_reports],
            )
        )
        self.bucket.add_to_resource_policy(
            iam.PolicyStatement(
                sid="DenyWritesOutsideJanitors",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=REPORT_WRITES,
                resources=[self.bucket.arn_for_objects("*")],
                conditions={"ArnNotLike": {"aws:PrincipalArn": janitor_roles}},
            )
        )
        CfnOutput(stack, "UsageInboxBucket", value=self.bucket.bucket_name)
