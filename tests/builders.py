"""Small builders for inventories and policies in tests (no AWS)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from ami_janitor.core.model import (
    Image,
    LaunchPermission,
    LedgerItem,
    LedgerStage,
    LedgerView,
    Reference,
    RegionInventory,
)
from ami_janitor.core.policy import Policy, parse_policy

NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
_ids = itertools.count(1)


def image(
    *,
    days_old: float = 100,
    name: str | None = None,
    image_id: str | None = None,
    region: str = "us-east-1",
    arch: str = "x86_64",
    tags: dict[str, str] | None = None,
    state: str = "available",
    snapshots: tuple[str, ...] | None = None,
    size_gib: int = 8,
    perms: tuple[str, ...] | None = (),
    **fields: Any,
) -> Image:
    n = next(_ids)
    created = NOW - timedelta(days=days_old)
    image_id = image_id or f"ami-{n:017x}"
    if isinstance(fields.get("ledger"), LedgerItem):
        fields["ledger"] = fields["ledger"].model_copy(update={"image_id": image_id})
    return Image(
        image_id=image_id,
        region=region,
        name=name or f"app-{created:%Y%m%d%H%M%S}-{n}",
        architecture=arch,
        state=state,
        created=created,
        tags={"Project": "App", **(tags or {})},
        snapshot_ids=snapshots if snapshots is not None else (f"snap-{n:017x}",),
        size_gib=size_gib,
        launch_permissions=None if perms is None else tuple(LaunchPermission.from_key(p) for p in perms),
        **fields,
    )


def reference(
    image_id: str, detail: str = "used by instance i-1 (stopped)", kind: str = "instance"
) -> Reference:
    return Reference(image_id=image_id, kind=kind, resource_id="i-1", detail=detail)


def ledger_item(
    since_days: float,
    stages: dict[str, float] | None = None,
    *,
    confirmed: bool = True,
    **fields: Any,
) -> LedgerItem:
    """A ledger item whose clock started `since_days` ago, with `stages` applied that many days ago
    (image() fills in the AMI id)."""
    return LedgerItem(
        image_id=fields.pop("image_id", ""),
        first_candidate=NOW - timedelta(days=since_days),
        stages={
            stage: LedgerStage(
                at=NOW - timedelta(days=ago), confirmed=NOW - timedelta(days=ago) if confirmed else None
            )
            for stage, ago in (stages or {}).items()
        },
        **fields,
    )


# The ledger of an inventory built here: adopted a year ago, holding the items of its images.
ADOPTED = NOW - timedelta(days=365)


def inventory(*images: Image, region: str = "us-east-1", **fields: Any) -> RegionInventory:
    if "ledger" not in fields:
        items = {i.image_id: i.ledger for i in images if i.ledger is not None}
        fields["ledger"] = LedgerView(table="ami-janitor-ledger", items=items, adopted=ADOPTED)
    return RegionInventory(region=region, images=images, **fields)


def policy(family: dict[str, Any] | None = None, **top: Any) -> Policy:
    defaults = {
        "keep_latest": 2,
        "min_age_days": 30,
        "launched_within_days": 14,
        "lifecycle": {"deprecate_after_days": 0, "disable_after_days": 7, "deregister_after_days": 14},
        "limits": {"max_actions_per_run": 100, "max_fraction_per_family": 1.0},
    }
    defaults.update(top.pop("defaults", {}))
    fam: dict[str, Any] = {"name": "app", "match": {"tags": {"Project": "App"}}}
    fam.update(family or {})
    data: dict[str, Any] = {"regions": ["us-east-1"], "defaults": defaults, "families": [fam]}
    data.update(top)
    return parse_policy(data)
