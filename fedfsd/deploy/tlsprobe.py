"""Say why a region cannot trust the SuperLink's certificate, before waiting for it.

Why: when the address a region dials is not among the SuperLink certificate's SANs (or the
certificate is not signed by the region's CA), gRPC retries the handshake silently and the
region reports a 120 s timeout that never mentions the certificate. One TLS handshake with
Python's `ssl` against the same address and CA names the problem in a second.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path


def _peer_sans(host: str, port: int, timeout: float) -> list[str]:
    """The SANs of the certificate the server presents (read without trusting it)."""
    from cryptography import x509

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        return []
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


def tls_problem(address: str, ca: str | Path, timeout: float = 10.0) -> str | None:
    """One line naming a certificate problem at `address` (HOST:PORT), or None.

    None also when the SuperLink cannot be reached yet: a region may start before it, and the
    SuperNode keeps retrying; only a certificate that can never be trusted is reported.
    """
    host, _, port_s = address.rpartition(":")
    host = host.strip("[]")
    port = int(port_s)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])  # what gRPC offers
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host),
        ):
            return None
    except ssl.SSLCertVerificationError as err:
        if err.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH
            try:
                sans = _peer_sans(host, port, timeout)
            except (OSError, ValueError):
                sans = []
            return (
                f"the SuperLink certificate at {address} is not valid for {host!r}: its SANs "
                f"are {sans}; dial one of those names, or re-create the certificate with "
                f"--san {host}"
            )
        return (
            f"the SuperLink certificate at {address} does not verify against {ca}: "
            f"{err.verify_message}"
        )
    except ssl.SSLError as err:
        return f"TLS handshake with the SuperLink at {address} failed: {err.reason or err}"
    except (OSError, ValueError):
        return None
