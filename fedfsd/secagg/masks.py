"""Pairwise and self masks: a PRG expanding a 32-byte seed to a vector in Z_{2^b}.

Why AES-256-CTR: it is a standard PRG in `cryptography`, fast (AES-NI) and deterministic, so the
aggregator regenerates exactly the mask a region added. Because 2^b divides 2^64, masking 64-bit
keystream words to b bits keeps them uniform. The pairwise seed comes from X25519 + HKDF with the
round in the info, so the same two regions get unrelated masks in every round.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedfsd.secagg.keys import derive_key, pair_info, x25519_public
from fedfsd.secagg.quantize import ring_mask


def prg(seed: bytes, dim: int, bit_width: int) -> np.ndarray:
    """`dim` uniform elements of Z_{2^b} (uint64) from a 32-byte seed."""
    if len(seed) != 32:
        raise ValueError("prg: the seed must be 32 bytes")
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = enc.update(bytes(8 * dim)) + enc.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64) & ring_mask(bit_width)


def pairwise_seed(
    own_mask_sk: X25519PrivateKey, peer_mask_pk: bytes, round_tag: bytes, me: str, peer: str
) -> bytes:
    """The seed `me` and `peer` both derive for their pairwise mask this round."""
    secret = own_mask_sk.exchange(x25519_public(peer_mask_pk))
    return derive_key(secret, pair_info(b"mask", round_tag, me, peer))


def pair_sign(me: str, peer: str) -> int:
    """+1 if `me` adds the pair's mask, -1 if it subtracts it (by name order), so they cancel."""
    if me == peer:
        raise ValueError("pair_sign: a region has no pairwise mask with itself")
    return 1 if me < peer else -1


def ring_add(a: np.ndarray, b: np.ndarray, bit_width: int, sign: int = 1) -> np.ndarray:
    """a + sign·b in Z_{2^b} (uint64 wraps mod 2^64; masking reduces to 2^b)."""
    out = a + b if sign > 0 else a - b
    return out & ring_mask(bit_width)
