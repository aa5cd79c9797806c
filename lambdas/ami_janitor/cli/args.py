"""The command line: `ami-janitor COMMAND [options]`."""

from __future__ import annotations

import argparse
import math
import re

# An IAM role's ARN, as AssumeRole takes it (any partition; a path allowed).
_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ami-janitor")
    except PackageNotFoundError:
        return "(from source)"


def _port(text: str) -> int:
    """A TCP port: 0 (a free one) to 65535. The socket layer would wrap a larger one, or fail in a thread."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a port number (0 to 65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port}: not a port number (0 to 65535; 0 picks a free one)")
    return port


def _role_arn(text: str) -> str:
    """Checked here: AssumeRole would refuse it as an AWS error (exit 1), where it is bad input (exit 2)."""
    if not _ROLE_ARN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:100]!r}: not a role ARN (arn:aws:iam::ACCOUNT:role/NAME)")
    return text


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: not a number of seconds above 0")
    return seconds


def _common(region_help: str) -> argparse.ArgumentParser:
    """The options of every command that reads a policy (`--region` as the command takes it)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="policy file (default: $AMI_JANITOR_CONFIG or ./janitor.yaml)")
    common.add_argument("--region", action="append", help=region_help)
    common.add_argument("--profile", help="AWS profile to use")
    common.add_argument(
        "--role-arn",
        type=_role_arn,
        help="assume this role (the stack's operator role, under /ami-janitor/) for every call",
    )
    common.add_argument("--format", choices=["table", "json"], default="table")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common("act on these managed regions only (repeatable or comma-separated)")
    parser = argparse.ArgumentParser(
        prog="ami-janitor",
        description="Reference-aware AMI retention, staged retirement and Latest rotation.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
    reboot = bake.add_mutually_exclusive_group()
    reboot.add_argument(
        "--no-reboot",
        action="store_const",
        const=True,
        dest="no_reboot",
        help="do not reboot (the file system may be inconsistent); default: the family's bake.no_reboot",
    )
    reboot.add_argument(
        "--reboot",
        action="store_const",
        const=False,
        dest="no_reboot",
        help="reboot, whatever bake.no_reboot says",
    )
    bake.add_argument("--stop-command", help="run on the instance (SSM Run Command) before CreateImage")
    bake.add_argument("--start-command", help="run after CreateImage returns, even if it failed")
    bake.add_argument("--no-wait", action="store_true", help="print the id without waiting for available")
    anywhere = _common(
        "look in these regions only, managed or not (repeatable or comma-separated; default: every managed region)"
    )
    rescue = commands.add_parser("rescue", parents=[anywhere], help="undo every retirement stage of one AMI")
    rescue.add_argument("image_id", metavar="AMI_ID")
    ledger = commands.add_parser("ledger", help="the ledger table of each managed region")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", required=True, metavar="SUBCOMMAND")
    create = ledger_commands.add_parser(
        "create", parents=[common], help="make the ledger table in every managed region (idempotent)"
    )
    create.add_argument(
        "--writer",
        action="append",
        metavar="ARN",
        help="principal ARN (or pattern) allowed to write besides roles under /ami-janitor/ (repeatable; "
        "default: the caller's role)",
    )
    demo = commands.add_parser("demo", help="run the janitor on an embedded emulator (no AWS account)")
    demo.add_argument("--format", choices=["table", "json"], default="table")
    emulator = commands.add_parser(
        "emulator", help="start the demo's emulator alone and print the lines that point the CLI at it"
    )
    emulator.add_argument("--port", type=_port, default=0, help="port to listen on (default: a free one)")
    emulator.add_argument("--empty", action="store_true", help="start empty (default: the demo's account)")
    emulator.add_argument(
        "--exit-after",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="stop after this long (default: Ctrl-C)",
    )
    return parser
