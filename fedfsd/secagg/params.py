"""The parameters of one secure-aggregation round, fixed by the aggregator at setup.

Every region signs a digest of these (`RoundParams.tag`) inside its advertisement, and the
AES-GCM associated data and HKDF info carry it too: a region given different parameters than its
peers, or a message from another run or round, fails to verify.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import msgpack

from fedfsd.secagg.errors import SecAggConfigError, SecAggRefused
from fedfsd.secagg.messages import field, str_list
from fedfsd.secagg.quantize import MAX_BITS, MIN_BITS

PROTOCOL = "fedfsd-secagg-v1"


@dataclass(frozen=True)
class RoundParams:
    """run id, round, sorted participants, Shamir threshold t, ring width b, vector length d.

    Why t > n/2: a malicious aggregator could tell one half of the regions that region u dropped
    (collecting shares of u's mask key) and the other half that u survived (collecting shares of
    its self mask), then unmask u alone; with t > n/2 the two halves cannot both reach t.
    Why t >= 2: with t = 1 a single survivor's "sum" is its own vector.
    """

    run_id: str
    round: int
    participants: tuple[str, ...]
    threshold: int
    bit_width: int
    dim: int

    def __post_init__(self) -> None:
        p = self.participants
        if not self.run_id or self.round < 0 or self.dim < 1:
            raise SecAggConfigError("secagg params: need a run id, round >= 0 and dim >= 1")
        if len(p) < 2 or list(p) != sorted(set(p)) or not all(p):
            raise SecAggConfigError("secagg params: need >= 2 distinct participants, sorted")
        n, t = len(p), self.threshold
        if not (2 <= t <= n and 2 * t > n):
            raise SecAggConfigError(
                f"secagg params: threshold {t} with {n} participants (need 2 <= t <= n, t > n/2)"
            )
        if not MIN_BITS <= self.bit_width <= MAX_BITS:
            raise SecAggConfigError(f"secagg params: bit width outside [{MIN_BITS}, {MAX_BITS}]")

    def body(self) -> dict[str, Any]:
        """The parameters as a message body."""
        return {
            "protocol": PROTOCOL,
            "run_id": self.run_id,
            "round": self.round,
            "participants": list(self.participants),
            "threshold": self.threshold,
            "bit_width": self.bit_width,
            "dim": self.dim,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> RoundParams:
        """Parameters from a setup message; SecAggRefused for a malformed or unsafe one."""
        if body.get("protocol") != PROTOCOL:
            raise SecAggRefused(f"setup: not a {PROTOCOL} round")
        try:
            return cls(
                run_id=field(body, "run_id", str),
                round=field(body, "round", int),
                participants=tuple(str_list(body, "participants")),
                threshold=field(body, "threshold", int),
                bit_width=field(body, "bit_width", int),
                dim=field(body, "dim", int),
            )
        except SecAggConfigError as e:
            raise SecAggRefused(f"setup: {e}") from None

    @cached_property
    def tag(self) -> bytes:
        """SHA-256 over the canonical parameters: what signatures, AAD and HKDF info bind."""
        return hashlib.sha256(msgpack.packb(self.body(), use_bin_type=True)).digest()

    def index(self, region: str) -> int:
        """The region's Shamir share index: its 1-based position among the participants."""
        return self.participants.index(region) + 1

    @property
    def wire_dtype(self) -> str:
        """Masked vectors travel as little-endian uint32 when b <= 32 (half the bytes)."""
        return "<u4" if self.bit_width <= 32 else "<u8"
