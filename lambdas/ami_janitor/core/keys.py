"""Replica keys named by an alias: which aliases to resolve, and whether what one resolves to now may be
used.

An alias is a pointer anyone with kms:UpdateAlias can move, so the ledger records, with each copy, the
key ARN it was made with. A target whose alias now resolves to another key than the last copy of that
family to that region was made with is refused (a key change is a policy change: name the new key's
ARN). The edge resolves the aliases (DescribeKey in the target region); this module only compares.
"""

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import NamedTuple

from ami_janitor.core.model import LedgerCopy, LedgerItem, RegionInventory
from ami_janitor.core.policy import Policy, ReplicateTarget

_NEVER = datetime.min.replace(tzinfo=UTC)


class ResolvedKey(NamedTuple):
    """What an alias names now: its key ARN, or (one line) why it cannot be used; `passing` when KMS
    failed for a while (a throttle, a 5xx), which says nothing about the alias."""

    arn: str | None = None
    problem: str | None = None
    passing: bool = False


# (target region, kms_key_id as the policy names it) -> what it resolves to.
KeyResolutions = Mapping[tuple[str, str], ResolvedKey]
# (family, target region) -> the ledger's record of the last copy made there with a known key.
LastKeys = Mapping[tuple[str, str], LedgerCopy]


def aliases_to_resolve(policy: Policy, families: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(target region, kms_key_id) of every target named by an alias, of `families` (default: all)."""
    wanted = set(families) if families is not None else {f.name for f in policy.families}
    return sorted(
        {
            (target.region, target.kms_key_id)
            for family in policy.families
            if family.name in wanted
            for target in family.replicate
            if target.kms_key_id is not None and target.kms_alias is not None
        }
    )


def copy_records(items: Iterable[LedgerItem]) -> list[LedgerCopy]:
    """Every copy record of these items: on sources (started) and on replicas (made)."""
    return [record for item in items for record in (*item.copies, *([item.replica] if item.replica else []))]


def inventory_records(inventories: Iterable[RegionInventory]) -> list[LedgerCopy]:
    return copy_records(
        item for inv in inventories if inv.ledger is not None for item in inv.ledger.items.values()
    )


def last_keys(records: Iterable[LedgerCopy]) -> dict[tuple[str, str], LedgerCopy]:
    """(family, region) -> the latest record with a key ARN (by start, then source, then generation)."""
    last: dict[tuple[str, str], LedgerCopy] = {}
    for record in records:
        if record.family is None or record.kms_key_arn is None:
            continue
        where = (record.family, record.region)
        if where not in last or _order(record) > _order(last[where]):
            last[where] = record
    return last


def _order(record: LedgerCopy) -> tuple[datetime, datetime, int]:
    return (record.started or _NEVER, record.source_created or _NEVER, record.generation)


def target_key(
    family: str, target: ReplicateTarget, keys: KeyResolutions | None, last: LastKeys
) -> tuple[str | None, str | None]:
    """(the key ARN a copy to `target` is made with, None) or (None, why the target is skipped now).
    A key ARN is the policy's own; an alias must be resolved and name the key of the last copy."""
    if target.kms_key_id is None or target.kms_alias is None:
        return target.kms_key_id, None
    where = f"family {family}: replicate target {target.region} ({target.kms_key_id})"
    resolved = (keys or {}).get((target.region, target.kms_key_id))
    if resolved is None or resolved.arn is None:
        why = resolved.problem if resolved is not None else "the alias was not resolved"
        return None, f"{where} skipped: {why}; not copied"
    record = last.get((family, target.region))
    if record is not None and record.kms_key_arn != resolved.arn:
        return None, (
            f"{where} refused: the alias now resolves to {resolved.arn}, but the last copy there "
            f"(of {record.source_image_id}, generation {record.generation}) was made with {record.kms_key_arn}; "
            "if the key change is intended, name the new key's ARN in kms_key_id"
        )
    return resolved.arn, None
