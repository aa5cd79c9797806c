"""`ami-janitor`: the same engine from a terminal. Exit codes: 0 done; 1 an action failed or a region
was skipped; 2 bad input or usage; 3 declined at the prompt."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import boto3

from ami_janitor import engine
from ami_janitor.aws import inventory as adapter
from ami_janitor.aws import rotator
from ami_janitor.aws.clients import ClientFactory
from ami_janitor.core import rotation
from ami_janitor.core.model import Plan
from ami_janitor.core.policy import Policy, PolicyError, load_policy

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DECLINED = 0, 1, 2, 3


class UsageError(Exception):
    """Bad input: exit 2 with the message."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="policy file (default: $AMI_JANITOR_CONFIG or ./janitor.yaml)")
    common.add_argument("--region", action="append", help="act on this region only (repeatable)")
    common.add_argument("--profile", help="AWS profile to use")
    common.add_argument("--format", choices=["table", "json"], default="table")

    parser = argparse.ArgumentParser(
        prog="ami-janitor",
        description="Reference-aware AMI retention, staged retirement and Latest rotation.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("plan", parents=[common], help="show, with reasons, what a run would do")
    apply = commands.add_parser("apply", parents=[common], help="plan and apply (mode: enforce only)")
    apply.add_argument("--yes", action="store_true", help="do not ask before writing")
    rotate = commands.add_parser("rotate", parents=[common], help="reconcile the Latest tag and parameter")
    rotate.add_argument("--family", action="append", help="only this family (repeatable)")
    replicate = commands.add_parser("replicate", parents=[common], help="reconcile copies and shares")
    replicate.add_argument("--family", action="append", help="only this family (repeatable)")
    bake = commands.add_parser("bake", parents=[common], help="create a versioned image of an instance")
    bake.add_argument("--family", required=True)
    bake.add_argument(
        "--instance-id",
        help="default: the family's bake.instance_id, else the only instance carrying its bake.instance_tag",
    )
    bake.add_argument(
        "--no-reboot", action="store_true", help="do not reboot (the file system may be inconsistent)"
    )
    bake.add_argument("--stop-command", help="run on the instance (SSM Run Command) before CreateImage")
    bake.add_argument("--start-command", help="run after CreateImage returns, even if it failed")
    bake.add_argument("--no-wait", action="store_true", help="print the id without waiting for available")
    rescue = commands.add_parser("rescue", parents=[common], help="undo every retirement stage of one AMI")
    rescue.add_argument("image_id", metavar="AMI_ID")
    demo = commands.add_parser("demo", help="run the janitor on an embedded emulator (no AWS account)")
    demo.add_argument("--format", choices=["table", "json"], default="table")
    return parser


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _policy(args: argparse.Namespace) -> Policy:
    return load_policy(args.config)


def _factory(args: argparse.Namespace) -> ClientFactory:
    session = boto3.Session(profile_name=args.profile) if args.profile else None
    return ClientFactory(session)


def _regions(policy: Policy, args: argparse.Namespace) -> list[str]:
    try:
        return engine.select_regions(policy, args.region)
    except ValueError as error:
        raise UsageError(str(error)) from None


# ---- output ---------------------------------------------------------------------------------------


def _table(rows: list[list[str]], out: TextIO) -> None:
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")


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
    _table(rows, out)
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
            key = f" (KMS {copy.kms_key_id})" if copy.kms_key_id else ""
            out.write(f"  {copy.family}: {copy.source_region}/{copy.source_image_id} -> {copy.region}{key}\n")
    if plan.shares:
        out.write("\nShares:\n")
        for share in plan.shares:
            out.write(
                f"  {share.region} {share.image_id}: add {share.add or '-'} remove {share.remove or '-'}\n"
            )
    if plan.bakes:
        out.write("\nScheduled bakes:\n")
        for bake in plan.bakes:
            if bake.instance_id is None:
                out.write(f"  {bake.region}: the scheduled bake would refuse: {bake.refusal}\n")
            else:
                what = f"the scheduled bake will image {bake.instance_id} ({bake.reason})"
                out.write(f"  {bake.region}: family {bake.family}: {what}\n")
    s = plan.summary
    out.write(
        f"\nsummary: {s.images} images, {s.kept} kept, {s.waiting} waiting, {s.deprecated} to deprecate, "
        f"{s.disabled} to disable, {s.retired} to deregister, {s.rescued} to rescue, "
        f"{s.held_by_cap} held by caps; {s.snapshots_deleted} snapshots, up to {s.gib_freed_max} GiB freed\n"
    )


def print_results(result: engine.RunResult, out: TextIO) -> None:
    for rot in result.rotations:
        status = "ok" if rot.status == "ok" else f"FAILED {rot.error}"
        out.write(f"rotate {rot.region} {rot.family} {rot.architecture} -> {rot.to}: {status}\n")
        for line in rot.written:
            out.write(f"    {line}\n")
    for item in result.results:
        status = "ok" if item.status == "ok" else f"{item.status.upper()} {item.error or ''}".rstrip()
        snaps = f" (snapshots deleted: {', '.join(item.snapshots_deleted)})" if item.snapshots_deleted else ""
        detail = f" [{item.detail}]" if item.detail else ""
        out.write(f"{item.action} {item.region} {item.image_id}: {status}{snaps}{detail}\n")
    failed = result.failed
    out.write(f"applied: {len(result.results)} actions, {failed} failed\n")


def _emit_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2) + "\n")


# ---- commands -------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace, out: TextIO) -> int:
    policy = _policy(args)
    regions = _regions(policy, args)
    result = engine.run(policy, regions, _factory(args), _now(), apply=False)
    if args.format == "json":
        out.write(result.plan.to_json())
    else:
        print_plan(result.plan, out)
    return result.exit_code


def _confirm(plan: Plan, out: TextIO) -> bool:
    acting = sum(1 for d in plan.decisions if d.action not in ("keep", "wait"))
    out.write(f"Apply {acting} actions and {len(plan.latest)} Latest changes? [y/N] ")
    out.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def cmd_apply(args: argparse.Namespace, out: TextIO) -> int:
    policy = _policy(args)
    if policy.mode != "enforce":
        raise UsageError(f"the policy's mode is {policy.mode}: apply writes only with mode: enforce")
    regions = _regions(policy, args)
    factory = _factory(args)
    now = _now()
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("apply asks before it writes: pass --yes when not run in a terminal")
        preview = engine.run(policy, regions, factory, now, apply=False)
        print_plan(preview.plan, out)
        if not _confirm(preview.plan, out):
            out.write("declined: nothing was changed\n")
            return EXIT_DECLINED
    result = engine.run(policy, regions, factory, now, apply=True)
    if args.format == "json":
        _emit_json(result.report().model_dump(mode="json"), out)
    else:
        print_plan(result.plan, out)
        out.write("\n")
        print_results(result, out)
    return result.exit_code


def cmd_rotate(args: argparse.Namespace, out: TextIO) -> int:
    policy = _policy(args)
    regions = _regions(policy, args)
    families = args.family
    for name in families or ():
        try:
            policy.family(name)
        except KeyError:
            raise UsageError(f"--family {name}: no such family in the policy") from None
    factory = _factory(args)
    now = _now()
    results: list[rotator.RotationResult] = []
    planned = []
    for region in regions:
        clients = factory(region)
        if policy.mode == "enforce":
            results.extend(rotator.converge(clients, policy, now, families=families))
        else:
            inventory = adapter.load_images(clients, policy)
            if inventory.error:
                results.append(rotator.RotationResult.unreadable(region, inventory.error))
                continue
            planned.extend(rotation.changes_for(inventory, policy, now, families=families))
    if args.format == "json":
        _emit_json(
            {
                "mode": policy.mode,
                "latest": [c.model_dump(mode="json", by_alias=True) for c in planned],
                "rotations": [r.model_dump(mode="json") for r in results],
            },
            out,
        )
    else:
        if policy.mode != "enforce":
            out.write(f"mode {policy.mode}: nothing is written; these changes would be made:\n")
            for change in planned:
                out.write(
                    f"  {change.region} {change.family} {change.architecture}: {change.from_ or '(none)'} -> "
                    f"{change.to or '(none)'}"
                    + (f"  WARNING: {change.warning}" if change.warning else "")
                    + "\n"
                )
            if not planned:
                out.write("  (every Latest pointer is current)\n")
        for rot in results:
            status = "ok" if rot.status == "ok" else f"FAILED {rot.error}"
            out.write(f"{rot.region} {rot.family} {rot.architecture} -> {rot.to}: {status}\n")
            for line in rot.written:
                out.write(f"    {line}\n")
        if policy.mode == "enforce" and not results:
            out.write("every Latest pointer is current\n")
    return EXIT_FAILED if any(r.status == "failed" for r in results) else EXIT_OK


def cmd_rescue(args: argparse.Namespace, out: TextIO) -> int:
    policy = _policy(args)
    regions = _regions(policy, args)
    try:
        results = engine.rescue(policy, args.image_id, regions, _factory(args), _now())
    except LookupError as error:
        raise UsageError(str(error)) from None
    if args.format == "json":
        _emit_json([r.model_dump(mode="json") for r in results], out)
    else:
        for item in results:
            status = "ok" if item.status == "ok" else f"{item.status.upper()} {item.error or ''}"
            out.write(
                f"{item.action} {item.region} {item.image_id}: {status}"
                + (f" [{item.detail}]" if item.detail else "")
                + "\n"
            )
    return EXIT_FAILED if any(r.status == "failed" for r in results) else EXIT_OK


def _one_region(policy: Policy, args: argparse.Namespace) -> str:
    if args.region:
        regions = _regions(policy, args)
        if len(regions) != 1:
            raise UsageError("bake acts in one region: give --region once")
        return regions[0]
    session = boto3.Session(profile_name=args.profile) if args.profile else boto3.Session()
    if not session.region_name:
        raise UsageError("no region: give --region (or set one in the profile)")
    return session.region_name


def cmd_bake(args: argparse.Namespace, out: TextIO) -> int:
    from ami_janitor.aws import baker
    from ami_janitor.core import baking

    policy = _policy(args)
    try:
        family = policy.family(args.family)
    except KeyError:
        raise UsageError(f"--family {args.family}: no such family in the policy") from None
    clients = _factory(args)(_one_region(policy, args))
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
            no_reboot=args.no_reboot,
            stop_command=args.stop_command,
            start_command=args.start_command,
            wait=not args.no_wait,
            progress=progress if terminal else None,
        )
    except baking.BakeUsageError as error:
        raise UsageError(str(error)) from None
    except baking.BakeError as error:
        sys.stderr.write(("\n" if terminal else "") + f"ami-janitor: bake failed: {error}\n")
        if error.image_id:
            out.write(f"{error.image_id}\n")  # the image exists even so
        return EXIT_FAILED
    if terminal:
        sys.stderr.write("\n")
    for warning in result.warnings:
        sys.stderr.write(f"WARNING: {warning}\n")
    if args.format == "json":
        _emit_json(result.model_dump(mode="json"), out)
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
    result = engine.replicate(policy, regions, _factory(args), _now(), apply=apply, families=args.family)
    if args.format == "json":
        _emit_json(result.model_dump(mode="json"), out)
        return EXIT_FAILED if result.failed else EXIT_OK
    if not apply:
        out.write(f"mode {policy.mode}: nothing is written; these copies and shares would be made:\n")
    for copy in result.copies:
        key = f" encrypted with {copy.kms_key_id}" if copy.kms_key_id else ""
        out.write(
            f"copy {copy.family} {copy.source_region}/{copy.source_image_id} -> {copy.region}{key}"
            f" (generation {copy.generation})\n"
        )
    for share in result.shares:
        out.write(
            f"share {share.region} {share.image_id}: add {share.add or '-'} remove {share.remove or '-'}\n"
        )
    for problem in result.problems:
        out.write(f"note: {problem}\n")
    for done in result.copy_results:
        status = done.status if done.status != "failed" else f"FAILED {done.error}"
        out.write(f"copied {done.source_image_id} -> {done.region}: {done.image_id or '-'} {status}\n")
    for shared in result.share_results:
        status = shared.status if shared.status != "failed" else f"FAILED {shared.error}"
        out.write(f"shared {shared.region} {shared.image_id}: {status}\n")
    if not (result.copies or result.shares):
        out.write("every copy and share is in place\n")
    return EXIT_FAILED if result.failed else EXIT_OK


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    try:
        from ami_janitor.demo import story
    except ImportError as error:  # moto is a development dependency
        raise UsageError(
            f"the demo needs the development install (pip install -e '.[dev]'): {error}"
        ) from None
    return story.run_demo(out, json_output=args.format == "json")


COMMANDS = {
    "plan": cmd_plan,
    "apply": cmd_apply,
    "rotate": cmd_rotate,
    "replicate": cmd_replicate,
    "bake": cmd_bake,
    "rescue": cmd_rescue,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args, stream)
    except (PolicyError, UsageError) as error:
        sys.stderr.write(f"ami-janitor: {error}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("ami-janitor: interrupted\n")
        return EXIT_DECLINED


if __name__ == "__main__":
    raise SystemExit(main())
