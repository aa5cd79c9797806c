"""The run reports bucket, with its own server access log bucket."""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.buckets import access_log_bucket, private_bucket_settings
from infra.permissions import Statement


class Reports(Construct):
    """Private, encrypted, TLS-only buckets; every run's report stays (the audit trail: the ledger's
    items of deregistered AMIs expire after its retention), access logs are kept a year.

    (cdk-nag's S1 accepts the log bucket without a log of its own, as a logging destination.)
    """

    def __init__(self, scope: Construct, id: str) -> None:
        super().__init__(scope, id)
        self.access_logs = access_log_bucket(self, "AccessLogs")
        self.bucket = s3.Bucket(
            self,
            "Bucket",
            lifecycle_rules=[
                s3.LifecycleRule(abort_incomplete_multipart_upload_after=Duration.days(1)),
            ],
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="reports/",
            **private_bucket_settings(),
        )

    def write_statement(self) -> Statement:
        # Every report key is under runs/ (handlers.scheduled.report_key): the handler may only add
        # objects there, never read or delete.
        return Statement("WriteRunReports", ("s3:PutObject",), (self.bucket.arn_for_objects("runs/*"),))

    def slice_statements(self) -> list[Statement]:
        """The slice worker writes its results beside the run's report and reads them back (the run's
        last slice makes the one report from every part)."""
        runs = self.bucket.arn_for_objects("runs/*")
        return [
            Statement("WriteRunReports", ("s3:PutObject",), (runs,)),
            Statement("ReadRunReportParts", ("s3:GetObject",), (runs,)),
        ]
