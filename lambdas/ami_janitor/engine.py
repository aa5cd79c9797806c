"""The engine's entry points, shared by the CLI and the Lambda handlers: plan, apply, rescue, rotate,
replicate, events, the scheduled bake and the queued copy."""

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field

# Imported where they are used, not here: the slicer and the runs' records (a run with stages due),
# the usage reports (a policy with usage_reports), the copier (copies started here) and the baker. A
# scheduled run's cold start in a region with no AMI needs none of them (roles.py gathers their
# PERMISSIONS).
from ami_janitor.aws import executor, inventory, kms, ledger, rotator, sharer
from ami_janitor.aws.clients import ClientFactory, RegionClients
from ami_janitor.aws.errors import error_text
from ami_janitor.aws.executor import ActionResult, ApplyResult
from ami_janitor.aws.pacing import STAGE_REFILL
from ami_janitor.aws.rotator import AmiEventOutcome
from ami_janitor.core import keys, replication, run_plan, sharing, slices, trust
from ami_janitor.core.keys import ResolvedKey
from ami_janitor.core.model import (
    AmiState,
    Copy,
    Decision,
    Image,
    Outcome,
    Plan,
    RegionInventory,
    RegionStatus,
    Share,
    Summary,
    with_ledger,
)
from ami_janitor.core.policy import Family, Mode, Policy

if TYPE_CHECKING:
    from ami_janitor.aws.runs import RunProgress
    from ami_janitor.aws.slicer import SliceOutcome

ClientsFor = Callable[[str], RegionClients]
Enqueue = Callable[[Sequence[Copy]], int]
Progress = Callable[[str], None]  # a line for a person watching (the CLI on a terminal)
REGION_WORKERS = 8  # regions read at once
# The paced calls of one slice: its worker's timeout (15 minutes) leaves room for its reads and retries.
SLICE_BUDGET_SECONDS = 300.0


def _quiet(line: str) -> None:
    pass


def _read_region(
    load: Callable[[RegionClients, Policy], RegionInventory],
    region: str,
    clients_for: ClientsFor,
    policy: Policy,
    progress: Progress,
) -> RegionInventory:
    progress(f"{region}: reading")
    started = time.monotonic()
    loaded = load(clients_for(region), policy)
    took = f"{time.monotonic() - started:.1f} s"
    if loaded.error is not None:
        progress(f"{region}: skipped after {took} ({loaded.error})")
    else:
        progress(f"{region}: {len(loaded.images):,} AMIs read in {took}")
    return loaded


class ReplicateResult(BaseModel):
    """Shares and copies planned, and what applying them did."""

    shares: list[Share] = []
    copies: list[Copy] = []
    problems: list[str] = []
    share_results: list[sharer.ShareResult] = []
    copy_results: list[replication.CopyResult] = []
    queued: int = 0
    # Copies SQS did not take (the queue, or the call, failed): failures, planned again by the next run.
    not_queued: int = 0
    # Regions that could not be read ("region: error"): nothing was planned there.
    skipped: list[str] = []

    @property
    def failed(self) -> int:
        shares = sum(1 for r in self.share_results if r.status == "failed")
        copies = sum(1 for r in self.copy_results if r.status == "failed")
        return shares + copies + self.not_queued + len(self.skipped)


class RunSummary(Summary):
    """The plan's summary, with the snapshots deleted counted from the results once applied."""

    actions_failed: int = 0
    # AMIs a slice held back: a fresh read put the plan's decision in doubt (planned again next run).
    held_back: int = 0
    # AMIs whose stages a slice dropped whole (the policy, or its mode, changed since the plan, or the
    # slice went stale), or had no time for, or that another run of the same scheduled event had (their
    # stages skipped, no slice queued). The plan's counts above were not done for them by this run.
    not_run: int = 0


class RunReport(Plan):
    """A run's report (written to S3, printed by `apply --format json`): the plan, then what applying it
    did."""

    summary: RunSummary = RunSummary()
    results: list[ActionResult] = []
    rotations: list[rotator.RotationResult] = []
    share_results: list[sharer.ShareResult] = []
    copy_results: list[replication.CopyResult] = []
    copies_queued: int = 0
    # Copies the replication queue did not take (counted among the failures).
    copies_not_queued: int = 0
    slices_queued: int = 0
    # Usage reports written to the inbox (s3:// URLs), and those that could not be.
    usage_reports: list[str] = []
    usage_problems: list[str] = []
    # Earlier runs whose slices never all finished (their report and summary never come), each once.
    unfinished_runs: list[str] = []


class RunResult(BaseModel):
    """A plan and what applying it did (empty results in dry-run)."""

    plan: Plan
    results: list[ActionResult] = []
    rotations: list[rotator.RotationResult] = []
    replicated: ReplicateResult = ReplicateResult()
    # Slices of due stages queued to the slice worker (their results come with the run's last slice).
    slices_queued: int = 0
    usage_reports: list[str] = []
    usage_problems: list[str] = []
    unfinished_runs: list[str] = []
    # (region, run) of each earlier run `unfinished_runs` names: marked reported once the report that
    # names it is out (mark_unfinished_reported), so a run that dies before leaves them to the next.
    unfinished_keys: list[tuple[str, str]] = []
    # What the slices run in this process (an apply without a work queue) held back or had no time
    # for, counted as the slice worker's run record counts them.
    held_back: int = 0
    not_run: int = 0

    @property
    def failed(self) -> int:
        return (
            sum(1 for r in self.results if r.status == "failed")
            + sum(1 for r in self.rotations if r.status == "failed")
            + self.replicated.failed
            + len(self.usage_problems)
        )

    @property
    def exit_code(self) -> int:
        skipped = any(region.status == "skipped" for region in self.plan.regions)
        return 1 if self.failed or skipped else 0

    def report(self) -> RunReport:
        summary = self.plan.summary.model_dump()
        if self.results:
            summary["snapshots_deleted"] = sum(len(r.snapshots_deleted) for r in self.results)
        summary["tampered"] = len(self.plan.tampered)
        return RunReport.model_validate(
            {
                **dict(self.plan),
                "summary": RunSummary(
                    **summary, actions_failed=self.failed, held_back=self.held_back, not_run=self.not_run
                ),
                "results": self.results,
                "rotations": self.rotations,
                "share_results": self.replicated.share_results,
                "copy_results": self.replicated.copy_results,
                "copies_queued": self.replicated.queued,
                "copies_not_queued": self.replicated.not_queued,
                "slices_queued": self.slices_queued,
                "usage_reports": self.usage_reports,
                "usage_problems": self.usage_problems,
                "unfinished_runs": self.unfinished_runs,
            }
        )


def named_regions(values: Sequence[str] | None) -> list[str]:
    """The regions `--region a --region b` or `--region a,b` names, sorted, each once. An empty name
    (`--region "$REGION"` with REGION unset) is refused: taken as none, it would mean every region."""
    names = [r.strip() for value in values or () for r in value.split(",")]
    if any(not name for name in names):
        raise ValueError(f"--region {','.join(values or ())!r} names an empty region")
    return sorted(set(names))


def select_regions(policy: Policy, regions: Sequence[str] | None) -> list[str]:
    """The regions a run acts on: the ones asked for, else every managed region."""
    regions = named_regions(regions)
    if not regions:
        return policy.managed_regions
    unknown = sorted(set(regions) - set(policy.managed_regions))
    if unknown:
        raise ValueError(
            f"region {unknown[0]} is not managed by the policy (managed: {', '.join(policy.managed_regions)})"
        )
    return regions


def _check_ledgers(
    policy: Policy, regions: Sequence[str], clients_for: ClientsFor
) -> tuple[list[str], dict[str, BotoCoreError | ClientError]]:
    """The regions whose ledger table is absent, and those where it could not be checked (the error)."""
    absent: list[str] = []
    unchecked: dict[str, BotoCoreError | ClientError] = {}
    for region in regions:
        try:
            if not ledger.exists(clients_for(region), policy.ledger.table):
                absent.append(region)
        except (BotoCoreError, ClientError) as error:
            unchecked[region] = error
    return absent, unchecked


def _ledger_problems(
    table: str, absent: Sequence[str], unchecked: Mapping[str, BaseException]
) -> dict[str, str]:
    problems = {region: f"no ledger table {table} in {region}" for region in absent}
    for region, error in unchecked.items():
        problems[region] = f"cannot check the ledger table {table} in {region} ({error})"
    return problems


def require_ledgers(policy: Policy, regions: Sequence[str], clients_for: ClientsFor) -> None:
    """Refuse an applying run before it writes anything where a region has no ledger table or where it
    cannot be checked. The error keeps the two apart: a table to make is bad input, a failed check an
    AWS failure."""
    absent, unchecked = _check_ledgers(policy, regions, clients_for)
    if absent or unchecked:
        problems = _ledger_problems(policy.ledger.table, absent, unchecked)
        raise ledger.LedgerMissing(
            sorted(problems),
            policy.ledger.table,
            details=list(problems.values()),
            absent=absent,
            failures=list(unchecked.values()),
        )


def _require_scanned_ledgers(
    policy: Policy, regions: Sequence[str], loaded: Mapping[str, RegionInventory]
) -> None:
    """LedgerMissing where a region was read in full but its ledger's Scan found no table (a region that
    could not be read is skipped by the plan)."""
    missing = [r for r in regions if r in loaded and loaded[r].error is None and loaded[r].ledger is None]
    if missing:
        raise ledger.LedgerMissing(missing, policy.ledger.table)


def ledger_notes(policy: Policy, regions: Sequence[str], clients_for: ClientsFor) -> list[str]:
    """Plan notes for the regions without a ledger: a plan works there, an apply is refused."""
    absent, unchecked = _check_ledgers(policy, regions, clients_for)
    problems = _ledger_problems(policy.ledger.table, absent, unchecked)
    # A table that could not be checked may well be there: no advice to make it, only the error.
    return [
        f"{why}: plan only; `ami-janitor ledger create` makes it" if region in absent else f"{why}: plan only"
        for region, why in problems.items()
    ]


def create_ledgers(
    policy: Policy, regions: Sequence[str], clients_for: ClientsFor, writers: Sequence[str] | None
) -> list[ledger.CreateResult | str]:
    """`ami-janitor ledger create`: the table in each region (created or adopted). Writers default to
    the caller's principal. A region that fails gives its error message and the others go on."""
    results: list[ledger.CreateResult | str] = []
    for region in regions:
        clients = clients_for(region)
        try:
            named = list(writers) if writers else ledger.caller_writers(clients)
            results.append(ledger.create_table(clients, policy.ledger.table, named))
        except (BotoCoreError, ClientError) as error:
            results.append(f"{region}: {error}")
    return results


def build_plan(
    policy: Policy,
    regions: Sequence[str],
    clients_for: ClientsFor,
    now: datetime,
    progress: Progress = _quiet,
) -> tuple[Plan, dict[str, RegionInventory]]:
    """One pass: each region's inventory once (copy targets outside `regions`: their AMIs only), one
    plan, then the per-AMI details the plan asks for (DescribeImageReferences and launch permissions,
    so only for the AMIs it acts on or runs a clock on), and the plan settled on them."""
    # Planned on the view the first enforce run with a ledger has once it adopted older janitor tags.
    load = partial(inventory.load_inventory, now=now)
    read = _each_region(regions, lambda r: _read_region(load, r, clients_for, policy, progress))
    loaded = {inv.region: trust.adopted_view(inv, policy, now) for inv in read}
    targets = _each_region(
        sorted(_copy_targets(policy) - set(regions)),
        lambda r: _read_region(inventory.load_images, r, clients_for, policy, progress),
    )
    resolved = kms.resolve_keys(clients_for, keys.aliases_to_resolve(policy))
    plan = run_plan.plan_run(list(loaded.values()), policy, now, targets, resolved)
    needed = run_plan.needed_details(plan, loaded)

    def details(region: str) -> RegionInventory:
        progress(f"{region}: references and launch permissions of {len(needed[region]):,} AMIs")
        return inventory.load_details(clients_for(region), policy, loaded[region], needed[region])

    planned_on = dict(loaded)
    loaded.update((inv.region, inv) for inv in _each_region(sorted(needed), details))
    failed = {region for region in needed if loaded[region].error is not None}
    if failed:
        # A region whose details could not be read is skipped, like any failing source. The others are
        # planned on what they were planned on (each region's decisions are its own), then settled:
        # planned on their details instead, the caps would let through AMIs whose details nobody read.
        inputs = [loaded[region] if region in failed else planned_on[region] for region in planned_on]
        plan = run_plan.plan_run(inputs, policy, now, targets, resolved)
    return run_plan.settle(plan, loaded, policy), loaded


def _each_region(regions: Sequence[str], read: Callable[[str], RegionInventory]) -> list[RegionInventory]:
    """`read` of each region, in order, the regions side by side: each has its own endpoints and rates."""
    if len(regions) <= 1:
        return [read(region) for region in regions]
    with ThreadPoolExecutor(max_workers=min(len(regions), REGION_WORKERS)) as pool:
        return list(pool.map(read, regions))


def _copy_targets(policy: Policy) -> set[str]:
    return {target.region for family in policy.families for target in family.replicate}


def written_regions(policy: Policy, regions: Sequence[str]) -> list[str]:
    """The regions an applying run of `regions` writes in, each needing its ledger table: those, and
    the families' copy targets (CopyImage's copies are recorded in the target's ledger)."""
    return sorted(set(regions) | _copy_targets(policy))


def replicate(
    policy: Policy,
    regions: Sequence[str],
    clients_for: ClientsFor,
    now: datetime,
    *,
    apply: bool,
    families: Sequence[str] | None = None,
) -> ReplicateResult:
    """`ami-janitor replicate`: reconcile shares and copies of the sources in `regions` by hand
    (CopyImage is called in each target, one copy after another).

    Reads only DescribeImages and the ledgers (no references are needed to share or copy). Applying
    needs the ledger table of every region it reads (sources and targets): LedgerMissing before
    anything is read or written; a plan says which tables are missing."""
    if apply:
        require_ledgers(policy, written_regions(policy, regions), clients_for)
    images = {region: inventory.load_images(clients_for(region), policy) for region in regions}
    for region in sorted(_copy_targets(policy) - set(images)):
        images[region] = inventory.load_images(clients_for(region), policy)
    wanted = set(families) if families else {f.name for f in policy.families}
    own = [images[region] for region in regions]
    members = {
        (inv.region, image.image_id)
        for inv in own
        for image in inv.images
        for f in policy.families
        if f.name in wanted and f.match.matches(image.name, image.tags)
    }
    shares = [s for s in sharing.plan_shares(own, policy, now) if (s.region, s.image_id) in members]
    resolved = kms.resolve_keys(clients_for, keys.aliases_to_resolve(policy, wanted))
    copies, problems = replication.plan_replication(list(images.values()), policy, now, keys=resolved)
    copies, held = replication.within_copy_limit(
        [c for c in copies if c.source_region in regions and c.family in wanted], list(images.values())
    )
    problems.extend(held)
    problems.extend(
        f"no ledger table {policy.ledger.table} in {region}: plan only (its copies are not known as the "
        "janitor's); `ami-janitor ledger create` makes it"
        for region, inv in sorted(images.items())
        if inv.ledger is None and inv.error is None
    )
    skipped = [f"{inv.region}: {inv.error}" for inv in images.values() if inv.error is not None]
    result = ReplicateResult(shares=shares, copies=copies, problems=problems, skipped=sorted(skipped))
    return _apply_replication(result, own, policy, clients_for, None) if apply else result


def _apply_replication(
    result: ReplicateResult,
    own: Sequence[RegionInventory],
    policy: Policy,
    clients_for: ClientsFor,
    enqueue: Enqueue | None,
) -> ReplicateResult:
    """Shares, then copies: to `enqueue` when given (the deployed queue paces CopyImage), else started
    here one after another."""
    ledger_for = ledger.ledgers(clients_for, policy.ledger)
    result.share_results = sharer.apply_shares(clients_for, result.shares, own, ledger_for)
    if enqueue is not None:
        result.queued = enqueue(result.copies)
        result.not_queued = len(result.copies) - result.queued
        return result
    if not result.copies:
        return result
    from ami_janitor.aws import copier

    sources = {(inv.region, image.image_id): image for inv in own for image in inv.images}
    for copy in result.copies:
        source = sources[(copy.source_region, copy.source_image_id)]
        result.copy_results.append(
            copier.start_copy(clients_for, copy, source, policy, ledger_for=ledger_for)
        )
    return result


def run(
    policy: Policy,
    regions: Sequence[str],
    clients_for: ClientsFor,
    now: datetime,
    *,
    apply: bool,
    enqueue: Enqueue | None = None,
    work_queue: str | None = None,
    publish_reports: bool = False,
    progress: Progress = _quiet,
    event_id: str | None = None,
    invocation: str | None = None,
    confirmed: Plan | None = None,
) -> RunResult:
    """A scheduled run in one pass: one plan (retirement, Latest, shares, copies), then applied in a
    fixed order per region: rescues, Latest, candidate clocks; then shares and copies; then the due
    stages, in slices (core.slices): queued to `work_queue` when given (the slice worker takes them
    one after the other), else run here.

    The plan reads the inventory before shares change: a public AMI made private by this run is still
    kept as public once, and retires by the usual rules from the next run on.

    Applying needs each region's ledger table: without one, LedgerMissing is raised before anything
    is written. The inventory's Scan of the table says whether it is there, so no DescribeTable is
    asked first (the CLI asks, to refuse before it reads and asks the operator).

    With `publish_reports` (a scheduled run, dry-run or enforce) and `usage_reports` configured, each
    region read in full sends the account's usage report to the inbox, before anything else is done.

    `event_id` (the scheduled event's): its slices are queued once per region. Lambda runs a failed
    invocation again with the same event; where the first had queued its slices (and failed after,
    say writing its report), they may have acted already, and the second plan would pick the next
    AMIs: up to twice `max_actions_per_run` for one scheduled event. The second queues none.
    `invocation`: Lambda's request id, which its retries keep (a retry takes over the claim of its own
    earlier attempt that queued nothing).

    `confirmed`: the plan an operator was shown and agreed to (the CLI's `apply` in a terminal). The
    plan is made again from a fresh read; where it would write anything that one did not show, nothing
    is written (PlanChanged). What it no longer asks for (an AMI used again since) is not done.
    """
    plan, loaded = build_plan(policy, regions, clients_for, now, progress)
    if apply:
        _require_scanned_ledgers(policy, regions, loaded)
    if apply and confirmed is not None:
        unasked = sorted(_writes(plan) - _writes(confirmed))
        if unasked:
            raise PlanChanged(unasked)
    replicated = ReplicateResult(shares=plan.shares, copies=plan.copies)
    read = [loaded[r] for r in regions if r in loaded]
    usage = publish_usage(policy, read, clients_for, now) if publish_reports else {}
    if not apply:
        return RunResult(plan=plan, replicated=replicated, **usage)
    progress(f"applying the plan in {', '.join(r.region for r in plan.regions if r.status == 'ok')}")
    rotations: list[rotator.RotationResult] = []

    def write_latest(region: str, failed_rescues: set[str]) -> set[str]:
        changes = [c for c in plan.latest if c.region == region]
        parameters = loaded[region].parameters
        written = rotator.write_changes(
            clients_for(region), policy, changes, now, skip=failed_rescues, follow=confirmed is None
        )
        rotations.extend(written)
        # Where Latest did not move as planned (a failure, the group changed since the plan, or changed
        # again while it was written), its old holders, the AMI its parameter names (which launches
        # read; `from` is the tag's holder where there is one) and the AMI it went to instead stay
        # kept this run.
        stuck = [(c, r) for c, r in zip(changes, written, strict=True) if r.status != "ok" or r.to != c.to]
        return {
            i
            for c, r in stuck
            for i in (*c.untag, c.from_, parameters.get(c.ssm_parameter) if c.ssm_parameter else None, r.to)
            if i
        }

    ledgers = ledger_for(policy, clients_for)
    cut: dict[str, list[slices.WorkSlice]] = {}
    counted = {"held_back": 0, "not_run": 0}  # by the slices run here

    def run_due(region: str, due: list[Decision]) -> list[ActionResult]:
        shared, expanded = _consumers(loaded[region])
        work = cut_due(plan, policy, region, due, now, consumers=shared, expanded=expanded)
        if work_queue is not None:
            cut[region] = work
            return []
        if not work:
            return []
        from ami_janitor.aws import slicer

        results: list[ActionResult] = []
        for part in work:
            progress(f"{region}: slice {part.index + 1} of {part.count} ({len(part.items):,} AMIs)")
            done = slicer.run_here(clients_for(region), ledgers(region), policy, part, now)
            results += done.results
            counts = done.counts()
            counted["held_back"] += counts["held_back"]
            counted["not_run"] += counts["not_run"]
        return results

    applied: ApplyResult = executor.apply_plan(
        plan,
        loaded,
        clients_for,
        now,
        ledger_for=ledgers,
        rescue_grants=lambda image: sharing.rescue_grants(policy, image),
        after_rescues=write_latest,
        run_due=run_due,
    )
    own = [loaded[r.region] for r in plan.regions if r.status == "ok" and r.region in loaded]
    replicated = _apply_replication(replicated, own, policy, clients_for, enqueue)
    result = RunResult(
        plan=plan, results=applied.results, rotations=rotations, replicated=replicated, **usage, **counted
    )
    for region, work in sorted(cut.items()):
        result = queue_slices(
            result,
            region,
            work,
            policy,
            clients_for(region),
            work_queue or "",
            now,
            event_id=event_id,
            invocation=invocation,
        )
    if work_queue is not None:
        keys, lines = unfinished_runs(own, now)
        result = result.model_copy(update={"unfinished_runs": lines, "unfinished_keys": keys})
    return result


class PlanChanged(RuntimeError):
    """The plan, made again before writing, writes what the plan the operator agreed to did not show."""

    def __init__(self, unasked: Sequence[str]) -> None:
        self.unasked = list(unasked)
        shown = "; ".join(self.unasked[:5]) + (
            f"; and {len(self.unasked) - 5} more" if len(self.unasked) > 5 else ""
        )
        super().__init__(f"the plan changed since it was shown ({shown}): nothing was written")


def _writes(plan: Plan) -> set[str]:
    """Each write a plan asks for, as one line: stages, candidate clocks and rescues, Latest changes,
    shares, copies, and the snapshots of interrupted deregistrations it finishes."""
    return {
        *(f"{d.action} {d.image_id} in {d.region}" for d in plan.decisions if d.action != "keep"),
        *(
            f"delete snapshot {snapshot} (its AMI's deregistration was interrupted)"
            for snapshot in plan.unfinished_snapshots
        ),
        *(
            f"Latest of {c.family} ({c.architecture}) in {c.region} to {c.to}"
            + (f", untagging {', '.join(c.untag)}" if c.untag else "")
            for c in plan.latest
        ),
        *(
            f"share {s.image_id} in {s.region} with {', '.join(s.add) or 'none'}, revoking {', '.join(s.remove) or 'none'}"
            for s in plan.shares
        ),
        *(
            f"copy {c.source_image_id} ({c.source_region}) to {c.region}, generation {c.generation}"
            + (f", key {c.kms_key_arn}" if c.kms_key_arn else "")
            for c in plan.copies
        ),
    }


def unfinished_runs(
    inventories: Sequence[RegionInventory], now: datetime
) -> tuple[list[tuple[str, str]], list[str]]:
    """The earlier runs of these regions (from the ledger's Scan) whose slices were not all counted
    though a queued slice is dropped after slices.MAX_SLICE_AGE (a slice of theirs ended in the work
    queue's dead-letter queue, and their report and summary never come), or whose summary nobody sent
    (their last slice could not: it ended there too). Their (region, run) keys and
    a line for each; the Scan skips those a run marked reported (mark_unfinished_reported)."""
    keys: list[tuple[str, str]] = []
    lines: list[str] = []
    for region in inventories:
        for run in region.ledger.unfinished_runs if region.ledger is not None else ():
            if run.started is None or now - run.started <= slices.MAX_SLICE_AGE:
                continue
            keys.append((region.region, run.run))
            if run.done >= run.slices:
                lines.append(
                    f"{region.region}: run {run.run}: all its {run.slices} slices finished, but its report "
                    "and summary could not be sent: see the work queue's dead-letter queue (its last "
                    "slice) and the slices' results in the report bucket"
                )
                continue
            lines.append(
                f"{region.region}: run {run.run}: {run.slices - run.done} of its {run.slices} slices "
                "never finished, so its report and summary never came: see the work queue's dead-letter "
                "queue (the next run plans those AMIs again)"
            )
    return keys, lines


def mark_unfinished_reported(
    policy: Policy, result: RunResult, clients_for: ClientsFor, now: datetime
) -> None:
    """Mark the earlier runs `result` names unfinished as reported, after the report that names them
    is out: a run that dies before leaves them to the next run, and one that cannot mark them now
    too (said twice then, rather than never)."""
    if not result.unfinished_keys:
        return
    from ami_janitor.aws.runs import RunRecords

    for region, run in result.unfinished_keys:
        try:
            RunRecords(clients_for(region).dynamodb, policy.ledger.table).mark_unfinished_reported(
                region, run, now
            )
        except (BotoCoreError, ClientError):
            continue


def _consumers(region: RegionInventory) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """AMI id -> the accounts it is shared with whose usage reports the plan read (a slice reads them
    again before it acts), and AMI id -> the organization and OU grants the plan expanded into them
    (any other the slice finds was granted since)."""
    view = region.usage
    if view is None:
        return {}, {}
    from ami_janitor.core.usage import consumers, expanded_grants

    accounts, expanded = {}, {}
    for image in region.images:
        if found := sorted(consumers(image, view)[0]):
            accounts[image.image_id] = found
        if grants := expanded_grants(image, view):
            expanded[image.image_id] = grants
    return accounts, expanded


def publish_usage(
    policy: Policy, inventories: Sequence[RegionInventory], clients_for: ClientsFor, now: datetime
) -> dict[str, list[str]]:
    """This account's usage report of each region read in full, to the inbox: {'usage_reports': the
    s3:// URLs written, 'usage_problems': what could not be, or was sent incomplete}. A region whose
    inventory is partial sends none: its last report grows stale, and the owners keep what they share
    (fail safe). One whose Image Builder recipes could not be read sends its report saying so, which
    keeps too (and is never taken for an account that sends none)."""
    settings = policy.usage_reports
    written: list[str] = []
    problems: list[str] = []
    if settings is None or not inventories:
        return {}
    from ami_janitor.aws import usage

    try:
        account = usage.own_account(clients_for(inventories[0].region))
    except (BotoCoreError, ClientError) as error:
        return {"usage_problems": [f"usage report: sts:GetCallerIdentity: {error_text(error)}"]}
    for region in inventories:
        if region.error is not None:
            continue  # skipped, and said so: its last report grows stale
        clients = clients_for(region.region)
        recipes, unread = usage.recipe_uses(clients, account)
        try:
            key = usage.publish_report(clients, settings, account, region, now, recipes, unread)
        except (BotoCoreError, ClientError) as error:
            problem = usage.inbox_error(settings, error)
            problems.append(f"{region.region}: usage report not sent: s3:PutObject: {problem}")
            continue
        written.append(f"s3://{settings.bucket}/{key}")
        # Sent, saying what it could not read: its owners keep what they share with this account.
        problems += [
            f"{region.region}: usage report incomplete (owners keep what they share): {u}" for u in unread
        ]
    return {"usage_reports": written, "usage_problems": problems}


def cut_due(
    plan: Plan,
    policy: Policy,
    region: str,
    due: Sequence[Decision],
    now: datetime,
    budget_seconds: float | None = None,
    consumers: Mapping[str, Sequence[str]] | None = None,
    expanded: Mapping[str, Sequence[str]] | None = None,
) -> list[slices.WorkSlice]:
    """A region's due stages (nothing blocks them) in slices, as a run cuts them: each within
    SLICE_BUDGET_SECONDS (or `budget_seconds`) of calls paced at the stages' refill."""
    return slices.cut(
        due,
        run=plan.generated_at,
        region=region,
        planned_at=now,
        policy=slices.policy_digest(policy),
        budget_seconds=SLICE_BUDGET_SECONDS if budget_seconds is None else budget_seconds,
        refill=STAGE_REFILL,
        consumers=consumers,
        expanded=expanded,
    )


def queue_slices(
    result: RunResult,
    region: str,
    work: list[slices.WorkSlice],
    policy: Policy,
    clients: RegionClients,
    queue_url: str,
    now: datetime,
    *,
    event_id: str | None = None,
    invocation: str | None = None,
) -> RunResult:
    """Record the run's slices and queue them; where that fails, their stages fail (nothing was done
    to them: the next run plans them again). A scheduled event whose slices were queued before (a
    retried invocation) queues none: its stages are skipped, saying why."""
    report = result.report()
    counts = {
        "snapshots_deleted": report.summary.snapshots_deleted if result.results else 0,
        "actions_failed": report.summary.actions_failed,
        "held_back": 0,
        "not_run": 0,
    }
    summary = {k: v for k, v in report.summary.model_dump().items() if isinstance(v, int)}
    from ami_janitor.aws import slicer

    try:
        queued = slicer.queue_run(
            clients,
            policy,
            queue_url,
            work,
            plan_summary=summary,
            counts=counts,
            now=now,
            event_id=event_id,
            invocation=invocation,
        )
    except slicer.RunRecordedBefore as duplicate:
        skipped = [
            ActionResult(
                region=region, image_id=item.image_id, action=stage, status="skipped", detail=str(duplicate)
            )
            for part in work
            for item in part.items
            for stage in item.stages
        ]
        # Nothing was done to them by this run: its summary counts them as not run (the plan's counts
        # include them), as a dropped slice's, not as retired with nothing amiss.
        not_run = len({item.image_id for part in work for item in part.items})
        return result.model_copy(
            update={"results": [*result.results, *skipped], "not_run": result.not_run + not_run}
        )
    except (BotoCoreError, ClientError, RuntimeError) as error:
        # The slices SQS took run all the same (their results reach the slice's part of the report):
        # only the others' stages fail here. The run's record waits for every slice it recorded, so
        # the next run names this one as unfinished.
        taken = error.queued if isinstance(error, slicer.SlicesNotQueued) else frozenset()
        failed = [
            ActionResult(
                region=region,
                image_id=item.image_id,
                action=stage,
                status="failed",
                error=f"slice not queued: {error_text(error)}",
            )
            for part in work
            if part.index not in taken
            for item in part.items
            for stage in item.stages
        ]
        return result.model_copy(
            update={"results": [*result.results, *failed], "slices_queued": result.slices_queued + len(taken)}
        )
    return result.model_copy(update={"slices_queued": result.slices_queued + queued})


def handle_ami_event(
    image_id: str,
    state: AmiState,
    clients: RegionClients,
    policy: Policy,
    now: datetime,
    *,
    enqueue: Enqueue | None = None,
    clients_for: ClientsFor | None = None,
    sent: datetime | None = None,
) -> AmiEventOutcome:
    """One EC2 AMI State Change event (`sent`: its time): rotate; a new source is shared and queued for
    its copies at once (the scheduled run reconciles anything an event missed). `clients_for`: the
    target regions' clients (the aliases of their keys are resolved there)."""
    read: list[RegionInventory] = []

    def load(region_clients: RegionClients, loaded_policy: Policy) -> RegionInventory:
        read.append(inventory.load_images(region_clients, loaded_policy))
        return read[-1]

    outcome = rotator.handle_state_change(image_id, state, clients, policy, now, load=load, sent=sent)
    if policy.mode == "paused" or state not in ("available", "failed"):
        return outcome
    own = _event_image(image_id, read[-1] if read else None, clients, policy)
    if own is None:
        return outcome
    image = own.images[0]
    if state == "failed":
        retry = replication.handle_failed_replica(image, policy)
        # The retry is started by the source region's next scheduled run (it records the next
        # generation on the source, in that region).
        return outcome.model_copy(update={"copy_retry": retry.reason})
    families = [f for f in policy.families if f.match.matches(image.name, image.tags)]
    if len(families) != 1 or image.state != "available":
        return outcome
    family = families[0]
    if (
        trust.open_item(image) is None
        and not family.match.by_tags_alone  # share_for changes no launch permission there
        and (sharing.desired_grants(family) or sharing.recorded_grants(image))
    ):
        # This AMI's launch permissions, read once: EnableImage restores none of those DisableImage
        # removed, while the ledger still records the janitor's grants as made (the plan alone would
        # never grant them again).
        permissions = inventory.read_launch_permissions(clients.ec2, image.image_id)
        image = image.model_copy(update={"launch_permissions": permissions})
        own = own._replace(images=(image,))
    share = sharing.share_for(image, family)
    copies, skipped = _new_source_copies(image, family, policy, clients, clients_for)
    if copies:
        region_now = read[-1] if read and read[-1].error is None else inventory.load_images(clients, policy)
        older = replication.not_kept_by_its_group(image, region_now, policy, now)
        if older is not None:
            copies, skipped = [], [*skipped, older]
    outcome = outcome.model_copy(update={"copies_skipped": skipped})
    if policy.mode != "enforce":
        return outcome.model_copy(update={"would_share": share, "would_copy": len(copies)})
    shared = (
        sharer.apply_shares(
            lambda _region: clients, [share], [own], ledger.ledgers(lambda _region: clients, policy.ledger)
        )
        if share
        else []
    )
    queued = enqueue(copies) if enqueue is not None and copies else 0
    update: dict[str, Any] = {"shared": shared, "copies_queued": queued}
    if enqueue is not None and queued < len(copies):
        update["copies_not_queued"] = len(copies) - queued
    return outcome.model_copy(update=update)


def _event_image(
    image_id: str, region_read: RegionInventory | None, clients: RegionClients, policy: Policy
) -> RegionInventory | None:
    """The event's AMI with its ledger item (a replica is one the ledger records; no table, nothing is
    shared), as a region of that one AMI; None where the region has no such AMI. Taken from the region's
    read the rotation has just made (the same DescribeImages, and the whole ledger) where that lists it;
    else read by id (a failed AMI's event reads no region; a listing may lag the AMI's id)."""
    if region_read is not None and region_read.error is None:
        listed = next((i for i in region_read.images if i.image_id == image_id), None)
        if listed is not None:
            return RegionInventory(region=clients.region, images=(listed,), ledger=region_read.ledger)
    described = inventory.describe_image(clients, image_id)
    if described is None:
        return None
    view = inventory.read_ledger_items(clients, policy.ledger.table, [image_id])
    return with_ledger(RegionInventory(region=clients.region, images=(described,), ledger=view))


def _copy_of_own(image: Image, clients: RegionClients, clients_for: ClientsFor | None) -> str | None:
    """Why a copy (EC2 names its source) queues no copy of its own: its source is one of the account's
    AMIs (copied by hand, or by a run that stopped before recording it: copied onward, it would make
    copies of copies), or that cannot be told now (the scheduled run decides). None for no copy, and
    for one copied in from another account (a golden image shared with it), a source like any build."""
    if image.copied_from is None:
        return None
    region = image.copied_from_region or image.region
    factory = clients_for or _with_own(clients)
    try:
        source = inventory.describe_image(factory(region), image.copied_from)
    except (BotoCoreError, ClientError) as error:
        return f"{image.image_id} is a copy of {image.copied_from} ({region}), which cannot be read now ({error_text(error)}): the scheduled run decides its copies"
    if source is None:
        return None
    return f"{image.image_id} is a copy of {image.copied_from} ({region}), one of this account's AMIs: never copied onward"


def _new_source_copies(
    image: Image, family: Family, policy: Policy, clients: RegionClients, clients_for: ClientsFor | None
) -> tuple[list[Copy], list[str]]:
    """The copies a new source needs, with the aliases of their keys resolved and checked against the
    key ARNs of the copies its region's ledger records (read only where a target names an alias). None
    for a source outside the policy's regions (a target region's own AMI): the worker refuses those."""
    if image.region not in policy.regions:
        return [], [f"{image.image_id}: {image.region} is not one of the policy's regions: no copies"]
    copy_of_own = _copy_of_own(image, clients, clients_for)
    if copy_of_own is not None:
        return [], [copy_of_own]
    aliases = keys.aliases_to_resolve(policy, [family.name])
    if not aliases:
        return replication.new_source_copies(image, family)
    factory = clients_for or _with_own(clients)
    try:
        view = ledger.Ledger(clients, policy.ledger.table).read_all()
    except (BotoCoreError, ClientError) as error:
        # Without the records a redirected alias would go unnoticed: those targets wait for the scheduled run.
        unread = ResolvedKey(problem=f"the ledger of {clients.region} cannot be read ({error})")
        return replication.new_source_copies(image, family, dict.fromkeys(aliases, unread))
    last = keys.last_keys(keys.copy_records(view.items.values()))
    # A target this region's ledger records no copy of the family to is not resolved: the last copy may
    # have been made from another region, with the key the alias named before it moved. The scheduled
    # run, which reads every region's records, judges it.
    recorded = [(region, alias) for region, alias in aliases if (family.name, region) in last]
    resolved = dict(kms.resolve_keys(factory, recorded)) if recorded else {}
    for region, alias in aliases:
        resolved.setdefault(
            (region, alias),
            ResolvedKey(
                problem=f"no copy of the family to {region} is recorded in {clients.region}'s ledger: the "
                "scheduled run, which reads every region's records, makes it"
            ),
        )
    return replication.new_source_copies(image, family, resolved, last)


def _with_own(clients: RegionClients) -> ClientsFor:
    """Clients per region that reuse `clients` for its own region."""
    factory = ClientFactory()
    return lambda region: clients if region == clients.region else factory(region)


def ledger_for(policy: Policy, clients_for: ClientsFor) -> executor.LedgerFor:
    """The ledger table of each region, as the policy names it."""

    def region_ledger(region: str) -> ledger.Ledger:
        return ledger.Ledger(
            clients_for(region), policy.ledger.table, retention_days=policy.ledger.retention_days
        )

    return region_ledger


def rescue(
    policy: Policy, image_id: str, regions: Sequence[str], clients_for: ClientsFor, now: datetime
) -> list[ActionResult]:
    """`ami-janitor rescue AMI_ID`: undo every stage on one AMI, wherever it is."""
    for region in regions:
        clients = clients_for(region)
        image = inventory.describe_image(clients, image_id)
        if image is None:
            continue
        # What to undo is what the ledger recorded: without the table there is nothing to go by.
        require_ledgers(policy, [region], clients_for)
        return executor.rescue_image(
            clients,
            ledger_for(policy, clients_for)(region),
            image,
            now,
            shared=sharing.rescue_grants(policy, image),
        )
    raise LookupError(f"{image_id} was not found in {', '.join(regions)}")


class BakeOutcome(Outcome):
    """What the scheduled bake of a family did. Only the keys that apply are in its JSON."""

    # Off the scheduled run's path: its validator is built when first used, not at each cold start.
    model_config = ConfigDict(defer_build=True)

    mode: Mode
    region: str | None = None
    family: str
    # not-here: the family's bake runs in other regions (bake.regions), where its build instance lives.
    outcome: Literal["would-bake", "baked", "not-here"] | None = None
    instance_id: str | None = None
    image_id: str | None = None
    name: str | None = None
    state: str | None = None
    warnings: list[str] = []
    # The CreateImage request a dry run built without sending it: logged, not answered.
    create_image: dict[str, Any] | None = Field(None, exclude=True)


def scheduled_bake(policy: Policy, family: Family, clients: RegionClients, now: datetime) -> BakeOutcome:
    """The scheduled bake of a family in the policy's mode: paused does nothing, dry-run builds the
    CreateImage request (so checks it) without sending it, enforce starts the image and does not wait
    for it (its `available` event drives rotation and replication)."""
    if policy.mode == "paused":
        return BakeOutcome(mode=policy.mode, family=family.name)
    if clients.region not in policy.bake_regions(family):
        return BakeOutcome(mode=policy.mode, region=clients.region, family=family.name, outcome="not-here")
    from ami_janitor.aws import baker
    from ami_janitor.core import baking

    instance_id = baker.find_bake_instance(clients, family)
    no_reboot = family.bake is not None and family.bake.no_reboot
    if policy.mode == "dry-run":
        request = baking.bake_request(family, instance_id, now, no_reboot)
        return BakeOutcome(
            mode=policy.mode,
            region=clients.region,
            family=family.name,
            outcome="would-bake",
            instance_id=instance_id,
            name=request["Name"],
            create_image=request,
        )
    # Every bake is recorded on its AMI's ledger item: no table, no bake.
    require_ledgers(policy, [clients.region], lambda _region: clients)
    result = baker.bake(
        clients, family, instance_id, now, no_reboot=no_reboot, wait=False, ledger_table=policy.ledger.table
    )
    return BakeOutcome(mode=policy.mode, region=clients.region, outcome="baked", **result.model_dump())


def start_requested_copy(request: Copy, policy: Policy, clients_for: ClientsFor) -> replication.CopyResult:
    """One queued copy request: rebuilt from the policy and the source as EC2 describes it now, then
    started. The request only says which copy; what is copied and with which key is the policy's.
    RefusedCopy when the policy would not make it; a source not found (gone since, or never this
    account's) is a skipped copy; LedgerMissing
    where the source's or the target's region has no ledger table (no copy is made unrecorded)."""
    # Checked before any AWS call: no client is made for a region the policy does not name.
    target = replication.allowed_target(request, policy)
    require_ledgers(policy, sorted({request.source_region, request.region}), clients_for)
    ledger_for = ledger.ledgers(clients_for, policy.ledger)
    described = inventory.describe_image(clients_for(request.source_region), request.source_image_id)
    if described is None:
        # Deregistered since the request was queued, or never this account's (a forged request): retrying
        # cannot help.
        return replication.CopyResult.of(
            request,
            "skipped",
            detail=(
                f"source {request.source_image_id} is not one of this account's AMIs in {request.source_region}: "
                "deregistered since the request was queued, or never one of them"
            ),
        )
    items = ledger_for(request.source_region).read_items([described.image_id])
    source = described.model_copy(update={"ledger": items.get(described.image_id)})
    from ami_janitor.aws import copier

    existing = copier.find_copies(
        clients_for(request.region).ec2, ledger_for(request.region), source.image_id, request.region
    )
    # An alias is resolved again here: the key must still be the one the copy was planned with.
    key = (
        kms.resolve_key(clients_for(request.region), target.kms_key_id)
        if target.kms_key_id is not None and target.kms_alias is not None
        else None
    )
    if key is not None and key.passing:
        # KMS failed for a while: no refusal of the request (the policy may well make it), a copy that
        # failed for now, tried again with the message.
        return replication.CopyResult.of(request, "failed", error=f"{target.kms_key_id}: {key.problem}")
    copy = replication.rebuild_copy(request, source, policy, existing, key)
    return copier.start_copy(clients_for, copy, source, policy, existing, ledger_for=ledger_for)


def work_slice(
    policy: Policy,
    work: slices.WorkSlice,
    clients: RegionClients,
    now: datetime,
    *,
    keep: "Callable[[SliceOutcome], None] | None" = None,
    out_of_time: Callable[[], bool] | None = None,
    delivery: int = 1,
    side_by_side: executor.SideBySide | None = None,
) -> "SliceOutcome":
    """One queued slice (`delivery`: SQS's receive count of its message): dropped (each stage skipped, with why) when the policy is no longer the plan's
    or the slice is stale, else run (slicer.run_slice, which reads its AMIs again); `keep` is given the
    results before the run's record counts the slice (the report keeps them); then counted once. A
    slice the record counted already (delivered again) is not run again: it only sends the summary,
    where nobody sent it. Raises SourceFailed when its AMIs cannot be read: SQS delivers the slice again; and before anything,
    SliceNotRecorded (or RunNotStarted) for a slice its run did not record: SQS delivers it again, then
    parks it in the dead-letter queue, which alarms. `side_by_side`: how its AMIs in flight run side
    by side (executor.apply_stages; a thread pool by default)."""
    from ami_janitor.aws import runs, slicer

    if work.region != clients.region:
        raise ValueError(f"a slice of region {work.region} reached the worker of {clients.region}")
    records = runs.RunRecords(
        clients.dynamodb, policy.ledger.table, retention_days=policy.ledger.retention_days
    )
    recorded = records.check_slice(work.region, work.run, work.index, slices.slice_digest(work))
    outcome = slicer.SliceOutcome(region=work.region, run=work.run, index=work.index, count=work.count)
    if work.index in recorded.done:
        # Delivered again after it was counted (its summary could not be sent): its results are in the
        # report already, and its AMIs were acted on. Nothing is read, done or written again.
        outcome.progress = recorded
        outcome.last = recorded.complete and records.claim_summary(
            work.region, work.run, now, index=work.index, delivery=delivery
        )
        return outcome
    dropped = None
    if policy.mode != "enforce":
        # Switched to dry-run (or paused) after the enforce run queued it: its stages wait for an
        # enforce run, which plans them again from the ledger's clocks.
        dropped = f"the policy's mode is {policy.mode} since the plan: nothing is done; the next enforce run plans again"
    elif work.policy != slices.policy_digest(policy):
        dropped = "the policy changed since the plan: the next run plans again"
    else:
        dropped = slices.stale(work, now)
    not_run: frozenset[str] = frozenset()
    if dropped is not None:
        outcome.dropped = dropped
        not_run = frozenset(i.image_id for i in work.items)
        outcome.results = [
            ActionResult(region=work.region, image_id=i.image_id, action=s, status="skipped", detail=dropped)
            for i in work.items
            for s in i.stages
        ]
    else:
        ledgers = ledger.ledgers(lambda _: clients, policy.ledger)
        done = slicer.run_slice(
            clients,
            ledgers(clients.region),
            policy,
            work,
            now,
            out_of_time=out_of_time,
            workers=slicer.SLICE_WORKERS,
            side_by_side=side_by_side,
        )
        outcome.results, outcome.held, not_run = done.results, done.held, done.not_run
    if keep is not None:
        keep(outcome)
    counts = slicer.SliceResult(results=outcome.results, held=outcome.held, not_run=not_run).counts()
    progress = records.finish_slice(work.region, work.run, work.index, counts)
    outcome.progress = progress or records.read(work.region, work.run)
    outcome.last = outcome.progress.complete and records.claim_summary(
        work.region, work.run, now, index=work.index, delivery=delivery
    )
    return outcome


def send_run_summary(
    policy: Policy, clients: RegionClients, outcome: "SliceOutcome", send: Callable[[], None]
) -> None:
    """`send` the run's report and summary (the caller claimed them: `outcome.last`), then confirm them
    in the run's record; where sending fails, the claim is given back before the error goes on, so the
    slice's next delivery sends them. (A confirmation that fails leaves the run to be named by the next
    run: a summary may come twice, never not at all.)"""
    from ami_janitor.aws.runs import RunRecords

    records = RunRecords(clients.dynamodb, policy.ledger.table)
    try:
        send()
    except Exception:
        records.release_summary(outcome.region, outcome.run)
        raise
    try:
        records.confirm_summary(outcome.region, outcome.run, datetime.now(UTC).replace(microsecond=0))
    except (BotoCoreError, ClientError):
        return


def final_report(first: RunReport, outcomes: "Sequence[SliceOutcome]", progress: "RunProgress") -> RunReport:
    """The run's one report: what the scheduled run did, then every slice's results; the counts are
    the run record's (the scheduled run's own, plus each slice's once)."""
    totals = progress.counts
    summary = first.summary.model_copy(
        update={
            "snapshots_deleted": totals.get("snapshots_deleted", 0),
            "actions_failed": totals.get("actions_failed", 0),
            "held_back": totals.get("held_back", 0),
            "not_run": totals.get("not_run", 0),
        }
    )
    ordered = sorted(outcomes, key=lambda o: o.index)
    results = [*first.results, *(r for o in ordered for r in o.results)]
    return first.model_copy(update={"summary": summary, "results": results})


def recorded_report(region: str, run: str, progress: "RunProgress") -> RunReport:
    """The run's summary from its record alone (no report bucket to read the details from)."""
    summary = RunSummary.model_validate({**progress.plan_summary, **progress.counts})
    return RunReport(
        mode="enforce",
        generated_at=run,
        regions=[RegionStatus(region=region, status="ok")],
        decisions=[],
        summary=summary,
    )
