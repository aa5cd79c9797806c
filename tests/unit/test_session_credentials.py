"""A janitor session finds the credentials botocore's own chain would find: the environment's first
(without making the rest of the chain), else the chain's, and a named profile's over the
environment's."""

from __future__ import annotations

from pathlib import Path

import botocore.credentials
import pytest

from ami_janitor.aws.clients import janitor_session
from sessions import botocore_session

PROFILES = """\
[default]
aws_access_key_id = FROM_THE_DEFAULT_PROFILE
aws_secret_access_key = default-secret

[operator]
aws_access_key_id = FROM_THE_OPERATOR_PROFILE
aws_secret_access_key = operator-secret
"""


@pytest.fixture(autouse=True)
def profiles(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A credentials file with two profiles, no credentials in the environment, no instance metadata."""
    credentials = tmp_path / "credentials"
    credentials.write_text(PROFILES)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_CREDENTIAL_EXPIRATION",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)


def in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Lambda gives a function: its role's temporary credentials."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "FROM_THE_ENVIRONMENT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "environment-token")


def keys(session: botocore.session.Session) -> tuple[str, str, str | None]:
    found = session.get_credentials()
    assert found is not None
    frozen = found.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key, frozen.token


def test_the_environments_credentials_are_found_without_making_the_chain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    in_the_environment(monkeypatch)
    expected = keys(botocore_session())
    assert expected == ("FROM_THE_ENVIRONMENT", "environment-secret", "environment-token")

    def chain_made(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole chain was made while the environment had credentials")

    monkeypatch.setattr(botocore.credentials, "create_credential_resolver", chain_made)
    assert keys(janitor_session()) == expected


def test_without_them_the_chain_finds_the_default_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = keys(botocore_session())
    assert expected[0] == "FROM_THE_DEFAULT_PROFILE"
    assert keys(janitor_session()) == expected


def test_a_named_profile_wins_over_the_environment_as_in_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    in_the_environment(monkeypatch)
    expected = keys(botocore.session.Session(profile="operator"))
    assert expected[0] == "FROM_THE_OPERATOR_PROFILE"
    assert keys(janitor_session("operator")) == expected


def test_no_credentials_anywhere_is_none_as_in_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    assert botocore_session().get_credentials() is None
    assert janitor_session().get_credentials() is None
