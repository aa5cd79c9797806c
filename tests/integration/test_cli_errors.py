"""Bad input and a broken AWS end every command with one line and an honest exit code, never a
traceback (table-driven: the environment, the command, the exit code, what the line says)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ami_janitor import cli
from server import POLICY

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


CASES = [
    ("no credentials, rescue", no_credentials, ["rescue", "ami-0123456789abcdef0"], 1, "no AWS credentials"),
    (
        "dead endpoint, rescue",
        dead_endpoint,
        ["rescue", "ami-0123456789abcdef0"],
        1,
        f"cannot reach {DEAD_ENDPOINT}",
    ),
    ("unknown profile", None, ["plan", "--profile", "nosuch"], 2, "nosuch"),
    ("a region the policy does not manage", None, ["plan", "--region", "eu-west-3"], 2, "not managed"),
    (
        "a region no partition has",
        "us-east-9",
        ["plan"],
        2,
        "unknown region us-east-9 (did you mean us-east-",
    ),
]


@pytest.mark.parametrize(("name", "setup", "argv", "code", "says"), CASES, ids=[c[0] for c in CASES])
def test_one_line_and_an_honest_exit_code(
    name: str,
    setup: object,
    argv: list[str],
    code: int,
    says: str,
    fake_aws_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "janitor.yaml"
    text = POLICY.format(mode="dry-run")
    if isinstance(setup, str):  # a region name the policy lists
        text = text.replace("regions: [us-east-1]", f"regions: [{setup}]")
    config.write_text(text)
    if callable(setup):
        setup(monkeypatch, tmp_path)
    assert cli.main([*argv, "--config", str(config)]) == code
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert err.count("\n") == 1, err


def test_regions_repeated_or_comma_separated(fake_aws_env: None) -> None:
    from ami_janitor.engine import select_regions
    from builders import policy

    two = policy(regions=["us-east-1", "eu-west-1"])
    assert select_regions(two, ["us-east-1,eu-west-1"]) == ["eu-west-1", "us-east-1"]
    assert select_regions(two, ["us-east-1", "eu-west-1"]) == ["eu-west-1", "us-east-1"]
