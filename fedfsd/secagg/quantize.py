"""Float vectors to integers in Z_{2^b} and the summed ring element back to floats.

Why integers: masks cancel exactly only in a finite ring, and distributed noise (Skellam) is an
integer noise. Why the overflow analysis: the aggregator only ever sees the sum mod 2^b; if the
true signed sum leaves [-2^(b-1), 2^(b-1)) it wraps silently into a wrong but plausible model
step. `choose_bit_width` picks b so that it cannot, and `Quantizer.encode` refuses an input that
breaks the bound the width was chosen for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedfsd.secagg.errors import SecAggConfigError

MIN_BITS = 8
MAX_BITS = 64
DEFAULT_TAIL_SIGMAS = 12.0  # P(|N| > 12 σ) < 1e-32: the summed noise never reaches the edge


def sum_bound(
    linf_bound: float,
    n_regions: int,
    scale: float,
    noise_std: float = 0.0,
    tail_sigmas: float = DEFAULT_TAIL_SIGMAS,
) -> float:
    """The largest |coordinate| the signed integer sum can take (the design note's analysis).

    Each region's quantised coordinate is at most `linf_bound`·s + 1 (rounding adds at most 1);
    R regions add up; the summed noise (standard deviation `noise_std`, in integer units) stays
    within `tail_sigmas` standard deviations.
    """
    if not (linf_bound >= 0 and scale > 0 and n_regions >= 1 and noise_std >= 0):
        raise SecAggConfigError(
            "bit width: need linf_bound >= 0, scale > 0, n_regions >= 1, noise_std >= 0"
        )
    return n_regions * (linf_bound * scale + 1.0) + tail_sigmas * noise_std


def choose_bit_width(
    linf_bound: float,
    n_regions: int,
    scale: float,
    noise_std: float = 0.0,
    tail_sigmas: float = DEFAULT_TAIL_SIGMAS,
    min_bits: int = 16,
) -> int:
    """The smallest b (>= `min_bits`) with `sum_bound(...)` < 2^(b-1), or SecAggConfigError.

    `noise_std` is the standard deviation of the SUMMED integer noise (for R Skellam shares of
    variance μ each: sqrt(R·μ)); `linf_bound` bounds one region's float vector before scaling.
    """
    bound = sum_bound(linf_bound, n_regions, scale, noise_std, tail_sigmas)
    if not math.isfinite(bound):
        raise SecAggConfigError("bit width: the sum bound is not finite")
    b = max(min_bits, math.ceil(bound).bit_length() + 1)  # 2^(b-1) > ceil(bound) >= bound
    if b > MAX_BITS:
        raise SecAggConfigError(
            f"bit width: the sum can reach {bound:.3g} in integer units, more than a 64-bit ring "
            "holds; lower the scale or the per-region bound"
        )
    return b


def ring_mask(bit_width: int) -> np.uint64:
    """2^b - 1 as uint64 (all ones for b = 64)."""
    return np.uint64((1 << bit_width) - 1)


def to_ring(z: np.ndarray, bit_width: int) -> np.ndarray:
    """Signed integers -> uint64 representatives in [0, 2^b) (two's complement, then masked)."""
    if not np.issubdtype(z.dtype, np.integer):
        raise SecAggConfigError(f"to_ring: integer input required, got {z.dtype}")
    return z.astype(np.int64).view(np.uint64) & ring_mask(bit_width)


def from_ring(v: np.ndarray, bit_width: int) -> np.ndarray:
    """uint64 ring elements -> signed int64 in [-2^(b-1), 2^(b-1))."""
    v = np.asarray(v, dtype=np.uint64) & ring_mask(bit_width)
    if bit_width == 64:
        return v.view(np.int64)
    s = v.astype(np.int64)
    return np.where(s >= (1 << (bit_width - 1)), s - (1 << bit_width), s)


@dataclass(frozen=True)
class Quantizer:
    """Scale s, ring width b and the per-region L∞ bound the width was chosen for.

    A frozen dataclass, not pydantic: a bad width must raise SecAggConfigError itself (pydantic
    would wrap it in a ValidationError).
    """

    scale: float
    bit_width: int
    linf_bound: float
    n_regions: int
    noise_std: float = 0.0
    tail_sigmas: float = DEFAULT_TAIL_SIGMAS

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bit_width <= MAX_BITS:
            raise SecAggConfigError(f"bit width {self.bit_width} outside [{MIN_BITS}, {MAX_BITS}]")
        if not (math.isfinite(self.scale) and math.isfinite(self.linf_bound)):
            raise SecAggConfigError("quantizer: scale and bound must be finite")
        if not math.isfinite(self.noise_std) or self.tail_sigmas <= 0:
            raise SecAggConfigError("quantizer: noise_std must be finite, tail_sigmas > 0")
        bound = sum_bound(
            self.linf_bound, self.n_regions, self.scale, self.noise_std, self.tail_sigmas
        )
        if not bound < 2.0 ** (self.bit_width - 1):
            raise SecAggConfigError(
                f"a {self.bit_width}-bit ring overflows: the summed integers can reach "
                f"{bound:.3g} >= 2^{self.bit_width - 1} (choose_bit_width gives "
                "the smallest safe width)"
            )

    @classmethod
    def fitted(
        cls,
        scale: float,
        linf_bound: float,
        n_regions: int,
        noise_std: float = 0.0,
        tail_sigmas: float = DEFAULT_TAIL_SIGMAS,
    ) -> Quantizer:
        """The quantizer with the smallest safe bit width for these bounds."""
        b = choose_bit_width(linf_bound, n_regions, scale, noise_std, tail_sigmas)
        return cls(
            scale=scale,
            bit_width=b,
            linf_bound=linf_bound,
            n_regions=n_regions,
            noise_std=noise_std,
            tail_sigmas=tail_sigmas,
        )

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """round(s·x) as int64: randomised (unbiased) rounding with `rng`, else to nearest.

        Refuses a non-finite x or one with |x|∞ above `linf_bound` (the width would not hold).
        """
        x = np.asarray(x, dtype=np.float64).ravel()
        if not np.all(np.isfinite(x)):
            raise SecAggConfigError("quantize: the vector has a non-finite coordinate")
        top = float(np.max(np.abs(x))) if x.size else 0.0
        if top > self.linf_bound:
            raise SecAggConfigError(
                f"quantize: |x|∞ = {top:.6g} exceeds the bound {self.linf_bound:.6g} "
                "the bit width was chosen for"
            )
        y = x * self.scale
        if rng is None:
            return np.rint(y).astype(np.int64)
        low = np.floor(y)
        return (low + (rng.random(y.shape) < (y - low))).astype(np.int64)

    def to_ring(self, z: np.ndarray) -> np.ndarray:
        """Signed integers (quantised vector plus integer noise) into Z_{2^b}."""
        return to_ring(z, self.bit_width)

    def decode_sum(self, ring_sum: np.ndarray, divisor: float = 1.0) -> np.ndarray:
        """The unmasked ring sum as floats: signed, divided by s and by `divisor`."""
        return from_ring(ring_sum, self.bit_width).astype(np.float64) / (self.scale * divisor)
