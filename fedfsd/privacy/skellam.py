"""Integer noise shares for distributed DP under secure aggregation (issue 15).

In `distributed` trust mode a region adds only a *share* of the noise to its quantised update;
the aggregator sees the sum of all regions' masked inputs, so the noise it sees is the sum of the
shares. Why Skellam (the difference of two independent Poisson(μ/2) draws, mean 0, variance μ)
and not the discrete Gaussian: Skellam is closed under addition, so t independent shares of
variance μ_share sum to *exactly* Skellam(t·μ_share), and the accounting of the sum is the
accounting of one Skellam mechanism (Agarwal, Kairouz & Liu, NeurIPS 2021). A sum of discrete
Gaussians is not a discrete Gaussian. Poisson samplers ship with numpy, so there is no hand-written
sampler to get wrong.

Quantisation (done by the secure-aggregation code, fedfsd.secagg) maps the region's clipped
gradient sum x to z = round(s·x). Rounding moves every coordinate by less than 1 between two
neighbouring datasets (deterministic rounding: |error| ≤ 1/2 each side; randomised rounding
floor(y + U) with a shared uniform U: the coupled outputs differ by < |Δy| + 1), so one vehicle
changes z by at most Δ2 = s·C + √d in L2 and Δ1 = √d·Δ2 = s·C·√d + d in L1 (Cauchy-Schwarz).
`inflated_sensitivities` returns these; the accounting uses them, never the unrounded s·C.
"""

from __future__ import annotations

import math

import numpy as np

from fedfsd.errors import InputError

# Largest relative inflation of the L2 sensitivity by rounding that `choose_scale` aims for:
# √d ≤ ROUNDING_SHARE · s · C, so rounding costs at most ~1% more noise for the same ε.
ROUNDING_SHARE = 0.01


class DistributedNoiseError(InputError, ValueError):
    """Parameters that cannot give a valid noise share (non-positive, non-finite, t < 2)."""


def _positive(name: str, v: float) -> float:
    if not (math.isfinite(v) and v > 0):
        raise DistributedNoiseError(f"{name} must be finite and > 0, got {v}")
    return float(v)


def share_variance(
    noise_multiplier: float, scale: float, clip_norm: float, min_honest: int
) -> float:
    """μ_share = (σ·s·C)² / t: any t honest shares sum to Skellam with variance ≥ (σ·s·C)²."""
    _positive("noise_multiplier", noise_multiplier)
    _positive("scale", scale)
    _positive("clip_norm", clip_norm)
    if min_honest < 1:
        raise DistributedNoiseError(f"min_honest_regions must be ≥ 1, got {min_honest}")
    return (noise_multiplier * scale * clip_norm) ** 2 / min_honest


def sample_skellam(
    variance: float, shape: int | tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """Skellam noise of the given variance: Poisson(μ/2) − Poisson(μ/2), int64.

    `rng` must be a fresh OS-seeded Generator in production (`np.random.default_rng()`); a seeded
    one is for tests only (the ledger records which was used)."""
    _positive("variance", variance)
    half = variance / 2.0
    return rng.poisson(half, size=shape).astype(np.int64) - rng.poisson(half, size=shape).astype(
        np.int64
    )


def inflated_sensitivities(scale: float, clip_norm: float, dim: int) -> tuple[float, float]:
    """(Δ1, Δ2) of one vehicle on the rounded integer vector z = round(s·x) (module doc)."""
    _positive("scale", scale)
    _positive("clip_norm", clip_norm)
    if dim < 1:
        raise DistributedNoiseError(f"dimension must be ≥ 1, got {dim}")
    root = math.sqrt(dim)
    l2 = scale * clip_norm + root
    l1 = scale * clip_norm * root + dim
    return l1, l2


def choose_scale(clip_norm: float, dim: int, rounding_share: float = ROUNDING_SHARE) -> float:
    """Smallest s with √d ≤ rounding_share · s · C (rounding inflates Δ2 by ≤ rounding_share)."""
    _positive("clip_norm", clip_norm)
    _positive("rounding_share", rounding_share)
    if dim < 1:
        raise DistributedNoiseError(f"dimension must be ≥ 1, got {dim}")
    return math.sqrt(dim) / (rounding_share * clip_norm)


def required_bits(
    *,
    regions: int,
    vehicles_cap: int,
    clip_norm: float,
    scale: float,
    total_variance: float,
    tail_sds: float = 12.0,
) -> int:
    """Bit width b so the modular sum cannot wrap (design note): Σ_r (cap·C·s + 1) plus
    `tail_sds` standard deviations of the summed noise stays below 2^(b−1)."""
    bound = regions * (vehicles_cap * clip_norm * scale + 1) + tail_sds * math.sqrt(total_variance)
    return int(math.floor(math.log2(bound))) + 2
