"""Small builders for inventories and policies in tests (no AWS)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.stub import ANY

from ami_janitor.core.model import (
    Decision,
    Image,
    LaunchPermission,
    LedgerCopy,
    LedgerItem,
    LedgerStage,
    LedgerView,
    Reference,
    RegionInventory,
    Stage,
    iso,
)
from ami_janitor.core.policy import (
    SOURCE_CREATED_TAG,
    SOURCE_IMAGE_TAG,
    SOURCE_REGION_TAG,
    Policy,
    parse_policy,
)

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


def copied(
    source_id: str,
    source_region: str,
    source_created: datetime,
    *,
    generation: int = 1,
    recorded: bool = True,
    **fields: Any,
) -> Image:
    """A copy of `source_id`: EC2 names its source; with `recorded`, its ledger item records the copy as the
    janitor's (what the copier writes), and its tags mirror it."""
    mirror = {
        SOURCE_IMAGE_TAG: source_id,
        SOURCE_REGION_TAG: source_region,
        SOURCE_CREATED_TAG: iso(source_created) or "",
    }
    made = image(
        tags={**mirror, **fields.pop("tags", {})},
        copied_from=source_id,
        copied_from_region=source_region,
        **fields,
    )
    if not recorded:
        return made
    record = LedgerCopy(
        source_image_id=source_id,
        source_region=source_region,
        region=made.region,
        generation=generation,
        token=f"token-{source_id}-{generation}",
        image_id=made.image_id,
        source_created=source_created,
    )
    return made.model_copy(update={"ledger": LedgerItem(image_id=made.image_id, replica=record)})


def granted(source: Image, *grants: str) -> Image:
    """The image with the grants its ledger item records the janitor made."""
    item = source.ledger or LedgerItem(image_id=source.image_id)
    return source.model_copy(update={"ledger": item.model_copy(update={"grants": tuple(sorted(grants))})})


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
    fam: dict[str, Any] = {"name": "app", "match": {"tags": {"Project": "App"}, "name": "app-*"}}
    fam.update(family or {})
    data: dict[str, Any] = {"regions": ["us-east-1"], "defaults": defaults, "families": [fam]}
    data.update(top)
    return parse_policy(data)


def decision(
    n: int, action: str = "deregister", stages: tuple[Stage, ...] = (), region: str = "us-east-1"
) -> Decision:
    """A due decision of family `app` about its AMI number `n` (ids and names follow `n`)."""
    return Decision(
        region=region,
        family="app",
        architecture="x86_64",
        image_id=f"ami-{n:017x}",
        name=f"app-{n}",
        created="2026-01-01T00:00:00Z",
        action=action,  # type: ignore[arg-type]
        reasons=["older"],
        stages=list(stages),
    )


def ledger_write(request: dict[str, Any]) -> dict[str, Any]:
    """An UpdateItem as aws/ledger.py sends it: its SET clause also writes the call's fresh write id
    (any value here), and a failed condition returns the item (to tell a retry of ours from another's)."""
    expression = request["UpdateExpression"]
    assignment = "#last_write = :last_write"
    if expression.startswith("SET "):
        expression = f"SET {assignment}, {expression[4:]}"
    else:
        expression = f"SET {assignment} {expression}"
    return {
        **request,
        "UpdateExpression": expression,
        "ExpressionAttributeNames": {
            **request.get("ExpressionAttributeNames", {}),
            "#last_write": "last_write",
        },
        "ExpressionAttributeValues": {**request.get("ExpressionAttributeValues", {}), ":last_write": ANY},
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }
