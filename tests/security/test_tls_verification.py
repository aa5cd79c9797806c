"""A TLS context shared by every client still verifies every connection: a man in the middle with a
certificate another authority signed, or one made for another host, is refused each time, after a
verified connection warmed the shared context too."""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.exceptions import SSLError

from ami_janitor.aws.clients import RegionClients, janitor_session
from tls_server import authority, tls_endpoint

pytestmark = pytest.mark.usefixtures("fake_aws_env")


@pytest.mark.parametrize(
    ("impostor", "refusal"),
    [
        ("another authority", "CERTIFICATE_VERIFY_FAILED"),
        ("another host", "hostname '127.0.0.1' doesn't match"),
    ],
)
def test_an_impostor_is_refused_on_every_connection(
    impostor: str, refusal: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trusted = authority(tmp_path, "trusted-ca")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(trusted.bundle))
    with tls_endpoint(tmp_path, trusted) as genuine:
        monkeypatch.setenv("AWS_ENDPOINT_URL", genuine)
        assert (
            RegionClients("us-east-1", janitor_session()).ec2.describe_images(Owners=["self"])["Images"] == []
        )
    if impostor == "another authority":
        endpoint = tls_endpoint(tmp_path, authority(tmp_path, "other-ca"))
    else:
        endpoint = tls_endpoint(tmp_path, trusted, host_name="ec2.us-east-1.amazonaws.com")
    with endpoint as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        ec2 = RegionClients("us-east-1", janitor_session()).ec2
        for _ in range(3):
            with pytest.raises(SSLError, match=refusal):
                ec2.describe_images(Owners=["self"])
