"""Private buckets as every bucket of the stacks is made, each with its server access log bucket."""

from __future__ import annotations

from typing import Any

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_s3 as s3
from constructs import Construct

ACCESS_LOG_RETENTION = Duration.days(365)


def private_bucket_settings() -> dict[str, Any]:
    """Encrypted, no public access, TLS only, owned by the bucket owner whoever writes, kept on delete."""
    return {
        "encryption": s3.BucketEncryption.S3_MANAGED,  # access log delivery supports SSE-S3 only
        "block_public_access": s3.BlockPublicAccess.BLOCK_ALL,
        "enforce_ssl": True,
        # ACLs off: every object belongs to the bucket owner, whichever account wrote it.
        "object_ownership": s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
        "removal_policy": RemovalPolicy.RETAIN,  # no custom resource to empty it: keep on delete
    }


def access_log_bucket(scope: Construct, id: str) -> s3.Bucket:
    """Where a bucket's server access logs go, kept a year (cdk-nag's S1 accepts a logging
    destination without a log of its own)."""
    return s3.Bucket(
        scope,
        id,
        lifecycle_rules=[s3.LifecycleRule(expiration=ACCESS_LOG_RETENTION)],
        **private_bucket_settings(),
    )
