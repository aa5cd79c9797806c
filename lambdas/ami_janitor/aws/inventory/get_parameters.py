"""SSM parameters read by name (GetParameters), ten at a time: for the scan, the Latest pointers and
the resolve:ssm: aliases."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ami_janitor.aws.inventory.reading import Raw

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

PERMISSIONS: list[str] = ["ssm:GetParameters"]

_BATCH = 10  # GetParameters takes at most 10 names


def _parameter_key(name: str) -> str:
    """A parameter's identity without selector and ARN prefix ('/a/b:3' and '...:parameter/a/b' -> 'a/b')."""
    if name.startswith("arn:"):
        base = ":".join(name.split(":")[:6])
        return base.split(":parameter", 1)[-1].lstrip("/")
    return name.split(":", 1)[0].lstrip("/")


def _batches(names: Iterable[str]) -> list[list[str]]:
    # One parameter per batch at most (by name, version or ARN): answers are matched back by name.
    batches: list[tuple[list[str], set[str]]] = []
    for name in names:
        key = _parameter_key(name)
        for batch, keys in batches:
            if len(batch) < _BATCH and key not in keys:
                batch.append(name)
                keys.add(key)
                break
        else:
            batches.append(([name], {key}))
    return [batch for batch, _ in batches]


def get_parameters(ssm: SSMClient, names: Iterable[str]) -> dict[str, Raw]:
    """Requested name (maybe 'name:version', 'name:label' or an ARN) -> parameter; absent ones are left out.

    Never decrypts: a SecureString is never read as an AMI id.
    """
    found: dict[str, Raw] = {}
    for batch in _batches(dict.fromkeys(names)):
        requested = {_parameter_key(name): name for name in batch}
        answer = ssm.get_parameters(Names=batch, WithDecryption=False)
        for parameter in answer.get("Parameters") or []:
            name = requested.get(_parameter_key(str(parameter["Name"])))
            if name is not None:
                found[name] = parameter
    return found
