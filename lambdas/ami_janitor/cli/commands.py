"""The commands of `ami-janitor`. Exit codes: 0 done; 1 an action failed or a region was skipped;
2 bad input or usage; 3 declined at the prompt (Ctrl-C there too): nothing written; 130 interrupted
elsewhere."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from datetime import UTC, datetime
from types import ModuleType
from typing import TextIO

from botocore.exceptions import ProfileNotFound
from botocore.session import Session

from ami_janitor import engine
from ami_janitor.aws import rotator
from ami_janitor.aws.clients import ClientFactory, assumed_session, janitor_session, unknown_regions_message
from ami_janitor.aws.inventory import load_images
from ami_janitor.aws.ledger import LedgerMissing
from ami_janitor.cli import render
from ami_janitor.core import rotation
from ami_janitor.core.model import Plan
from ami_janitor.core.policy import Family, Policy, PolicyError, check_region, load_policy

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DECLINED = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped


class UsageError(Exception):
    """Bad input: exit 2 with the message."""


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _session(args: argparse.Namespace) -> Session:
    """The command's session (--profile), made once: the policy's region check and the clients then
    share what the SDK loads for both (its endpoint data, parsed once instead of twice)."""
    session: Session | None = getattr(args, "_session", None)
    if session is None:
        session = janitor_session(args.profile)
        args._session = session
    return session


def _policy(args: argparse.Namespace) -> Policy:
    policy = load_policy(args.config)
    try:
        session: Session | None = _session(args)
    except ProfileNotFound:
        session = None  # reported where the clients are made, after the policy's own errors
    problem = unknown_regions_message(policy.managed_regions, args.config or "the policy", session)
    if problem:
        raise PolicyError(problem)
    return policy


def _factory(args: argparse.Namespace) -> ClientFactory:
    session = _session(args)
    if getattr(args, "role_arn", None):
        session = assumed_session(session, args.role_arn)
    return ClientFactory(session)


def _ledger_refusal(error: LedgerMissing) -> Exception:
    """What ends a command refused for its ledger tables: a table that is not there is the user's to
    make (exit 2, naming `ledger create`); a check that failed only is an AWS failure (exit 1, its own
    line), which making a table would not mend."""
    if error.failures and not error.absent:
        return error.failures[0]
    return UsageError(str(error))


def _progress(line: str) -> None:
    """Progress for a person at a terminal; pipes, files and JSON consumers never see it."""
    if sys.stderr.isatty():
        sys.stderr.write(f"... {line}\n")
        sys.stderr.flush()


def _regions(policy: Policy, args: argparse.Namespace) -> list[str]:
    try:
        return engine.select_regions(policy, args.region)
    except ValueError as error:
        raise UsageError(str(error)) from None


def cmd_plan(args: argparse.Namespace, out: TextIO) -> int:
    policy = _policy(args)
    regions = _regions(policy, args)
    factory = _factory(args)
    result = engine.run(policy, regions, factory, _now(), apply=False, progress=_progress)
    notes = engine.ledger_notes(policy, engine.written_regions(policy, regions), factory)
    if notes:
        result = result.model_copy(
            update={"plan": result.plan.model_copy(update={"notes": [*result.plan.notes, *notes]})}
        )
    if args.format == "json":
        out.write(result.plan.to_json())
    else:
        render.print_plan(result.plan, out)
    return result.exit_code


def _confirm(plan: Plan, out: TextIO) -> bool:
    acting = sum(1 for d in plan.decisions if d.action not in ("keep", "wait"))
    # Everything apply writes is counted: shares and copies too, not only stages and Latest.
    out.write(
        f"Apply {acting} actions, {len(plan.latest)} Latest changes, {len(plan.shares)} shares and "
        f"{len(plan.copies)} copies? [y/N] "
    )
    out.flush()
    try:
        answer = sys.stdin.readline().strip().lower()
    except KeyboardInterrupt:  # Ctrl-C at the question is a no: nothing was written yet
        out.write("\n")
        return False
    return answer in ("y", "yes")


def cmd_apply(args: argparse.Namespace, out: TextIO) -> int:
    policy = _policy(args)
    if policy.mode != "enforce":
        raise UsageError(f"the policy's mode is {policy.mode}: apply writes only with mode: enforce")
    regions = _regions(policy, args)
    factory = _factory(args)
    if not args.yes and not sys.stdin.isatty():
        raise UsageError("apply asks before it writes: pass --yes when not run in a terminal")
    try:
        # Before anything is written or asked, in every region the run writes in (copy targets too).
        engine.require_ledgers(policy, engine.written_regions(policy, regions), factory)
    except LedgerMissing as error:
        raise _ledger_refusal(error) from None
    now = _now()
    confirmed = None
    if not args.yes:
        # With --format json, stdout holds the report alone: the preview and the question go to stderr.
        asking = sys.stderr if args.format == "json" else out
        preview = engine.run(policy, regions, factory, now, apply=False, progress=_progress)
        render.print_plan(preview.plan, asking)
        if not _confirm(preview.plan, asking):
            asking.write("declined: nothing was changed\n")
            return EXIT_DECLINED
        confirmed = preview.plan
        # The apply judges at the time it writes, however long the answer took: a usage report gone
        # stale since the question keeps its AMIs; a stage come due since is refused (PlanChanged).
        now = _now()
    try:
        result = engine.run(
            policy,
            regions,
            factory,
            now,
            apply=True,
            publish_reports=True,
            progress=_progress,
            confirmed=confirmed,
        )
    except engine.PlanChanged as changed:
        sys.stderr.write(f"{changed}; run apply again to see the plan as it is now\n")
        return EXIT_DECLINED
    except LedgerMissing as error:
        # Gone since the check above (its Scan found no table): refused before anything is written.
        raise _ledger_refusal(error) from None
    if args.format == "json":
        render.emit_json(result.report().model_dump(mode="json"), out)
    else:
        render.print_plan(result.plan, out)
        out.write("\n")
        render.print_results(result, out)
    return result.exit_code


def cmd_rotate(args: argparse.Namespace, out: TextIO) -> int:
    policy = _policy(args)
    regions = _regions(policy, args)
    families = args.family
    for name in families or ():
        try:
            family = policy.family(name)
        except KeyError:
            raise UsageError(f"--family {name}: no such family in the policy") from None
        # `latest: {tag: null}` keeps the group's Latest and names no pointer: nothing to rotate either.
        if family.latest is None or (family.latest.tag is None and family.latest.ssm_parameter is None):
            raise UsageError(
                f"--family {name}: the family has no latest (tag or ssm_parameter): nothing to rotate"
            )
    only = rotation.Selection(frozenset(families)) if families else rotation.EVERY_GROUP
    factory = _factory(args)
    now = _now()
    results: list[rotator.RotationResult] = []
    planned = []
    # Why a selected group is left as it is (a policy error, as the plan reports it): never "current".
    blocked: dict[str, None] = {}
    for region in regions:
        clients = factory(region)
        inventory = load_images(clients, policy)
        if inventory.error:
            results.append(rotator.RotationResult.unreadable(region, inventory.error))
            continue
        changes, errors = rotation.rotation_for(inventory, policy, now, only)
        blocked.update(dict.fromkeys(errors))
        if policy.mode == "enforce":
            results.extend(
                rotator.converge(clients, policy, now, only, first=inventory, first_changes=changes)
            )
        else:
            planned.extend(changes)
    if args.format == "json":
        render.emit_json(
            {
                "mode": policy.mode,
                "latest": [c.model_dump(mode="json", by_alias=True) for c in planned],
                "rotations": [r.model_dump(mode="json") for r in results],
                "policy_errors": list(blocked),
            },
            out,
        )
    else:
        for error in blocked:
            out.write(f"POLICY ERROR: {error}\n")
        if policy.mode != "enforce":
            unread = sum(1 for r in results if r.status == "failed")
            render.print_planned_rotations(policy.mode, planned, out, unread=unread, blocked=len(blocked))
        render.print_rotations(results, out)
        if policy.mode == "enforce" and not results and not blocked:
            out.write("every Latest pointer is current\n")
    return EXIT_FAILED if any(r.status == "failed" for r in results) else EXIT_OK


def _not_paused(policy: Policy, command: str) -> None:
    """`mode: paused` is the kill switch: no command writes (set dry-run to rescue or bake by hand)."""
    if policy.mode == "paused":
        raise UsageError(
            f"the policy's mode is paused: {command} writes nothing while paused "
            "(set mode: dry-run to rescue or bake by hand while automatic retirement stays off)"
        )


# A writer the table's resource policy names in ArnLike: an IAM or STS principal ARN, wildcards allowed.
_PRINCIPAL_ARN = re.compile(r"^arn:aws[a-z-]*:(iam|sts)::([0-9]{12}|\*):\S+\Z")
_AMI_ID = re.compile(r"^ami-([0-9a-f]{8}|[0-9a-f]{17})\Z")
_INSTANCE_ID = re.compile(r"^i-([0-9a-f]{8}|[0-9a-f]{17})\Z")


def _rescue_regions(policy: Policy, args: argparse.Namespace) -> list[str]:
    """Where `rescue` looks: every managed region, or the regions named, managed or not. A rescue only
    undoes what the region's ledger recorded, so it also reaches AMIs left in a region since removed
    from the policy."""
    try:
        named = [check_region(region) for region in engine.named_regions(args.region)]
    except ValueError as error:
        raise UsageError(f"--region: {error}") from None
    # A region outside the policy is not checked when it loads: a typo is named here, not met as a
    # failure to reach an endpoint that does not exist.
    outside = [region for region in named if region not in policy.managed_regions]
    problem = unknown_regions_message(outside, "--region", _session(args)) if outside else None
    if problem:
        raise UsageError(problem)
    return named or policy.managed_regions


def _shown(argument: str) -> str:
    """An argument as typed, or quoted where it holds a newline or another unprintable: one line."""
    return argument if argument.isprintable() else repr(argument)


def cmd_rescue(args: argparse.Namespace, out: TextIO) -> int:
    if not _AMI_ID.match(args.image_id):
        raise UsageError(f"{_shown(args.image_id)}: not an AMI id (ami- and 8 or 17 hexadecimal digits)")
    policy = _policy(args)
    _not_paused(policy, "rescue")
    regions = _rescue_regions(policy, args)
    try:
        results = engine.rescue(policy, args.image_id, regions, _factory(args), _now())
    except LookupError as error:
        raise UsageError(str(error)) from None
    except LedgerMissing as error:
        raise _ledger_refusal(error) from None
    if args.format == "json":
        render.emit_json([r.model_dump(mode="json") for r in results], out)
    else:
        render.print_rescue(results, out)
    return EXIT_FAILED if any(r.status == "failed" for r in results) else EXIT_OK


def _bake_region(policy: Policy, family: Family, args: argparse.Namespace) -> str:
    """The region `bake` acts in: --region, else the one region the family bakes in, else the profile's.
    Without --instance-id, only a region the family bakes in (where its build instance lives)."""
    bakes_in = policy.bake_regions(family) or policy.regions
    if args.region:
        regions = _regions(policy, args)
        if len(regions) != 1:
            raise UsageError("bake acts in one region: give --region once")
        region = regions[0]
    elif len(bakes_in) == 1:
        region = bakes_in[0]
    else:
        region = _session(args).get_config_variable("region")
        if not region:
            raise UsageError("no region: give --region (or set one in the profile)")
    if region not in bakes_in and not args.instance_id:
        raise UsageError(
            f"family {family.name} bakes in {', '.join(bakes_in)} (bake.regions), not {region}: give "
            "--region with one of those, or --instance-id"
        )
    return region


def cmd_bake(args: argparse.Namespace, out: TextIO) -> int:
    from ami_janitor.aws import baker
    from ami_janitor.core import baking

    if args.instance_id is not None and not _INSTANCE_ID.match(args.instance_id):
        raise UsageError(
            f"--instance-id {_shown(args.instance_id)}: not an instance id (i- and 8 or 17 hexadecimal digits)"
        )
    policy = _policy(args)
    _not_paused(policy, "bake")
    try:
        family = policy.family(args.family)
    except KeyError:
        raise UsageError(f"--family {args.family}: no such family in the policy") from None
    factory = _factory(args)
    region = _bake_region(policy, family, args)
    try:
        engine.require_ledgers(policy, [region], factory)  # every bake is recorded on its AMI's item
    except LedgerMissing as error:
        raise _ledger_refusal(error) from None
    clients = factory(region)
    terminal = sys.stderr.isatty()

    def progress(line: str) -> None:  # one status line, rewritten in place
        sys.stderr.write(f"\r\033[K{line}")
        sys.stderr.flush()

    try:
        instance_id = args.instance_id or baker.find_bake_instance(clients, family)
        result = baker.bake(
            clients,
            family,
            instance_id,
            _now(),
            # As the scheduled bake does, unless the command line says otherwise.
            no_reboot=family.bake is not None and family.bake.no_reboot
            if args.no_reboot is None
            else args.no_reboot,
            stop_command=args.stop_command,
            start_command=args.start_command,
            wait=not args.no_wait,
            progress=progress if terminal else None,
            ledger_table=policy.ledger.table,
        )
    except baking.BakeUsageError as error:
        raise UsageError(str(error)) from None
    except baking.BakeError as error:
        sys.stderr.write(("\n" if terminal else "") + f"ami-janitor: bake failed: {error}\n")
        if error.image_id:  # the image exists even so: its id on stdout, as JSON under --format json
            if args.format == "json":
                failed = {
                    "family": family.name,
                    "image_id": error.image_id,
                    "status": "failed",
                    "error": str(error),
                }
                render.emit_json(failed, out)
            else:
                out.write(f"{error.image_id}\n")
        return EXIT_FAILED
    if terminal:
        sys.stderr.write("\n")
    for warning in result.warnings:
        sys.stderr.write(f"WARNING: {warning}\n")
    if args.format == "json":
        render.emit_json(result.model_dump(mode="json"), out)
    else:
        out.write(f"{result.image_id}\n")
    return EXIT_OK


def cmd_replicate(args: argparse.Namespace, out: TextIO) -> int:
    policy = _policy(args)
    regions = _regions(policy, args)
    for name in args.family or ():
        try:
            policy.family(name)
        except KeyError:
            raise UsageError(f"--family {name}: no such family in the policy") from None
    apply = policy.mode == "enforce"
    factory = _factory(args)
    try:
        result = engine.replicate(policy, regions, factory, _now(), apply=apply, families=args.family)
    except LedgerMissing as error:
        raise _ledger_refusal(error) from None
    if args.format == "json":
        render.emit_json(result.model_dump(mode="json"), out)
        return EXIT_FAILED if result.failed else EXIT_OK
    render.print_replication(result, out, mode=policy.mode, applied=apply)
    return EXIT_FAILED if result.failed else EXIT_OK


def cmd_ledger(args: argparse.Namespace, out: TextIO) -> int:
    """`ledger create`: the table in every managed region (or those given), created or adopted."""
    for writer in args.writer or ():
        if not _PRINCIPAL_ARN.match(writer):
            raise UsageError(
                f"--writer {_shown(writer)}: not a principal ARN (arn:aws:iam::ACCOUNT:role/NAME, wildcards "
                "allowed)"
            )
    policy = _policy(args)
    regions = _regions(policy, args)
    results = engine.create_ledgers(policy, regions, _factory(args), args.writer)
    failed = [r for r in results if isinstance(r, str)]
    done = [r for r in results if not isinstance(r, str)]
    for message in failed:
        sys.stderr.write(f"ami-janitor: ledger create failed in {message}\n")
    if args.format == "json":
        render.emit_json([r.model_dump(mode="json") for r in done], out)
    else:
        render.print_ledger_results(done, out)
    return EXIT_FAILED if failed else EXIT_OK


def _story(command: str) -> ModuleType:
    """The demo package: it needs the emulator extra (moto, at the version its patches are for)."""
    try:
        # story imports the emulator (moto) only when it runs: fail here instead, with the fix
        importlib.import_module("ami_janitor.demo.emulator")
        from ami_janitor.demo import story
    except (ImportError, RuntimeError) as error:
        raise UsageError(
            f"{command} needs the embedded emulator: pip install 'ami-janitor[emulator]' ({error})"
        ) from None
    return story


def cmd_emulator(args: argparse.Namespace, out: TextIO) -> int:
    """`ami-janitor emulator`: the demo's emulator on its own, until Ctrl-C (or --exit-after)."""
    story = _story("ami-janitor emulator")
    from ami_janitor.demo import emulator

    try:
        return story.serve_emulator(out, port=args.port, seeded=not args.empty, exit_after=args.exit_after)
    except emulator.CannotListen as error:  # before the export lines: nothing points at a dead port
        raise UsageError(f"--port {args.port}: {error}") from None


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    story = _story("ami-janitor demo")
    return story.run_demo(out, json_output=args.format == "json")


# The commands that write nothing to the account (demo and emulator call only the embedded emulator):
# one Ctrl-C stopped is only interrupted; any other may have written part of what it set out to.
READ_ONLY = frozenset({"plan", "demo", "emulator"})

COMMANDS = {
    "plan": cmd_plan,
    "apply": cmd_apply,
    "rotate": cmd_rotate,
    "replicate": cmd_replicate,
    "bake": cmd_bake,
    "rescue": cmd_rescue,
    "ledger": cmd_ledger,
    "demo": cmd_demo,
    "emulator": cmd_emulator,
}
