"""The clients' attempts: AMI_JANITOR_MAX_ATTEMPTS counts every attempt, the first included."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError

from ami_janitor.aws.clients import RegionClients
from sessions import botocore_session


class _Body:
    def stream(self, **_: Any) -> Any:
        yield b""

    def read(self, *_: Any) -> bytes:
        return b""


@pytest.mark.parametrize(("setting", "sent"), [("1", 1), ("3", 3), (None, 10)])
def test_a_call_is_sent_as_many_times_as_the_attempts_allow(
    setting: str | None, sent: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if setting is None:
        monkeypatch.delenv("AMI_JANITOR_MAX_ATTEMPTS", raising=False)
    else:
        monkeypatch.setenv("AMI_JANITOR_MAX_ATTEMPTS", setting)
    monkeypatch.setattr("botocore.retries.standard.ExponentialBackoff.delay_amount", lambda self, context: 0)
    ec2 = RegionClients("us-east-1", botocore_session("us-east-1", "x", "x")).ec2
    sends: list[str] = []

    def unavailable(request: Any, **_: Any) -> AWSResponse:
        sends.append(request.url)
        return AWSResponse(request.url, 503, {}, _Body())

    ec2.meta.events.register_first("before-send.ec2", unavailable)
    with pytest.raises(ClientError):
        ec2.describe_images(Owners=["self"])
    assert len(sends) == sent
