"""The janitor's clients load their CA bundle into one TLS context per process, not at each new
connection as botocore's own do (about 17 ms a connection)."""

from __future__ import annotations

import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import SSLError
from botocore.httpsession import URLLib3Session

from ami_janitor.aws.clients import (
    RegionClients,
    SharedVerifiedSession,
    janitor_session,
    share_verified_context,
    verified_context,
)
from sessions import botocore_session
from tls_server import authority, http_endpoint, tls_endpoint


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Each CA bundle loaded into a TLS context, as it is loaded."""
    loads: list[Any] = []
    original = ssl.SSLContext.load_verify_locations

    def counted(context: ssl.SSLContext, cafile: Any = None, capath: Any = None, cadata: Any = None) -> None:
        loads.append(cafile)
        original(context, cafile, capath, cadata)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    return loads


def _trusting(monkeypatch: pytest.MonkeyPatch, bundle: Path, endpoint: str) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)


def test_botocore_loads_the_bundle_again_at_each_new_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loaded: list[Any], fake_aws_env: None
) -> None:
    """What the janitor's clients avoid: botocore's own client, four calls, four connections."""
    ca = authority(tmp_path, "test-ca")
    with tls_endpoint(tmp_path, ca) as endpoint:
        _trusting(monkeypatch, ca.bundle, endpoint)
        client = botocore_session("us-east-1").create_client(
            "ec2", config=Config(retries={"total_max_attempts": 1})
        )
        for _ in range(4):
            client.describe_images(Owners=["self"])
    assert loaded == [str(ca.bundle)] * 4


def test_the_janitor_loads_it_once_for_every_connection_of_every_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loaded: list[Any], fake_aws_env: None
) -> None:
    ca = authority(tmp_path, "test-ca")
    with tls_endpoint(tmp_path, ca) as endpoint:
        _trusting(monkeypatch, ca.bundle, endpoint)
        # Two runs' clients (each invocation makes its own session), two regions, four calls each.
        for region in ("us-east-1", "eu-west-1"):
            clients = RegionClients(region, janitor_session())
            for _ in range(4):
                assert clients.ec2.describe_images(Owners=["self"])["Images"] == []
            assert isinstance(clients.ec2._endpoint.http_session, SharedVerifiedSession)
    assert loaded == [str(ca.bundle)]


def test_a_client_with_a_client_certificate_keeps_botocore_s_session(
    tmp_path: Path, fake_aws_env: None
) -> None:
    """urllib3 would load its certificate into the context every client shares."""
    session = botocore_session("us-east-1")
    certified = session.create_client("ec2", config=Config(client_cert=str(tmp_path / "client.pem")))
    share_verified_context(certified)
    assert type(certified._endpoint.http_session) is URLLib3Session
    plain = session.create_client("ec2")
    share_verified_context(plain)
    assert type(plain._endpoint.http_session) is SharedVerifiedSession


def test_over_http_no_bundle_is_loaded(
    monkeypatch: pytest.MonkeyPatch, loaded: list[Any], fake_aws_env: None
) -> None:
    """The emulator's endpoint, or any http one: nothing to verify, no bundle loaded (botocore loads
    none there either)."""
    with http_endpoint() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        clients = RegionClients("us-east-1", janitor_session())
        for _ in range(2):
            assert clients.ec2.describe_images(Owners=["self"])["Images"] == []
    assert loaded == []


def test_threads_that_connect_together_load_the_bundle_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loaded: list[Any], fake_aws_env: None
) -> None:
    """A run's first connections start side by side (its regions, the inventory's reads ahead)."""
    ca = authority(tmp_path, "test-ca")
    with tls_endpoint(tmp_path, ca) as endpoint:
        _trusting(monkeypatch, ca.bundle, endpoint)
        clients = [RegionClients("us-east-1", janitor_session()) for _ in range(8)]
        ec2s = [c.ec2 for c in clients]
        start = threading.Barrier(len(ec2s))

        def first_call(ec2: Any) -> list[Any]:
            start.wait()
            return ec2.describe_images(Owners=["self"])["Images"]

        with ThreadPoolExecutor(max_workers=len(ec2s)) as pool:
            assert list(pool.map(first_call, ec2s)) == [[]] * len(ec2s)
    assert loaded == [str(ca.bundle)]


def test_a_connection_through_a_proxy_keeps_botocore_s_bundle_and_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_aws_env: None
) -> None:
    """Through an HTTPS proxy without a bundle of its own, urllib3 verifies the proxy against the pool's
    bundle: the pool keeps it (and the context botocore made for it)."""
    ca = authority(tmp_path, "test-ca")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca.bundle))
    url = "https://ec2.us-east-1.amazonaws.com/"
    client = RegionClients("us-east-1", janitor_session()).ec2
    http = client._endpoint.http_session
    assert isinstance(http, SharedVerifiedSession)
    for proxy in (None, "https://proxy.example:3128"):
        manager = http._get_connection_manager(url, proxy)
        pool = manager.connection_from_url(url)
        http._setup_ssl_cert(pool, url, http._verify)
        assert pool.cert_reqs == "CERT_REQUIRED"
        if proxy is None:
            assert (pool.ca_certs, pool.conn_kw["ssl_context"]) == (None, verified_context(str(ca.bundle)))
        else:
            assert pool.ca_certs == str(ca.bundle)
            assert pool.conn_kw["ssl_context"] is not verified_context(str(ca.bundle))


@pytest.mark.parametrize("bundle", ["a directory", "a missing file"])
def test_a_bundle_that_cannot_be_loaded_fails_each_connection_as_botocore_s(
    bundle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_aws_env: None
) -> None:
    """Not the janitor when it makes the client: each call, as botocore's own client fails it."""
    ca = authority(tmp_path, "test-ca")
    path = tmp_path if bundle == "a directory" else tmp_path / "missing.pem"
    with tls_endpoint(tmp_path, ca) as endpoint:
        _trusting(monkeypatch, path, endpoint)
        ec2 = RegionClients("us-east-1", janitor_session()).ec2
        own = botocore_session("us-east-1").create_client(
            "ec2", config=Config(retries={"total_max_attempts": 1})
        )
        for client in (ec2, ec2, own):
            with pytest.raises(SSLError):
                client.describe_images(Owners=["self"])
