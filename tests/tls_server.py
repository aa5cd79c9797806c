"""A TLS endpoint on loopback answering EC2's DescribeImages, its certificate signed by a CA made for
the test, and a second CA that signed nothing it serves. Each answer closes its connection, so that
each call opens a new one (and a TLS context would load its CA bundle again)."""

from __future__ import annotations

import ipaddress
import ssl
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DESCRIBE_IMAGES = (
    b'<DescribeImagesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
    b"<requestId>tls</requestId><imagesSet/></DescribeImagesResponse>"
)


@dataclass(frozen=True)
class Authority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    bundle: Path  # its certificate, PEM: what AWS_CA_BUNDLE names


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _signed(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: Authority | None, names: list[x509.GeneralName]
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.certificate.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer.key if issuer else key, hashes.SHA256())


def authority(directory: Path, name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _signed(name, key, None, [])
    bundle = directory / f"{name}.pem"
    bundle.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Authority(key, certificate, bundle)


class _Answer(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(DESCRIBE_IMAGES)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(DESCRIBE_IMAGES)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that refuses the certificate drops the connection: what the tests expect of it, not
        # a traceback in their output. Any other error is printed as the standard server prints it.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@contextmanager
def _serving(context: ssl.SSLContext | None) -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Answer)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if context else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def tls_endpoint(directory: Path, signer: Authority, host_name: str = "127.0.0.1") -> Iterator[str]:
    """An https URL on loopback whose certificate `signer` signed for `host_name` (an IP address or a
    DNS name); the server stops when the block ends."""
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(host_name))]
    except ValueError:
        names = [x509.DNSName(host_name)]
    certificate = _signed(host_name, key, signer, names)
    chain = directory / f"server-{host_name}-{signer.bundle.stem}.pem"
    chain.write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    with _serving(context) as url:
        yield url


@contextmanager
def http_endpoint() -> Iterator[str]:
    """The same answers over plain http (as the emulator's)."""
    with _serving(None) as url:
        yield url
