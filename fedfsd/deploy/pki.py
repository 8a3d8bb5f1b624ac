"""Throwaway PKI for a local or lab federation.

Why: the Fleet API must run over TLS with SuperNode authentication (DESIGN.md decision 9). This
module creates a CA, a SuperLink server certificate whose SANs cover every name a region dials,
and one EC key pair per region in the OpenSSH format that `flwr supernode register` and
`flower-supernode --auth-supernode-private-key` load. Production sites bring their own CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfsd.durable import write_atomic, write_private

_VALIDITY = dt.timedelta(days=30)


@dataclass(frozen=True)
class ServerPKI:
    """Paths of the CA and the SuperLink's certificate and key."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    """Paths of one region's SuperNode authentication key pair (OpenSSH format)."""

    private_key: Path
    public_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Key material: a new 0600 file renamed over `path` (an old file's mode or a symlink there
    never decides who can read the key or where it lands)."""
    write_private(path, data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses for the SubjectAlternativeName extension (deduplicated)."""
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in ["localhost", "127.0.0.1", "::1", *names]:
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def create_server_pki(out_dir: Path, names: list[str] | None = None) -> ServerPKI:
    """Create a CA and a SuperLink server certificate with SANs for localhost, 127.0.0.1, ::1
    and every extra DNS name or IP address in ``names``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfsd throwaway CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfsd-superlink")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_san_entries(list(names or []))), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = ServerPKI(
        ca_cert=out_dir / "ca.crt",
        ca_key=out_dir / "ca.key",
        server_cert=out_dir / "server.pem",
        server_key=out_dir / "server.key",
    )
    write_atomic(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.ca_key, _pem_key(ca_key))
    write_atomic(paths.server_cert, srv_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.server_key, _pem_key(srv_key))
    return paths


def create_node_keys(out_dir: Path, name: str) -> NodeKeys:
    """Create one region's P-384 key pair: ``<name>`` (OpenSSH private) and ``<name>.pub``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(private_key=out_dir / name, public_key=out_dir / f"{name}.pub")
    _write_private(
        keys.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    write_atomic(
        keys.public_key,
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" fedfsd-{name}\n".encode(),
    )
    return keys


def server_sans(cert_path: Path) -> list[str]:
    """The SubjectAlternativeName entries of a certificate, as strings (for checks and docs)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]
