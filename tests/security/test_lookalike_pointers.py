"""A parameter that only looks like one of the janitor's Latest pointers is a reference like any other.

The janitor's pointers are not references (it moves them itself). Anyone who can write a parameter
under the pointer's path must not turn a reference into one that is not: the names the janitor owns
are exact, `{arch}` filled in with each of EC2's architectures, never a pattern.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import boto3
import pytest

from ami_janitor import cli
from server import POLICY, image_ids, make_ledger, now, seed_fleet

ARCH_POLICY = POLICY.replace('ssm_parameter: "/ami/web/latest"', 'ssm_parameter: "/ami/web/{{arch}}/latest"')


@pytest.mark.parametrize("name", ["/ami/web/prod/latest", "/ami/web/x86_64-pinned/latest"])
def test_a_parameter_shaped_like_a_pointer_keeps_the_ami_it_names(
    endpoint: str, tmp_path: Path, name: str
) -> None:
    pinned = seed_fleet(now()).images[0]  # the oldest: only the parameter keeps it
    boto3.client("ssm", region_name="us-east-1").put_parameter(Name=name, Value=pinned, Type="String")
    config = tmp_path / "janitor.yaml"
    config.write_text(ARCH_POLICY.format(mode="enforce"))
    make_ledger()

    out = io.StringIO()
    assert cli.main(["plan", "--config", str(config), "--format", "json"], out=out) == 0
    decision = next(d for d in json.loads(out.getvalue())["decisions"] if d["image_id"] == pinned)
    assert decision["action"] == "keep"
    assert f"value of SSM parameter {name}" in " ".join(decision["reasons"])

    assert cli.main(["apply", "--config", str(config), "--yes"], out=io.StringIO()) == 0
    assert pinned in image_ids()
