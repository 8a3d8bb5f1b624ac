"""Region signing keys: one dedicated Ed25519 key per region, used for the ledger and manifests.

Why a dedicated key and not the SuperNode's EC key: the SuperNode key authenticates a connection
to Flower and is rotated with the deployment; the ledger key must outlive it, because a reviewer
checks old ledger lines and receipts against it. The private key stays in the region (mode 0600,
written atomically, never through a symlink); its public half reaches the global team out of
band, like the SuperNode key registration (docs/deploy.md, "Region signing keys").

Only the standard library, `cryptography` and `fedfsd.wire` are imported here, so the aggregator
can verify signatures without touching the data or training code.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedfsd.durable import fsync_dir
from fedfsd.errors import InputError

# The manifest fields a region's signature covers, in this order (docs/contracts.md).
SIGNED_MANIFEST_FIELDS = (
    "schema",
    "region",
    "fleet_id",
    "run_id",
    "round",
    "sha256",
    "update_norm",
    "update_norm_bound",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "frames_per_vehicle",
    "clip_norm",
    "epsilon",
    "epsilon_rdp",
    "epsilon_budget",
    "delta",
    "ledger_id",
    "ledger_seq",
    "ledger_head",
)
# Also signed when `trust_model` is set: a secure round's manifest (fedfsd.region.secure_release).
# Plain manifests leave it empty and sign exactly SIGNED_MANIFEST_FIELDS, as before.
SECURE_MANIFEST_FIELDS = (
    "trust_model",
    "epsilon_distributed",
    "epsilon_own_noise",
    "masked_sha256",
)


class SigningKeyError(InputError, ValueError):
    """A key file or key mapping that cannot be used; the message names the file."""


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)  # ε of a non-private release is ∞: "inf" in the signed bytes
    if isinstance(v, Mapping):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: sorted-key compact JSON (floats as Python's repr)."""
    return json.dumps(_finite(obj), sort_keys=True, separators=(",", ":")).encode()


def write_private_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 whatever was there (temp file, fsync, rename).

    The rename replaces a symlink at `path` instead of writing through it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def public_hex(key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key as hex: what receipts and the ledger header carry."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def generate_key(path: str | Path, *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Create an Ed25519 private key at `path` (PEM, 0600) and its public key at `path`.pub."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SigningKeyError(f"{path}: a key already exists (refusing to replace a ledger key)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(path, pem)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path = public_path(path)
    pub_path.write_bytes(pub)
    return key


def ledger_key_path(ledger_path: str | Path) -> Path:
    """Where a region's signing key lives by default: next to its ledger, `<ledger>.key`."""
    p = Path(ledger_path)
    return p.with_name(p.name + ".key")


def public_path(private_path: str | Path) -> Path:
    p = Path(private_path)
    return p.with_name(p.name + ".pub")


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Load a region's Ed25519 private key; refuses other key types and loose file modes."""
    path = Path(path)
    try:
        st = os.stat(path, follow_symlinks=False)
        if st.st_mode & 0o077:
            mode = oct(st.st_mode & 0o777)
            raise SigningKeyError(f"{path}: private key mode {mode} (must be 0600)")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        if isinstance(e, SigningKeyError):
            raise
        raise SigningKeyError(f"{path}: cannot load the region signing key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: not an Ed25519 private key")
    return key


def load_or_create_key(path: str | Path) -> Ed25519PrivateKey:
    """The key at `path`, created on first use (the default key next to a region's ledger)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return generate_key(path)
    return load_private_key(path)


def parse_public_key(text: str, where: str = "public key") -> Ed25519PublicKey:
    """An Ed25519 public key from PEM or 64 hex characters (raw 32 bytes)."""
    t = text.strip()
    try:
        if t.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(t.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise SigningKeyError(f"{where}: not an Ed25519 public key")
            return key
        raw = bytes.fromhex(t)
        if len(raw) != 32:
            raise ValueError("expected 32 bytes")
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError) as e:
        if isinstance(e, SigningKeyError):
            raise
        raise SigningKeyError(f"{where}: not a PEM or 64-hex Ed25519 public key ({e})") from None


def load_region_keys(path: str | Path) -> dict[str, Ed25519PublicKey]:
    """The aggregator's mapping region → public key, from a JSON or TOML file.

    Values are PEM text, 64 hex characters, or a path (relative to the file) of a PEM file.
    """
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as e:
        raise SigningKeyError(f"{path}: cannot read the region keys ({e})") from None
    if not isinstance(data, dict) or not data:
        raise SigningKeyError(f"{path}: expected a non-empty mapping region -> public key")
    keys: dict[str, Ed25519PublicKey] = {}
    for region, value in data.items():
        if not isinstance(value, str):
            raise SigningKeyError(f"{path}: region {region!r}: the key must be a string")
        v = value.strip()
        if not v.startswith("-----BEGIN") and not _is_hex64(v):
            f = (path.parent / v).resolve()
            try:
                v = f.read_text()
            except OSError as e:
                raise SigningKeyError(f"{path}: region {region!r}: cannot read {f} ({e})") from None
        keys[str(region)] = parse_public_key(v, f"{path}: region {region!r}")
    return keys


def _is_hex64(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdefABCDEF" for c in s)


def sign(key: Ed25519PrivateKey, payload: Mapping[str, Any]) -> str:
    """Hex Ed25519 signature over `canonical(payload)`."""
    return key.sign(canonical(payload)).hex()


def verify(key: Ed25519PublicKey, payload: Mapping[str, Any], signature: str) -> bool:
    """True when `signature` (hex) is `key`'s signature over `canonical(payload)`."""
    try:
        key.verify(bytes.fromhex(signature), canonical(payload))
    except (InvalidSignature, ValueError):
        return False
    return True


def manifest_payload(manifest: Any) -> dict[str, Any]:
    """The signed part of an `UpdateManifest` (protobuf message or its JSON dict)."""
    get = manifest.get if isinstance(manifest, Mapping) else lambda k: getattr(manifest, k, None)
    fields = SIGNED_MANIFEST_FIELDS + (SECURE_MANIFEST_FIELDS if get("trust_model") else ())
    return {k: get(k) for k in fields}
