"""Usage reports across accounts: what a member account reports, and what an owner keeps because of
them (pure: the inbox is read and written in aws/usage.py).

A consumer's report lists the AMIs of other accounts its resources use, per region. An owner keeps an
AMI shared with an account while that account's fresh report says it is in use, and keeps it as well
where the report is missing (unless `required: false`), stale or unreadable: the brownout of the
disable stage is then the last word, never the first (fail safe). Shares to an organization or OU count
through the accounts Organizations lists, and keep the AMI where it could not list them.
"""

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ami_janitor.core.model import Image, ReceivedReport, Reference, UsageView, iso
from ami_janitor.core.policy import UsageReports

_ACCOUNT = r"^[0-9]{12}$"  # pydantic's pattern (Rust's): `\d` would be any Unicode digit


class UsageReport(BaseModel):
    """The body of `reports/<account>/<region>.json` in the inbox. The owner believes the account from
    the key's prefix, where the inbox lets only that account write, and the date from S3."""

    # Off the scheduled run's path: its validator is built when first used, not at each cold start.
    model_config = ConfigDict(defer_build=True, extra="forbid", frozen=True)

    version: Literal[1] = 1
    account: str = Field(pattern=_ACCOUNT)
    region: str = Field(min_length=1)
    generated_at: datetime
    # AMI id -> what uses it here, sorted; only AMIs other accounts own.
    uses: dict[str, list[str]] = {}
    # The sources the account could not read ('<source>: <code>: <message>'): `uses` may lack what they
    # hold, so the report keeps, as an unreadable one does (an owner of before this field refuses it:
    # it keeps too).
    unread: list[str] = []


def report_of(
    account: str,
    region: str,
    own_images: Iterable[Image],
    references: Sequence[Reference],
    now: datetime,
    unread: Sequence[str] = (),
) -> UsageReport:
    """An account's report for a region: every reference to an AMI it does not own (from each
    reference source the janitor reads), as found in a complete inventory, and the recipe sources it
    could not read (`unread`)."""
    own = {image.image_id for image in own_images}
    uses: dict[str, set[str]] = {}
    for reference in references:
        if reference.image_id not in own:
            uses.setdefault(reference.image_id, set()).add(reference.detail)
    return UsageReport(
        account=account,
        region=region,
        generated_at=now,
        uses={image_id: sorted(details) for image_id, details in sorted(uses.items())},
        unread=list(unread),
    )


def consumer_grants(image: Image, own_account: str) -> list[str]:
    """The launch permissions that let other accounts use an AMI: 'user:ID', 'org:ARN', 'ou:ARN'
    (public is the public rule's business: its users cannot be known). A disabled AMI has none: those
    the ledger recorded before the janitor disabled it count (its consumers may still want it back), as
    long as its clock is open, whatever its state (EnableImage by hand gives no permission back)."""
    keys = [p.key for p in image.launch_permissions or ()]
    item = image.ledger
    if item is not None and item.closed is None and "disable" in item.stages:
        keys += item.stages["disable"].prior_launch_permissions
    return sorted(
        {
            k
            for k in keys
            if k.startswith(("org:", "ou:")) or (k.startswith("user:") and k != f"user:{own_account}")
        }
    )


def consumers(image: Image, view: UsageView) -> tuple[set[str], list[str]]:
    """The accounts an AMI is shared with (organizations and OUs expanded), and the grants whose
    accounts could not be listed."""
    accounts: set[str] = set()
    unknown: list[str] = []
    for grant in consumer_grants(image, view.own_account):
        kind, _, value = grant.partition(":")
        if kind == "user":
            accounts.add(value)
            continue
        members = view.expansions.get(grant)
        if members is None:
            unknown.append(grant)
        else:
            accounts.update(a for a in members if a != view.own_account)
    return accounts, unknown


def expanded_grants(image: Image, view: UsageView) -> list[str]:
    """The organization and OU grants of an AMI whose accounts the view lists (`consumers` counts them):
    a slice tells these from one granted since its plan."""
    return [
        grant
        for grant in consumer_grants(image, view.own_account)
        if not grant.startswith("user:") and view.expansions.get(grant) is not None
    ]


def usage_reasons(image: Image, view: UsageView | None, settings: UsageReports, now: datetime) -> list[str]:
    """Why the consumers of a shared AMI keep it: in use by a fresh report; or a report missing
    (where required), stale or unreadable; or accounts Organizations could not list. [] when every
    consumer's fresh report says it is not used (or it is not shared)."""
    if view is None:
        # Not read (a plan that did not load its details): a shared AMI is kept, never guessed unused.
        if consumer_grants(image, ""):
            return ["shared with other accounts, whose usage reports were not read: kept (fail safe)"]
        return []
    if not consumer_grants(image, view.own_account):
        return []
    accounts, unknown = consumers(image, view)
    reasons = [
        f"shared with {grant}, whose accounts cannot be listed from this account (Organizations): "
        "kept until they can (fail safe)"
        for grant in unknown
    ]
    for account in sorted(accounts):
        reason = account_reason(
            image.image_id, image.region, account, view.reports.get(account), settings, now
        )
        if reason is not None:
            reasons.append(reason)
    return reasons


def account_reason(
    image_id: str,
    region: str,
    account: str,
    report: ReceivedReport | None,
    settings: UsageReports,
    now: datetime,
) -> str | None:
    """Why one consumer account's report keeps an AMI shared with it; None when the report is fresh
    and does not name the AMI (or, with `required: false`, when there is none)."""
    if report is None:
        if not settings.required:
            return None
        return (
            f"shared with account {account}, which has sent no usage report for {region}: "
            "kept until it does (fail safe)"
        )
    if report.problem is not None:
        return f"shared with account {account}, whose usage report cannot be read ({report.problem}): kept (fail safe)"
    if report.received_at < now - timedelta(hours=settings.max_age_hours):
        return (
            f"shared with account {account}, whose usage report is of {iso(report.received_at)}, "
            f"older than {settings.max_age_hours} hours: kept (fail safe)"
        )
    if image_id in report.uses:
        what = "; ".join(_what(detail) for detail in report.uses[image_id]) or "a resource"
        return f"used in account {account} by {what} (report of {iso(report.received_at)})"
    return None


def reports_needed(
    images: Iterable[Image], own_account: str, expansions: dict[str, tuple[str, ...] | None]
) -> set[str]:
    """The accounts whose reports an owner reads for these AMIs."""
    view = UsageView(own_account=own_account, expansions=expansions)
    return {account for image in images for account in consumers(image, view)[0]}


def _what(detail: str) -> str:
    """'referenced by launch template lt-1 ...' -> 'launch template lt-1 ...' (the reason says 'by')."""
    for verb in ("referenced by ", "used by "):
        if detail.startswith(verb):
            return detail.removeprefix(verb)
    return detail
