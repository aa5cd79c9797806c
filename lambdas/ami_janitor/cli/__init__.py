"""`ami-janitor`: the same engine from a terminal. `args` parses the command line, `commands` runs
them, `render` prints what they (and the demo) report. Exit codes: 0 done; 1 an action failed or a
region was skipped; 2 bad input or usage; 3 declined at the prompt (Ctrl-C there too), nothing
written; 130 interrupted (Ctrl-C) anywhere else."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import TextIO

try:  # the SDK, pydantic and the engine: most of a second, in which Ctrl-C is as likely as later
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ProfileNotFound

    from ami_janitor.aws.errors import AWS_ERRORS, error_text
    from ami_janitor.cli.args import build_parser
    from ami_janitor.cli.commands import (
        COMMANDS,
        EXIT_FAILED,
        EXIT_INTERRUPTED,
        EXIT_OK,
        EXIT_USAGE,
        READ_ONLY,
        UsageError,
    )
    from ami_janitor.core.policy import PolicyError
except KeyboardInterrupt:
    sys.stderr.write(("\n" if sys.stderr.isatty() else "") + "ami-janitor: interrupted\n")
    raise SystemExit(130) from None


def aws_failure(error: BaseException) -> str:
    """One line for an AWS failure that ended a command."""
    if isinstance(error, NoCredentialsError):
        return "no AWS credentials: set AWS_PROFILE (or --profile), or run where a role provides them"
    if isinstance(error, EndpointConnectionError):
        return f"cannot reach {error.kwargs.get('endpoint_url')}: check the network, or AWS_ENDPOINT_URL"
    return f"an AWS call failed ({type(error).__name__}): {error_text(error)}"


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args, stream)
    except (PolicyError, UsageError) as error:
        sys.stderr.write(f"ami-janitor: {error}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Not the question's no (that is exit 3, nothing written): the command stopped part way.
        said = "" if args.command in READ_ONLY else f"; {args.command} may have made some of its changes"
        sys.stderr.write(("\n" if sys.stderr.isatty() else "") + f"ami-janitor: interrupted{said}\n")
        return EXIT_INTERRUPTED
    except ProfileNotFound as error:
        profile = error.kwargs.get("profile")
        sys.stderr.write(
            f"ami-janitor: no AWS profile {profile} in the AWS config files (--profile or AWS_PROFILE): "
            "name one that `aws configure list-profiles` lists, or leave it out\n"
        )
        return EXIT_USAGE
    except AWS_ERRORS as error:
        # Whatever a command could not turn into a result: one line, what failed and what to do.
        sys.stderr.write(f"ami-janitor: {aws_failure(error)}\n")
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`ami-janitor plan | head`): end quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        with contextlib.suppress(OSError, ValueError):  # stdout is no file (captured): nothing to do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
