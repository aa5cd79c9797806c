"""`python -m ami_janitor.aws.models`: EC2's cut model, written again from the installed botocore."""

from __future__ import annotations

import json

import botocore.loaders

from ami_janitor.aws.models import EC2_API_VERSION, EC2_MODEL, EC2_OPERATIONS
from ami_janitor.aws.models.trim import trimmed

if __name__ == "__main__":
    builtin = (
        botocore.loaders.Loader.BUILTIN_DATA_PATH
    )  # botocore's own data: not this cut, not ~/.aws/models
    loader = botocore.loaders.Loader(extra_search_paths=[builtin], include_default_search_paths=False)
    full = loader.load_service_model("ec2", "service-2", EC2_API_VERSION)
    EC2_MODEL.parent.mkdir(parents=True, exist_ok=True)
    EC2_MODEL.write_text(json.dumps(trimmed(full, EC2_OPERATIONS), separators=(",", ":")) + "\n")
    print(f"wrote {EC2_MODEL} ({EC2_MODEL.stat().st_size:,} bytes, {len(EC2_OPERATIONS)} operations)")
