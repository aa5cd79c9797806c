"""Shared by every test folder: hypothesis profiles, fake credentials, in-process moto, the moto server."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings
from moto import mock_aws

from ami_janitor.demo import emulator

# `make test` runs the quick profile; `make fuzz` runs every property with 10,000 examples.
settings.register_profile("quick", max_examples=60, deadline=None)
settings.register_profile(
    "fuzz", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Without this, moto lists its built-in public AMIs and their snapshots as owned by 'self'.
    "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
    # An unimplemented emulator call is an error, not a retry loop.
    "AMI_JANITOR_MAX_ATTEMPTS": "1",
}


@pytest.fixture
def fake_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and region, so no test can reach a real account."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    # No profile file on the machine can lend a real identity.
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def moto_aws(fake_aws_env: None) -> Iterator[None]:
    """Every boto3 client made during the test talks to an in-process moto, with the emulator's
    additions (operations moto lacks answer as AWS answers an operation it does not offer)."""
    emulator.install()
    with mock_aws():
        yield


# The moto server on loopback for the end-to-end tests (CLI, handlers, demo).
from server import endpoint, moto_server  # noqa: E402, F401
