#!/usr/bin/env python3
"""CDK app: validates the policy file and synthesizes one ami-janitor stack per managed region.

The policy is AMI_JANITOR_CONFIG or janitor.yaml in the repository root. A bad policy stops the
synth with the loader's message (key path and reason) and exit code 2, as the CLI does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# This checkout's engine package, whatever the environment has installed.
sys.path.insert(0, str(ROOT / "lambdas"))


def main() -> int:
    from ami_janitor.aws.clients import unknown_regions_message
    from ami_janitor.core.policy import DEFAULT_CONFIG_PATH, PolicyError, load_policy

    path = os.environ.get("AMI_JANITOR_CONFIG") or str(ROOT / DEFAULT_CONFIG_PATH)
    try:
        policy = load_policy(path)
    except PolicyError as error:
        print(f"ami-janitor: {error}", file=sys.stderr)
        return 2
    # A stack for a region that does not exist would fail at deploy, after the others were made.
    problem = unknown_regions_message(policy.managed_regions, path)
    if problem:
        print(f"ami-janitor: {problem}", file=sys.stderr)
        return 2

    # Imported after validation: a bad policy fails fast, before the CDK runtime starts.
    from infra.stack import build_app

    build_app(policy).synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
