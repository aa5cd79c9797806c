"""Bad input and a broken AWS end every command with one line and an honest exit code, never a
traceback (table-driven: the environment, the command, the exit code, what the line says)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.client
import pytest

from ami_janitor import cli
from server import POLICY, now, seed_fleet

DEAD_ENDPOINT = "http://127.0.0.1:9"  # nothing listens there: connection refused


def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def dead_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", DEAD_ENDPOINT)
    monkeypatch.setenv("AMI_JANITOR_MAX_ATTEMPTS", "1")


def policy_text(old: str, new: str) -> Callable[[str], str | bytes]:
    return lambda text: text.replace(old, new)


def no_moto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An install without the `[emulator]` extra: importing moto fails."""
    monkeypatch.setitem(sys.modules, "moto", None)
    for name in [m for m in sys.modules if m.startswith("ami_janitor.demo")]:
        monkeypatch.delitem(sys.modules, name)


@dataclass
class Case:
    name: str
    argv: list[str]
    code: int
    says: str
    env: Callable[[pytest.MonkeyPatch, Path], None] | None = None
    policy: Callable[[str], str | bytes] = lambda text: text
    lines: int = 1  # a policy error names each bad key on a line of its own


CASES = [
    Case(
        "no credentials, rescue", ["rescue", "ami-0123456789abcdef0"], 1, "no AWS credentials", no_credentials
    ),
    Case(
        "dead endpoint, rescue",
        ["rescue", "ami-0123456789abcdef0"],
        1,
        f"cannot reach {DEAD_ENDPOINT}",
        dead_endpoint,
    ),
    Case(
        "no credentials, apply",
        ["apply", "--yes"],
        1,
        "no AWS credentials",
        no_credentials,
        policy=policy_text("mode: dry-run", "mode: enforce"),
    ),
    Case(
        "dead endpoint, apply",
        ["apply", "--yes"],
        1,
        f"cannot reach {DEAD_ENDPOINT}",
        dead_endpoint,
        policy=policy_text("mode: dry-run", "mode: enforce"),
    ),
    Case(
        "dead endpoint, replicate",
        ["replicate"],
        1,
        f"cannot reach {DEAD_ENDPOINT}",
        dead_endpoint,
        policy=policy_text("mode: dry-run", "mode: enforce"),
    ),
    Case(
        "dead endpoint, bake",
        ["bake", "--family", "web", "--instance-id", "i-0123456789abcdef0"],
        1,
        f"cannot reach {DEAD_ENDPOINT}",
        dead_endpoint,
    ),
    Case(
        "unknown profile",
        ["plan", "--profile", "nosuch"],
        2,
        "no AWS profile nosuch in the AWS config files (--profile or AWS_PROFILE): "
        "name one that `aws configure list-profiles` lists, or leave it out",
    ),
    Case("a region the policy does not manage", ["plan", "--region", "eu-west-3"], 2, "not managed"),
    Case(
        "not an AMI id", ["rescue", "bogus"], 2, "bogus: not an AMI id (ami- and 8 or 17 hexadecimal digits)"
    ),
    Case(
        "an AMI id with a last newline",
        ["rescue", "ami-0123456789abcdef0\n"],
        2,
        "not an AMI id (ami- and 8 or 17 hexadecimal digits)",
    ),
    Case(
        "a writer ARN with a last newline",
        ["ledger", "create", "--writer", "arn:aws:iam::123456789012:role/ops\n"],
        2,
        "not a principal ARN",
    ),
    Case(
        "a writer that is no principal ARN",
        ["ledger", "create", "--writer", "bogus"],
        2,
        "--writer bogus: not a principal ARN (arn:aws:iam::ACCOUNT:role/NAME, wildcards allowed)",
    ),
    Case(
        "a region no partition has",
        ["plan"],
        2,
        "unknown region us-east-9 (did you mean us-east-",
        policy=policy_text("regions: [us-east-1]", "regions: [us-east-9]"),
    ),
    Case(
        "a policy file that is not UTF-8",
        ["plan"],
        2,
        "not UTF-8 text",
        policy=lambda text: text.replace("web-*", "web-\xe9*").encode("latin-1"),
    ),
    Case(
        "a YAML error names the file, line and column",
        ["plan"],
        2,
        "janitor.yaml: not valid YAML (line 3, column 9",
        policy=policy_text("regions: [us-east-1]", "regions: [us-east-1"),
    ),
    Case(
        "a name glob that matches every AMI",
        ["plan"],
        2,
        "name glob '*' alone would select every AMI",
        policy=policy_text('{tags: {Project: Web}, name: "web-*"}', '{name: "*"}'),
        lines=2,
    ),
    Case(
        "a boolean where a count belongs",
        ["plan"],
        2,
        "defaults.keep_latest: input should be a valid integer",
        policy=policy_text("keep_latest: 2", "keep_latest: true"),
        lines=2,
    ),
    Case(
        "paused stops rescue",
        ["rescue", "ami-0123456789abcdef0"],
        2,
        "mode is paused",
        policy=policy_text("mode: dry-run", "mode: paused"),
    ),
    Case(
        "paused stops bake",
        ["bake", "--family", "web", "--instance-id", "i-0123456789abcdef0"],
        2,
        "mode is paused",
        policy=policy_text("mode: dry-run", "mode: paused"),
    ),
    Case("the emulator without its extra", ["emulator"], 2, "pip install 'ami-janitor[emulator]'", no_moto),
    # Refused where the value is read, before a date that far away overflows in the plan or the ledger.
    Case(
        "a day count past a hundred years",
        ["plan"],
        2,
        "defaults.min_age_days: must be <= 36500",
        policy=policy_text("min_age_days: 7", "min_age_days: 1000000"),
        lines=2,
    ),
    Case(
        "a ledger retention past a hundred years",
        ["plan"],
        2,
        "ledger.retention_days: must be <= 36500",
        policy=lambda text: text + "ledger: {retention_days: 3000000}\n",
        lines=2,
    ),
    Case(
        "a policy nested past the parser's depth",
        ["plan"],
        2,
        "janitor.yaml: not valid YAML (nested too deeply)",
        policy=lambda text: "regions: " + "[" * 100_000 + "]" * 100_000 + "\n",
    ),
    Case(
        "a number of more digits than Python reads",
        ["plan"],
        2,
        "janitor.yaml: not valid YAML (Exceeds the limit (4300 digits) for integer string conversion",
        policy=policy_text("keep_latest: 2", "keep_latest: " + "9" * 5000),
    ),
    # `--region "$REGION"` with REGION unset: taken as no region, it would mean every managed region.
    Case("an empty region", ["plan", "--region", ""], 2, "--region '' names an empty region"),
    Case("a region list with an empty name", ["plan", "--region", "us-east-1,"], 2, "names an empty region"),
    Case(
        "an empty region to rescue in",
        ["rescue", "ami-0123456789abcdef0", "--region", " "],
        2,
        "empty region",
    ),
    Case(
        "not an instance id",
        ["bake", "--family", "web", "--instance-id", "bogus"],
        2,
        "--instance-id bogus: not an instance id (i- and 8 or 17 hexadecimal digits)",
    ),
    Case(
        "an instance id with a last newline",
        ["bake", "--family", "web", "--instance-id", "i-0123456789abcdef0\n"],
        2,
        "--instance-id 'i-0123456789abcdef0\\n': not an instance id",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_one_line_and_an_honest_exit_code(
    case: Case,
    fake_aws_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "janitor.yaml"
    text = case.policy(POLICY.format(mode="dry-run"))
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text)
    if case.env is not None:
        case.env(monkeypatch, tmp_path)
    argv = case.argv if case.argv[0] == "emulator" else [*case.argv, "--config", str(config)]
    assert cli.main(argv) == case.code
    err = capsys.readouterr().err
    assert case.says in err and "Traceback" not in err, err
    assert err.count("\n") == case.lines, err


def test_regions_repeated_or_comma_separated(fake_aws_env: None) -> None:
    from ami_janitor.engine import select_regions
    from builders import policy

    two = policy(regions=["us-east-1", "eu-west-1"])
    assert select_regions(two, ["us-east-1,eu-west-1"]) == ["eu-west-1", "us-east-1"]
    assert select_regions(two, ["us-east-1", "eu-west-1"]) == ["eu-west-1", "us-east-1"]


def test_an_unreadable_answer_about_the_ami_to_rescue_is_one_line_and_exit_1(
    endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DescribeImages answers about the AMI without its CreationDate: an unreadable answer, one line
    naming the AMI and exit 1, as any AWS failure of a command."""
    fleet = seed_fleet(now(), count=3)
    real_call = botocore.client.BaseClient._make_api_call

    def call(self: Any, operation: str, params: dict[str, Any]) -> Any:
        answer = real_call(self, operation, params)
        for raw in answer.get("Images", []) if operation == "DescribeImages" else ():
            raw.pop("CreationDate", None)
        return answer

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", call)
    config = tmp_path / "janitor.yaml"
    config.write_text(POLICY.format(mode="dry-run"))
    assert cli.main(["rescue", fleet.images[0], "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (
        f"DescribeImages answered about {fleet.images[0]} in us-east-1: image {fleet.images[0]} has no" in err
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["plan", "--role-arn", "bogus"], "argument --role-arn: 'bogus': not a role ARN"),
        (["plan", "--role-arn", "arn:aws:iam::1234:role/x"], "not a role ARN"),
        (["plan", "--role-arn", "arn:aws:iam::123456789012:user/x"], "not a role ARN"),
        (["emulator", "--exit-after", "-5"], "argument --exit-after: '-5': not a number of seconds above 0"),
        (["emulator", "--exit-after", "nan"], "not a number of seconds above 0"),
    ],
)
def test_bad_input_on_the_command_line_is_exit_2_before_any_call(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked as the arguments are read: AssumeRole would refuse a malformed ARN as an AWS error
    (exit 1), and the emulator would stop at once, with 0, after a negative time."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2
    assert says in capsys.readouterr().err


def test_a_role_arn_with_a_path_in_any_partition_is_taken() -> None:
    from ami_janitor.cli.args import build_parser

    for arn in (
        "arn:aws:iam::123456789012:role/ami-janitor/operator",
        "arn:aws-us-gov:iam::123456789012:role/ami-janitor/operator",
        "arn:aws-cn:iam::123456789012:role/ops+team@x.y_z",
    ):
        assert build_parser().parse_args(["plan", "--role-arn", arn]).role_arn == arn


def test_ctrl_c_while_the_cli_loads_is_one_line_and_exit_130() -> None:
    """The SDK, pydantic and the engine take most of a second to import: Ctrl-C then (here raised as
    the commands module is imported) ends as Ctrl-C does later, not with a traceback."""
    import subprocess

    interrupted = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def importing(name, *args, **kwargs):\n"
        "    if name == 'ami_janitor.cli.commands':\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = importing\n"
        "from ami_janitor.cli import main\n"
    )
    done = subprocess.run([sys.executable, "-c", interrupted], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (130, "ami-janitor: interrupted\n")
