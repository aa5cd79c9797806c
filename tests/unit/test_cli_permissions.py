"""roles.CLI_PERMISSIONS, which the README points CLI users to, is exactly the union of the permission
lists declared by the modules `ami-janitor` imports (directly or not; the demo aside, it runs on the
emulator)."""

from __future__ import annotations

import importlib

import grimp

from ami_janitor import roles


def cli_modules() -> set[str]:
    graph = grimp.build_graph("ami_janitor", cache_dir=None)
    seen: set[str] = set()
    todo = [m for m in graph.modules if m == "ami_janitor.cli" or m.startswith("ami_janitor.cli.")]
    while todo:
        module = todo.pop()
        if module in seen or module.startswith("ami_janitor.demo"):
            continue
        seen.add(module)
        todo.extend(graph.find_modules_directly_imported_by(module))
    return seen


def declared_permissions(modules: set[str]) -> dict[str, set[str]]:
    """Every module-level `PERMISSIONS` or `*_PERMISSIONS` list of IAM actions, by `module.NAME`."""
    declared = {}
    for module in sorted(m for m in modules if not m.endswith(".__main__")):  # that one runs the CLI
        namespace = vars(importlib.import_module(module))
        for name, value in namespace.items():
            if (name == "PERMISSIONS" or name.endswith("_PERMISSIONS")) and isinstance(value, list):
                declared[f"{module}.{name}"] = set(value)
    return declared


def test_cli_permissions_are_the_union_of_what_its_modules_declare() -> None:
    modules = cli_modules()
    assert {"ami_janitor.engine", "ami_janitor.aws.baker", "ami_janitor.aws.copier"} <= modules
    assert not any(m.startswith("ami_janitor.handlers") for m in modules)
    declared = declared_permissions(modules)
    missing = {name: sorted(actions - set(roles.CLI_PERMISSIONS)) for name, actions in declared.items()}
    assert not {name: actions for name, actions in missing.items() if actions}
    assert set(roles.CLI_PERMISSIONS) == set().union(*declared.values())
    assert sorted(roles.CLI_PERMISSIONS) == roles.CLI_PERMISSIONS


def test_cli_permissions_cover_bake_and_copies() -> None:
    for action in (
        "ec2:CreateImage",
        "ssm:SendCommand",
        "ssm:GetCommandInvocation",
        "ec2:CopyImage",
        "kms:CreateGrant",
    ):
        assert action in roles.CLI_PERMISSIONS, action
