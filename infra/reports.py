"""The run reports bucket, with its own server access log bucket."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.permissions import Statement

REPORT_RETENTION = Duration.days(90)
ACCESS_LOG_RETENTION = Duration.days(365)


class Reports(Construct):
    """Private, encrypted, TLS-only buckets; reports expire, access logs are kept a year.

    (cdk-nag's S1 accepts the log bucket without a log of its own, as a logging destination.)
    """

    def __init__(self, scope: Construct, id: str) -> None:
        super().__init__(scope, id)
        common = {
            "encryption": s3.BucketEncryption.S3_MANAGED,  # access log delivery supports SSE-S3 only
            "block_public_access": s3.BlockPublicAccess.BLOCK_ALL,
            "enforce_ssl": True,
            "object_ownership": s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            "removal_policy": RemovalPolicy.RETAIN,  # no custom resource to empty it: keep on delete
        }
        self.access_logs = s3.Bucket(
            self,
            "AccessLogs",
            lifecycle_rules=[s3.LifecycleRule(expiration=ACCESS_LOG_RETENTION)],
            **common,  # type: ignore[arg-type]
        )
        self.bucket = s3.Bucket(
            self,
            "Bucket",
            lifecycle_rules=[
                s3.LifecycleRule(
                    expiration=REPORT_RETENTION,
                    abort_incomplete_multipart_upload_after=Duration.days(1),
                )
            ],
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="reports/",
            **common,  # type: ignore[arg-type]
        )

    def write_statement(self) -> Statement:
        # Report keys are chosen by the handler; it may only add objects, never read or delete.
        return Statement("WriteRunReports", ("s3:PutObject",), (self.bucket.arn_for_objects("*"),))

    def slice_statements(self) -> list[Statement]:
        """The slice worker writes its results beside the run's report and reads them back (the run's
        last slice makes the one report from every part)."""
        runs = self.bucket.arn_for_objects("runs/*")
        return [
            Statement("WriteRunReports", ("s3:PutObject",), (self.bucket.arn_for_objects("*"),)),
            Statement("ReadRunReportParts", ("s3:GetObject",), (runs,)),
        ]
