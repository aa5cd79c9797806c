"""Usage reports across accounts, read and written in the inbox of `usage_reports` (S3).

Each account's scheduled run writes, per region, the AMIs of other accounts its resources use, under
`<prefix>reports/<its account id>/<region>.json`; the inbox's bucket policy lets an account write only
under its own id. An owner reads the report of each account it shares an AMI with, from that account's
prefix only, and dates it by S3's LastModified (set by S3, not by the writer).
"""

from __future__ import annotations

# A member account's scheduled run: its own report.
PUBLISH_PERMISSIONS: list[str] = ["s3:PutObject"]
# An owner's plan, and the slice worker's fresh check: the reports of the accounts it shares with
# (s3:ListBucket makes a missing report answer 404, not 403).
READ_PERMISSIONS: list[str] = sorted(["s3:GetObject", "s3:ListBucket"])
# Shares to an organization or OU are expanded to accounts where the owner may call Organizations.
ORGANIZATIONS_PERMISSIONS: list[str] = sorted(
    [
        "organizations:DescribeOrganization",
        "organizations:ListAccounts",
        "organizations:ListAccountsForParent",
        "organizations:ListChildren",
    ]
)
