"""`ami-janitor`: the same engine from a terminal. `args` parses the command line, `commands` runs
them, `render` prints what they (and the demo) report. Exit codes: 0 done; 1 an action failed or a
region was skipped; 2 bad input or usage; 3 declined at the prompt."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from ami_janitor.cli.args import build_parser
from ami_janitor.cli.commands import COMMANDS, EXIT_DECLINED, EXIT_OK, EXIT_USAGE, UsageError
from ami_janitor.core.policy import PolicyError


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args, stream)
    except (PolicyError, UsageError) as error:
        sys.stderr.write(f"ami-janitor: {error}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("ami-janitor: interrupted\n")
        return EXIT_DECLINED
    except BrokenPipeError:
        # The reader went away (`ami-janitor plan | head`): end quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        with contextlib.suppress(OSError, ValueError):  # stdout is no file (captured): nothing to do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
