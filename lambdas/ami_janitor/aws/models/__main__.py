"""`python -m ami_janitor.aws.models`: the cut models and endpoint data, written again from the
installed botocore."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import botocore.loaders

from ami_janitor.aws.models import DATA_PATH, ENDPOINTS, OPERATIONS, SERVICES, model_path
from ami_janitor.aws.models.trim import endpoints_of, trimmed


def botocore_loader() -> botocore.loaders.Loader:
    """botocore's own data: not the cuts, not ~/.aws/models."""
    builtin = botocore.loaders.Loader.BUILTIN_DATA_PATH
    return botocore.loaders.Loader(extra_search_paths=[builtin], include_default_search_paths=False)


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {path.relative_to(DATA_PATH)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    loader = botocore_loader()
    for service in OPERATIONS:
        shutil.rmtree(DATA_PATH / service, ignore_errors=True)  # an older API version's cut
        version = loader.determine_latest_version(service, "service-2")
        full = loader.load_service_model(service, "service-2", version)
        _write(model_path(service, version), trimmed(full, OPERATIONS[service]))
    _write(ENDPOINTS, endpoints_of(loader.load_data("endpoints"), SERVICES))
