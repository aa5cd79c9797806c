"""The usage inbox (`usage_reports`): where the organization's janitors leave their usage reports."""

from __future__ import annotations

from aws_cdk import CfnOutput, Duration, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

from ami_janitor.aws import ledger
from ami_janitor.core.policy import UsageReports
from infra.buckets import access_log_bucket, private_bucket_settings

# A report is written again by every scheduled run: one not rewritten for this long is of an account
# that left (its absence then reads as a missing report, never as a fresh one).
REPORT_RETENTION = Duration.days(30)


class UsageInbox(Construct):
    """Bucket `usage_reports.bucket`. Principals of the organization under the IAM path /ami-janitor/
    (the janitor's roles in every account) may write only under `<prefix>reports/<their own account>/`
    and read and list `<prefix>reports/`; objects belong to the bucket owner whoever wrote them."""

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
                s3.LifecycleRule(
                    prefix=reports,
                    expiration=REPORT_RETENTION,
                    abort_incomplete_multipart_upload_after=Duration.days(1),
                )
            ],
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="inbox/",
            **private_bucket_settings(),
        )
        janitors = {
            "StringEquals": {"aws:PrincipalOrgID": organization_id},
            "ArnLike": {"aws:PrincipalArn": ledger.janitor_principal_pattern(stack.partition)},
        }
        for sid, action, resource in (
            # ${aws:PrincipalAccount} is the writer's own account: no account writes another's report.
            (
                "JanitorsWriteOwnReports",
                "s3:PutObject",
                self.bucket.arn_for_objects(f"{reports}${{aws:PrincipalAccount}}/*"),
            ),
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
        CfnOutput(stack, "UsageInboxBucket", value=self.bucket.bucket_name)
