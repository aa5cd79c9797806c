"""The region's ledger (DynamoDB Scan): what the janitor itself did to each AMI, the record every
decision to act sooner, delete, grant or revoke believes (tags are only a mirror for people)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from ami_janitor.aws import ledger
from ami_janitor.aws.inventory.reading import source
from ami_janitor.core.model import LedgerView

if TYPE_CHECKING:
    from ami_janitor.aws.clients import RegionClients

# The region's table once per run (read_ledger).
PERMISSIONS: list[str] = ["dynamodb:Scan"]
# The items of a few AMIs (read_ledger_items), for the readers of single AMIs.
ITEM_PERMISSIONS: list[str] = ["dynamodb:BatchGetItem"]


def read_ledger(clients: RegionClients, table: str) -> LedgerView | None:
    """Every item of the region's ledger table; None where the region has no table yet."""
    with source("dynamodb:Scan"):
        return _unless_missing(lambda: ledger.Ledger(clients, table).read_all())


def read_ledger_items(clients: RegionClients, table: str, image_ids: Iterable[str]) -> LedgerView | None:
    """The ledger items of a few AMIs (BatchGetItem), for a reader of single AMIs (an event, a queued
    copy); None where the region has no table yet. No AMI, no call: an empty view."""
    return _unless_missing(
        lambda: LedgerView(table=table, items=ledger.Ledger(clients, table).read_items(image_ids))
    )


def _unless_missing(read: Callable[[], LedgerView]) -> LedgerView | None:
    """`read`'s view, or None where its answer says the table is missing: no DescribeTable first."""
    try:
        return read()
    except ClientError as error:
        if ledger.not_found(error):
            return None
        raise
