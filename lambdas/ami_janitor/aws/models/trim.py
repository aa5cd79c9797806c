"""The cut of a botocore service model to some of its operations (`python -m ami_janitor.aws.models`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_DOCUMENTATION = ("documentation", "documentationUrl")


def _undocumented(node: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in node.items() if key not in _DOCUMENTATION}


def _referenced(shape: dict[str, Any]) -> Iterable[str]:
    """The shapes one shape names: a structure's members, a list's member, a map's key and value."""
    for member in shape.get("members", {}).values():
        yield member["shape"]
    for part in ("member", "key", "value"):
        if part in shape:
            yield shape[part]["shape"]


def trimmed(model: dict[str, Any], operations: Iterable[str]) -> dict[str, Any]:
    """`model` with only `operations` and the shapes they reach (input, output, errors, and what those
    name), each as it is but for its documentation."""
    kept_operations = {name: _undocumented(model["operations"][name]) for name in sorted(operations)}
    pending = [
        ref["shape"]
        for operation in kept_operations.values()
        for ref in (operation.get("input"), operation.get("output"), *operation.get("errors", ()))
        if ref
    ]
    shapes: dict[str, Any] = {}
    while pending:
        name = pending.pop()
        if name in shapes:
            continue
        shape = _undocumented(model["shapes"][name])
        if "members" in shape:
            shape["members"] = {key: _undocumented(member) for key, member in shape["members"].items()}
        shapes[name] = shape
        pending.extend(_referenced(shape))
    return {
        **_undocumented(model),
        "operations": kept_operations,
        "shapes": dict(sorted(shapes.items())),
    }


def endpoints_of(endpoints: dict[str, Any], services: Iterable[str]) -> dict[str, Any]:
    """botocore's endpoint data with every partition and region, and only `services`."""
    kept = set(services)
    return {
        **endpoints,
        "partitions": [
            {
                **partition,
                "services": {name: data for name, data in partition["services"].items() if name in kept},
            }
            for partition in endpoints["partitions"]
        ],
    }
