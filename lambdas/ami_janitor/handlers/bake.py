"""Lambda handler (being written)."""

from typing import Any

from ami_janitor import adapter, executor

PERMISSIONS: list[str] = sorted(set(adapter.PERMISSIONS + executor.PERMISSIONS))


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    raise NotImplementedError
