"""Resolving the aliases that name replica keys: DescribeKey in each target region, once per run.

CopyImage then gets the key ARN, never the alias, and the ledger records it with the copy (see
core.keys for the check against the last copy's key). An alias that cannot be resolved is a reason
to skip its target, never an exception and never a copy without the key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ami_janitor.aws.clients import RegionClients
from ami_janitor.aws.errors import AWS_ERRORS, error_text, is_passing
from ami_janitor.core.keys import ResolvedKey
from ami_janitor.core.policy import kms_arn_region

# DescribeKey with the alias (in the target region): its KeyMetadata names the key ARN.
PERMISSIONS: list[str] = ["kms:DescribeKey"]


def resolve_key(clients: RegionClients, kms_key_id: str) -> ResolvedKey:
    """What `kms_key_id` (an alias) names in the clients' region now, or why it cannot be used."""
    try:
        answer = clients.kms.describe_key(KeyId=kms_key_id)
    except AWS_ERRORS as error:
        if is_passing(error):
            return ResolvedKey(
                problem=f"cannot resolve it in {clients.region} now ({error_text(error)})", passing=True
            )
        return ResolvedKey(problem=f"cannot resolve it in {clients.region} ({error_text(error)})")
    # A malformed answer (no KeyMetadata, no Arn) resolves to nothing: its target is skipped.
    metadata = answer.get("KeyMetadata") or {}
    arn, state = metadata.get("Arn"), metadata.get("KeyState")
    if not arn:
        return ResolvedKey(problem=f"DescribeKey in {clients.region} answered no key ARN")
    if kms_arn_region(arn) != clients.region:
        return ResolvedKey(
            problem=f"DescribeKey in {clients.region} answered key {arn!r}, not one of the region"
        )
    if state != "Enabled":
        # A disabled key or one pending deletion would fail the copy, or leave snapshots unreadable.
        return ResolvedKey(problem=f"it resolves to {arn}, which is {state}")
    return ResolvedKey(arn=arn)


def resolve_keys(
    clients_for: Callable[[str], RegionClients], aliases: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], ResolvedKey]:
    """(target region, alias) -> what it resolves to now (core.keys.aliases_to_resolve lists them)."""
    return {(region, alias): resolve_key(clients_for(region), alias) for region, alias in aliases}
