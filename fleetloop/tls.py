"""TLS material for fleetloop: a local CA and certificates (``fleetloop certs init``), and the gRPC
credentials built from them.

``init_certs(DIR, hosts)`` writes ``ca.pem``/``ca.key`` (a self-signed CA, 10 years),
``server.pem``/``server.key`` (for the learner's gRPC server and the API's HTTPS; subjectAltName =
``hosts``), and ``client.pem``/``client.key`` (for robots when the learner requires client
certificates). Private keys are written with mode 0600. Existing files are never overwritten
unless ``force``. In production the Helm chart takes these from Kubernetes Secrets instead.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from fleetloop.errors import FailedPrecondition, InvalidArgument


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(hosts: list[str]):
    from cryptography import x509
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not h or any(c.isspace() for c in h):
                raise InvalidArgument(f"host {h!r} is not a DNS name or IP address", field="hosts", value=h) from None
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def init_certs(out: Path, hosts: list[str], force: bool = False, days: int = 825) -> dict[str, Path]:
    """Create a CA and server/client certificates under ``out``; returns the file paths by role."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {n: out / n for n in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")}
    existing = [str(p) for p in files.values() if p.exists()]
    if existing and not force:
        raise FailedPrecondition(f"certificates exist already ({', '.join(existing)}); use --force to replace them",
                                 field="out", value=str(out))
    if not hosts:
        raise InvalidArgument("at least one host name or IP is needed for the server certificate", field="hosts", value=hosts)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetloop local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage, san) -> tuple[bytes, bytes]:
        key = _key()
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san is not None:
            b = b.add_extension(san, critical=False)
        return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), _pem_key(key)

    server_pem, server_key = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, _san(hosts))
    client_pem, client_key = leaf("fleetloop robot", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    _write(files["ca.pem"], ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files["ca.key"], _pem_key(ca_key), private=True)
    _write(files["server.pem"], server_pem, private=False)
    _write(files["server.key"], server_key, private=True)
    _write(files["client.pem"], client_pem, private=False)
    _write(files["client.key"], client_key, private=True)
    return files


def server_credentials(cert_file: Path, key_file: Path, client_ca_file: Path | None = None):
    """gRPC server credentials; with ``client_ca_file`` clients must present a certificate it signed."""
    import grpc
    pair = [(Path(key_file).read_bytes(), Path(cert_file).read_bytes())]
    if client_ca_file is not None:
        return grpc.ssl_server_credentials(pair, root_certificates=Path(client_ca_file).read_bytes(),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def channel_credentials(ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None):
    """gRPC channel credentials trusting ``ca_file`` (None = system roots), with an optional client pair."""
    import grpc
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None)
