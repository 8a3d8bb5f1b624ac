"""Per-round key pairs, signed advertisements, and the AES-GCM channel for Shamir shares.

Why two X25519 pairs per round: the share channel key encrypts the shares a region deals; the mask
key derives its pairwise masks. Only the mask secret key is Shamir-shared, so reconstructing it
for a dropped region never opens the channel that carried its shares. Why signatures: the
aggregator relays every message; without a signature under the region's long-term Ed25519 key
(fedfsd.privacy.signing's ledger key, whose public half the peers hold) it could hand each region
its own keys and read every share. Keys are fresh each round, so one round's secrets say nothing
about another's.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedfsd.secagg.errors import SecAggRefused

DOMAIN = b"fedfsd-secagg-v1"
NONCE = 12


def raw_public(key: X25519PrivateKey) -> bytes:
    """The 32-byte public key of an X25519 private key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def raw_private(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of an X25519 private key (what is Shamir-shared for the mask key)."""
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def x25519_public(raw: bytes) -> X25519PublicKey:
    """An X25519 public key from 32 bytes; refused otherwise."""
    try:
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise SecAggRefused("not a 32-byte X25519 public key") from None


@dataclass
class RoundKeys:
    """A region's secrets for one round: two X25519 keys and the self-mask seed."""

    share_sk: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    mask_sk: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    self_seed: bytes = field(default_factory=lambda: os.urandom(32))


def seed_commitment(round_tag: bytes, region: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed (the seed has 256 random bits, so it hides it).

    The aggregator checks a reconstructed seed against it before using it.
    """
    return hashlib.sha256(b"|".join([DOMAIN, b"seed", round_tag, region.encode(), seed])).digest()


def _statement(*parts: object) -> bytes:
    return msgpack.packb([DOMAIN, *parts], use_bin_type=True)


def advertisement_statement(
    round_tag: bytes, region: str, share_pk: bytes, mask_pk: bytes, commitment: bytes
) -> bytes:
    """The bytes a region signs for its advertisement; `round_tag` binds the round's params."""
    return _statement("advertise", round_tag, region, share_pk, mask_pk, commitment)


def share_statement(round_tag: bytes, kind: str, owner: str, holder: str, share: bytes) -> bytes:
    """The bytes a dealer signs for one share it gives `holder` ("seed" or "mask-key")."""
    return _statement("share", round_tag, kind, owner, holder, share)


def sign(key: Ed25519PrivateKey, statement: bytes) -> bytes:
    return key.sign(statement)


def check_signature(key: Ed25519PublicKey, statement: bytes, signature: bytes, what: str) -> None:
    """Raise SecAggRefused unless `signature` is `key`'s over `statement`."""
    try:
        key.verify(signature, statement)
    except (InvalidSignature, ValueError, TypeError):
        raise SecAggRefused(f"{what}: bad signature") from None


def derive_key(secret: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 to 32 bytes (no salt: the X25519 secret is already uniform per round)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def pair_info(purpose: bytes, round_tag: bytes, a: str, b: str) -> bytes:
    """HKDF info for a pair of regions: purpose, round and the unordered pair (both sides agree)."""
    lo, hi = sorted((a, b))
    return _statement(purpose, round_tag, lo, hi)


def channel_key(
    own: X25519PrivateKey, peer_pk: bytes, round_tag: bytes, me: str, peer: str
) -> bytes:
    """The AES-256-GCM key two regions share for this round's Shamir shares."""
    return derive_key(
        own.exchange(x25519_public(peer_pk)), pair_info(b"channel", round_tag, me, peer)
    )


def share_aad(round_tag: bytes, sender: str, recipient: str) -> bytes:
    """Associated data: round (run id, round, params), stage, sender and recipient.

    A ciphertext replayed into another round or redirected to another region fails to decrypt.
    """
    return _statement("aad", round_tag, "shares", sender, recipient)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """nonce || AES-GCM(plaintext) with `aad` authenticated."""
    nonce = os.urandom(NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes, what: str) -> bytes:
    """The plaintext, or SecAggRefused for a tampered, replayed or redirected ciphertext."""
    if len(blob) < NONCE + 16:
        raise SecAggRefused(f"{what}: ciphertext too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE], blob[NONCE:], aad)
    except InvalidTag:
        raise SecAggRefused(
            f"{what}: ciphertext does not authenticate (tampered or replayed)"
        ) from None
