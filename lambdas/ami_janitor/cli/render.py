"""What `ami-janitor` and the demo print: plans, applied results, Latest rotations, rescues, copies and
shares, and JSON."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ami_janitor.aws.executor import ActionResult
    from ami_janitor.aws.ledger import CreateResult
    from ami_janitor.aws.rotator import RotationResult
    from ami_janitor.core.model import Copy, LatestChange, Plan
    from ami_janitor.engine import ReplicateResult, RunResult


def emit_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2) + "\n")


WIDTH = 120  # what a terminal shows without wrapping; the last column is wrapped to fit it
LAST_COLUMN_MIN = 40


def table(rows: list[list[str]], out: TextIO, width: int = WIDTH) -> None:
    """Columns padded to their widest cell; the last column wrapped (at "; " or spaces) so that a
    line fits `width`, its continuation lines indented under it."""
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    indent = sum(widths) + 2 * len(widths)
    room = max(width - indent, LAST_COLUMN_MIN)
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        lines = textwrap.wrap(row[-1], room, break_on_hyphens=False) or [""]
        out.write("  ".join([*cells, lines[0]]).rstrip() + "\n")
        for more in lines[1:]:
            out.write(" " * indent + more + "\n")


def print_plan(plan: Plan, out: TextIO) -> None:
    out.write(f"mode: {plan.mode}   generated: {plan.generated_at}\n")
    for status in plan.regions:
        line = f"region {status.region}: {status.status}"
        out.write(line + (f" ({status.error})" if status.error else "") + "\n")
    for error in plan.policy_errors:
        out.write(f"POLICY ERROR: {error}\n")
    for note in plan.notes:
        out.write(f"note: {note}\n")
    rows = [["REGION", "FAMILY", "ARCH", "IMAGE", "CREATED", "ACTION", "REASONS"]]
    for d in plan.decisions:
        action: str = d.action
        if d.action == "wait" and d.next_action:
            action = f"wait ({d.next_action} {(d.next_action_at or '')[:10]})"
        rows.append(
            [d.region, d.family, d.architecture, d.image_id, d.created[:10], action, "; ".join(d.reasons)]
        )
    out.write("\n")
    table(rows, out)
    if plan.latest:
        out.write("\nLatest rotation:\n")
        for change in plan.latest:
            where = f"{change.region} {change.family} {change.architecture}"
            target = change.to or "(none)"
            extra = f", {change.ssm_parameter}" if change.ssm_parameter else ""
            warn = f"  WARNING: {change.warning}" if change.warning else ""
            out.write(f"  {where}: {change.from_ or '(none)'} -> {target}{extra}{warn}\n")
    if plan.copies:
        out.write("\nCopies:\n")
        for copy in plan.copies:
            key = f" (KMS {key_of(copy)})" if copy.kms_key_id else ""
            out.write(f"  {copy.family}: {copy.source_region}/{copy.source_image_id} -> {copy.region}{key}\n")
    if plan.shares:
        out.write("\nShares:\n")
        for share in plan.shares:
            out.write(
                f"  {share.region} {share.image_id}: grant {', '.join(share.add) or '-'}; "
                f"revoke {', '.join(share.remove) or '-'}\n"
            )
    if plan.bakes:
        out.write("\nScheduled bakes:\n")
        for bake in plan.bakes:
            if bake.instance_id is None:
                out.write(f"  {bake.region}: the scheduled bake would refuse: {bake.refusal}\n")
            else:
                what = f"the scheduled bake will image {bake.instance_id} ({bake.reason})"
                out.write(f"  {bake.region}: family {bake.family}: {what}\n")
    if plan.tampered:
        out.write("\nTampered (a janitor tag the ledger does not back: reported, not obeyed):\n")
        for t in plan.tampered:
            out.write(f"  {t.region} {t.image_id}: {t.tag}={t.value} (ledger: {t.ledger or 'nothing'})\n")
    s = plan.summary
    tampered = f"; {s.tampered} tampered tags" if s.tampered else ""
    skipped = [r.region for r in plan.regions if r.status == "skipped"]
    if skipped:
        tampered += f"; regions skipped: {', '.join(skipped)}"
    out.write(
        f"\nsummary: {s.images} images, {s.kept} kept, {s.waiting} waiting, {s.deprecated} to deprecate, "
        f"{s.disabled} to disable, {s.retired} to deregister, {s.rescued} to rescue, "
        f"{s.held_by_cap} held by caps; {s.snapshots_deleted} snapshots, up to {s.gib_freed_max} GiB freed"
        f"{tampered}\n"
    )


def print_rotations(rotations: Iterable[RotationResult], out: TextIO, *, prefix: str = "") -> None:
    """One line per Latest pointer rotated (or not), then what was written for it."""
    for rot in rotations:
        if rot.family == "*" and rot.status == "failed":  # the region could not be read at all
            out.write(f"{prefix}{rot.region}: skipped, could not be read ({rot.error})\n")
            continue
        status = {"ok": "ok", "superseded": f"left as it is: {rot.error}"}.get(
            rot.status, f"FAILED {rot.error}"
        )
        out.write(f"{prefix}{rot.region} {rot.family} {rot.architecture} -> {rot.to}: {status}\n")
        for line in rot.written:
            out.write(f"    {line}\n")


def print_planned_rotations(
    mode: str, changes: Sequence[LatestChange], out: TextIO, *, unread: int = 0, blocked: int = 0
) -> None:
    """The Latest changes `rotate` would make in dry-run or paused mode (`unread`: regions it could
    not read, `blocked`: policy errors that leave groups unrotated; either way it cannot say every
    pointer is current)."""
    out.write(f"mode {mode}: nothing is written; these changes would be made:\n")
    for change in changes:
        if change.to is not None and change.from_ == change.to and change.untag:
            # The target and older AMIs carry the tag (a hand tag, an untag that failed).
            move = f"{change.to} (tagged already; untag {', '.join(change.untag)})"
        elif change.to is not None and change.from_ == change.to and change.ssm_parameter:
            # The tag is on the target alone: its parameter names another AMI.
            move = f"{change.to} (tagged already; {change.ssm_parameter} to be written)"
        else:
            move = f"{change.from_ or '(none)'} -> {change.to or '(none)'}"
        out.write(
            f"  {change.region} {change.family} {change.architecture}: {move}"
            + (f"  WARNING: {change.warning}" if change.warning else "")
            + "\n"
        )
    if not changes and not unread and not blocked:
        out.write("  (every Latest pointer is current)\n")


def print_results(result: RunResult, out: TextIO) -> None:
    """What applying a plan did: the rotations, then every action."""
    print_rotations(result.rotations, out, prefix="rotate ")
    for item in result.results:
        status = "ok" if item.status == "ok" else f"{item.status.upper()} {item.error or ''}".rstrip()
        snaps = f" (snapshots deleted: {', '.join(item.snapshots_deleted)})" if item.snapshots_deleted else ""
        detail = f" [{item.detail}]" if item.detail else ""
        out.write(f"{item.action} {item.region} {item.image_id}: {status}{snaps}{detail}\n")
    replicated = result.replicated
    for shared in replicated.share_results:
        status = "ok" if shared.status == "ok" else f"FAILED {shared.error}"
        granted = _words(shared.added, "granted") + _words(shared.removed, "revoked")
        out.write(f"share {shared.region} {shared.image_id}: {status}{granted}\n")
    for copied in replicated.copy_results:
        status = copied.status if copied.status != "failed" else f"FAILED {copied.error}"
        out.write(f"copy {copied.source_region}/{copied.source_image_id} -> {copied.region}: {status}\n")
    if replicated.queued:
        out.write(f"copies queued for the replication worker: {replicated.queued}\n")
    if replicated.not_queued:
        out.write(
            f"copies SQS did not take (failed; planned again by the next run): {replicated.not_queued}\n"
        )
    for url in result.usage_reports:
        out.write(f"usage report sent: {url}\n")
    for problem in result.usage_problems:
        out.write(f"usage report FAILED: {problem}\n")
    failed = result.failed
    out.write(f"applied: {len(result.results)} actions, {failed} failed\n")


def _words(grants: Sequence[str], verb: str) -> str:
    return f"; {verb} {', '.join(grants)}" if grants else ""


def print_rescue(results: Iterable[ActionResult], out: TextIO) -> None:
    for item in results:
        status = "ok" if item.status == "ok" else f"{item.status.upper()} {item.error or ''}"
        out.write(
            f"{item.action} {item.region} {item.image_id}: {status}"
            + (f" [{item.detail}]" if item.detail else "")
            + "\n"
        )
        if item.status == "ok":
            out.write(
                "  the next run plans it again: unless something keeps it (a reference, the opt-out tag), "
                "it becomes a candidate with a new clock\n"
            )


def key_of(copy: Copy) -> str:
    """The copy's key as the policy names it and, for an alias, the key ARN it resolved to."""
    if copy.kms_key_arn and copy.kms_key_arn != copy.kms_key_id:
        return f"{copy.kms_key_id} = {copy.kms_key_arn}"
    return copy.kms_key_id or ""


def print_replication(result: ReplicateResult, out: TextIO, *, mode: str, applied: bool) -> None:
    """The copies and shares planned and, when applied, what was done."""
    if not applied:
        out.write(f"mode {mode}: nothing is written; these copies and shares would be made:\n")
    for copy in result.copies:
        key = f" encrypted with {key_of(copy)}" if copy.kms_key_id else ""
        out.write(
            f"copy {copy.family} {copy.source_region}/{copy.source_image_id} -> {copy.region}{key}"
            f" (generation {copy.generation})\n"
        )
    for share in result.shares:
        out.write(
            f"share {share.region} {share.image_id}: grant {', '.join(share.add) or '-'}; "
            f"revoke {', '.join(share.remove) or '-'}\n"
        )
    for problem in result.problems:
        out.write(f"note: {problem}\n")
    for done in result.copy_results:
        status = done.status if done.status != "failed" else f"FAILED {done.error}"
        out.write(f"copied {done.source_image_id} -> {done.region}: {done.image_id or '-'} {status}\n")
    for shared in result.share_results:
        status = shared.status if shared.status != "failed" else f"FAILED {shared.error}"
        out.write(f"shared {shared.region} {shared.image_id}: {status}\n")
    for region in result.skipped:
        out.write(f"region {region}: skipped (could not be read)\n")
    if not (result.copies or result.shares or result.skipped):
        out.write("every copy and share is in place\n")


def print_ledger_results(results: Sequence[CreateResult], out: TextIO) -> None:
    """What `ledger create` did, one line per region (and the writers its policy names)."""
    for result in results:
        if result.created:
            what = "created"
        elif result.changes:
            what = "adopted"
        else:
            what = "already set up, nothing to change:"
        changes = f" ({'; '.join(result.changes)})" if result.changes else ""
        out.write(f"{result.region}: {what} {result.table}{changes}\n")
        out.write(f"  writers besides roles under /ami-janitor/: {', '.join(result.writers) or 'none'}\n")
