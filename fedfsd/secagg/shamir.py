"""Shamir t-of-n sharing of a region's 32-byte secrets (self-mask seed, mask secret key).

pycryptodome's `Crypto.Protocol.SecretSharing.Shamir` (a public, maintained API; Flower 1.39's
own secure-aggregation module uses it too, but that module is not public Flower API) shares
16-byte blocks over GF(2^128); a 32-byte secret is two blocks shared with the same indices.
Share index i belongs to the i-th participant (1-based, in the round's sorted participant list).
"""

from __future__ import annotations

from collections.abc import Mapping

from Crypto.Protocol.SecretSharing import Shamir

BLOCK = 16


def split(secret: bytes, threshold: int, n: int) -> dict[int, bytes]:
    """index -> share (len(secret) bytes) for indices 1..n; any `threshold` recover the secret."""
    if len(secret) % BLOCK or not secret:
        raise ValueError("shamir: the secret must be a non-empty multiple of 16 bytes")
    if not 1 <= threshold <= n:
        raise ValueError("shamir: need 1 <= threshold <= n")
    shares: dict[int, bytes] = {i: b"" for i in range(1, n + 1)}
    for off in range(0, len(secret), BLOCK):
        for idx, part in Shamir.split(threshold, n, secret[off : off + BLOCK], False):
            shares[idx] += part
    return shares


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from exactly `threshold` of the shares (the lowest indices given)."""
    chosen = sorted(shares.items())[:threshold]
    if len(chosen) < threshold:
        raise ValueError(f"shamir: {len(chosen)} shares, {threshold} needed")
    size = len(chosen[0][1])
    if size % BLOCK or any(len(s) != size for _, s in chosen):
        raise ValueError("shamir: shares of different or invalid sizes")
    out = b""
    for off in range(0, size, BLOCK):
        out += Shamir.combine([(i, s[off : off + BLOCK]) for i, s in chosen], False)
    return out
