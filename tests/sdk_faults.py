"""Faults for clients on the in-process moto. Lost answers: the request takes effect, the connection
closes before its answer arrives, and botocore's own retry sends it again (the path a real lost
answer takes). Refusals: an operation every client is denied."""

from __future__ import annotations

from typing import Any

import botocore.client
import pytest
from botocore.awsrequest import AWSPreparedRequest
from botocore.exceptions import ClientError, ConnectionClosedError
from moto.core.models import botocore_stubber


class LoseFirstAnswers:
    """The first attempt of the next `count` calls of `operations` (all where empty) reaches moto and
    takes effect; its answer is lost. Retries pass. `sent` counts every attempt of those calls."""

    def __init__(self, client: Any, *operations: str, count: int = 1_000_000) -> None:
        self.operations = set(operations)
        self.left = count
        self.sent = 0
        self.lost: list[str] = []
        service = client.meta.service_model.service_id.hyphenize()
        client.meta.events.register_first(f"before-send.{service}", self.send)

    def send(self, request: AWSPreparedRequest, event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        if self.operations and operation not in self.operations:
            return
        self.sent += 1
        first = str(request.headers.get("amz-sdk-request", b"")).find("attempt=1;") >= 0
        if self.left and first:
            self.left -= 1
            botocore_stubber(event_name, request)  # the request takes effect
            self.lost.append(operation)
            raise ConnectionClosedError(endpoint_url=request.url, request=request)


def deny(
    patch: pytest.MonkeyPatch, operation: str, code: str = "AccessDeniedException", message: str = "denied"
) -> None:
    """Every client's `operation` (its API name, "PutParameter") refused with `code` and `message`."""
    real_call = botocore.client.BaseClient._make_api_call

    def denied(self: Any, called: str, params: dict[str, Any]) -> Any:
        if called == operation:
            raise ClientError({"Error": {"Code": code, "Message": message}}, called)
        return real_call(self, called, params)

    patch.setattr(botocore.client.BaseClient, "_make_api_call", denied)
