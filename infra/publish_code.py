"""`make publish-org-code`: upload the functions' code to the code bucket of every managed region.

The StackSet's member template reads its functions' code from `<organization.code_bucket_prefix>-<region>`
under the key `cdk deploy` gives the regional stacks' asset (infra.bundle.asset_object_key): this
zips the same asset directory (infra.bundle.code_asset) and puts it in each region's bucket, once:
a key that is there already is the same content (the key is its hash) and is left alone. Every call
names the expected bucket owner (the caller's account), so the zip never lands in a bucket of another
account that took the name first.

Run it after `cdk deploy 'AmiJanitorCode-*'` and before `cdk deploy AmiJanitorOrg`, with credentials of
the account that deploys the StackSet.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ami_janitor.core.policy import DEFAULT_CONFIG_PATH, Policy, PolicyError, load_policy
from infra.bundle import REPO_ROOT, asset_object_key, code_asset, code_bucket_name

# A fixed timestamp: the same directory makes the same zip.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


@dataclass(frozen=True)
class Published:
    region: str
    bucket: str
    key: str
    uploaded: bool  # False: the object was there already


def zip_directory(directory: Path) -> bytes:
    """Every file of `directory`, sorted, with fixed timestamps and its permission bits."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(directory).as_posix(), date_time=_ZIP_TIME)
            info.external_attr = (path.stat().st_mode & 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def publish(
    *,
    regions: Sequence[str],
    prefix: str,
    asset_dir: Path,
    asset_hash: str,
    account: str,
    s3_client: Callable[[str], Any],
) -> list[Published]:
    """Put the zip of `asset_dir` in each region's code bucket where its key is not there yet."""
    key = asset_object_key(asset_hash)
    body: bytes | None = None  # zipped only if a region needs it
    out = []
    for region in regions:
        s3 = s3_client(region)
        bucket = code_bucket_name(prefix, region)
        if _exists(s3, bucket, key, account):
            out.append(Published(region, bucket, key, uploaded=False))
            continue
        if body is None:
            body = zip_directory(asset_dir)
        s3.put_object(
            Bucket=bucket, Key=key, Body=body, ContentType="application/zip", ExpectedBucketOwner=account
        )
        out.append(Published(region, bucket, key, uploaded=True))
    return out


def _exists(s3: Any, bucket: str, key: str, account: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.head_object(Bucket=bucket, Key=key, ExpectedBucketOwner=account)
    except ClientError as error:
        if str(error.response.get("Error", {}).get("Code")) in _MISSING:
            return False
        raise
    return True


def main(argv: Sequence[str] | None = None) -> int:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    path = os.environ.get("AMI_JANITOR_CONFIG") or str(REPO_ROOT / DEFAULT_CONFIG_PATH)
    try:
        policy: Policy = load_policy(path)
    except PolicyError as error:
        print(f"ami-janitor: {error}", file=sys.stderr)
        return 2
    if policy.organization is None:
        print(
            f"ami-janitor: {path}: no `organization`: there is no StackSet code to publish", file=sys.stderr
        )
        return 2
    asset_dir, asset_hash = code_asset(policy)
    session = boto3.session.Session()
    try:
        account = str(session.client("sts").get_caller_identity()["Account"])
        published = publish(
            regions=policy.managed_regions,
            prefix=policy.organization.code_bucket_prefix,
            asset_dir=asset_dir,
            asset_hash=asset_hash,
            account=account,
            s3_client=lambda region: session.client("s3", region_name=region),
        )
    except (BotoCoreError, ClientError) as error:
        print(f"ami-janitor: publishing the code failed: {error}", file=sys.stderr)
        return 1
    for item in published:
        done = "uploaded" if item.uploaded else "already there"
        print(f"{item.region}: s3://{item.bucket}/{item.key} {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
