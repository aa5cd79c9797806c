"""The README's command reference matches `--help`: every command and flag the parser has is
documented in the CLI section, and every flag the section names exists."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ami_janitor.cli.args import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def cli_section() -> str:
    text = README.read_text()
    start = text.index("\n## CLI\n")
    return text[start : text.index("\n## ", start + 1)]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _subparsers(sub)
                if nested:
                    found.update({f"{name} {n}": s for n, s in nested.items()})
                else:
                    found[name] = sub
    return found


def commands() -> dict[str, set[str]]:
    """'command' -> its long flags, from the parser itself."""
    return {
        name: {flag for action in sub._actions for flag in action.option_strings if flag.startswith("--")}
        - {"--help"}
        for name, sub in _subparsers(build_parser()).items()
    }


def test_every_command_is_in_the_synopsis() -> None:
    synopsis = cli_section().split("```")[1]
    for name in commands():
        assert re.search(rf"\b{name}\b", synopsis), f"`{name}` is missing from the README's CLI synopsis"


def test_every_flag_is_documented() -> None:
    section = cli_section()
    for name, flags in commands().items():
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}\b", section), f"`{name} {flag}` is missing from the README"


def test_every_documented_flag_exists() -> None:
    known = set().union(*commands().values()) | {"--version"}
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", cli_section()))
    assert documented - known == set(), "the README names flags the CLI does not have"


def test_the_parser_has_what_the_walk_expects() -> None:
    """The walk sees nested commands and shared flags (else the tests above would pass on nothing)."""
    found = commands()
    assert "ledger create" in found and "--writer" in found["ledger create"]
    assert {"--config", "--region", "--role-arn"} <= found["plan"]
    assert "--exit-after" in found["emulator"]
