"""What the aggregator tells every region about one secure round, besides `RoundParams`.

Why a separate spec: `RoundParams` (signed by every region) carries only the ring width b and
the length d; the quantisation scale s, the per-region L∞ bound (cap × C) and the DP schedule
must travel too, and both sides must derive the SAME `Quantizer` from them, or the ring could
wrap. Both the ServerApp and the region's ClientApp import this module (it imports only numpy
and fedfsd.secagg), so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedfsd.secagg.errors import SecAggRefused
from fedfsd.secagg.quantize import Quantizer

STAGE_KEY = "secagg-stage"  # config key naming the stage of a secure-round message
STAGES = ("setup", "keys", "routed", "unmask")
PAYLOAD_KEY = "secagg-payload"  # config key holding the protocol message (bytes)
REPLY_KEY = "secagg"  # the ConfigRecord of a region's stage reply ("payload" or "refused_reason")
SPEC_PREFIX = "secagg-"
MIN_HONEST_FLOOR = 2  # the ring is sized for t = 2 shares: the most noise any region adds


def default_cap(vehicles_per_step: int) -> int:
    """A cap on the Poisson-sampled vehicles per region (≈ 12 standard deviations above the mean).

    The region clamps each coordinate of its clipped sum to ±cap·C; clamping is 1-Lipschitz, so
    one vehicle still moves the clamped sum by at most C in L2 and the DP analysis is unchanged.
    """
    return int(vehicles_per_step + math.ceil(12 * math.sqrt(vehicles_per_step)) + 10)


@dataclass(frozen=True)
class SecureRoundSpec:
    """The quantiser and DP schedule of one secure round, identical for every region."""

    scale: float
    cap: int
    clip_norm: float
    noise_multiplier: float
    vehicles_per_step: int
    frames_per_vehicle: int
    model: str

    @property
    def linf_bound(self) -> float:
        """Bound on one region's clipped-sum coordinates (cap vehicles, each at most C)."""
        return self.cap * self.clip_norm

    def summed_noise_std(self, n_regions: int) -> float:
        """Standard deviation of the summed noise in integer units, sized for the largest share
        (t = 2: μ_share = (σ s C)² / 2): R shares of variance μ sum to variance R·μ."""
        return (
            math.sqrt(n_regions / MIN_HONEST_FLOOR)
            * self.noise_multiplier
            * self.scale
            * (self.clip_norm)
        )

    def quantizer(self, n_regions: int) -> Quantizer:
        """The quantiser both sides use (smallest ring that cannot wrap for these bounds)."""
        return Quantizer.fitted(
            self.scale, self.linf_bound, n_regions, self.summed_noise_std(n_regions)
        )

    def sum_norm_bound(self, n_regions: int, dim: int) -> float:
        """The L2 norm the unmasked integer sum may have: R × (cap·C·s + √d rounding) plus the
        summed noise's norm (its std × (√d + 12), far in the chi tail)."""
        root = math.sqrt(dim)
        signal = n_regions * self.linf_bound * self.scale
        return signal + n_regions * root + self.summed_noise_std(n_regions) * (root + 12.0)

    def region_norm_bound(self, dim: int) -> float:
        """The L2 bound on one region's integer vector, decoded (÷ s): what a region checks and
        signs before masking, and R of them bound the sum (`sum_norm_bound(1, d) / s`)."""
        return self.sum_norm_bound(1, dim) / self.scale

    def to_config(self) -> dict[str, Any]:
        """Config-record entries (prefixed keys)."""
        return {f"{SPEC_PREFIX}{k.replace('_', '-')}": v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SecureRoundSpec:
        """The spec from a message's config; SecAggRefused when a key is missing or mistyped."""
        types = {
            "scale": float,
            "cap": int,
            "clip_norm": float,
            "noise_multiplier": float,
            "vehicles_per_step": int,
            "frames_per_vehicle": int,
            "model": str,
        }
        vals: dict[str, Any] = {}
        for name, typ in types.items():
            key = f"{SPEC_PREFIX}{name.replace('_', '-')}"
            v = cfg.get(key)
            if isinstance(v, bool) or v is None:
                raise SecAggRefused(f"secure round: {key} missing")
            if typ is float and isinstance(v, int):
                v = float(v)
            if not isinstance(v, typ):
                raise SecAggRefused(f"secure round: {key} is not a {typ.__name__}")
            vals[name] = v
        spec = cls(**vals)
        if not (
            spec.scale > 0
            and math.isfinite(spec.scale)
            and spec.clip_norm > 0
            and spec.noise_multiplier > 0
            and spec.vehicles_per_step >= 1
            and spec.cap >= spec.vehicles_per_step
            and spec.frames_per_vehicle >= 1
        ):
            raise SecAggRefused("secure round: out-of-range quantiser or schedule values")
        return spec


def masked_digest(vector: bytes) -> str:
    """sha256 (hex) of a masked vector's wire bytes: what the region's signed manifest names."""
    return hashlib.sha256(vector).hexdigest()


def flatten(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The model as one float64 vector, layers in sorted-name order (both sides agree)."""
    if not weights:
        return np.zeros(0)
    return np.concatenate([np.asarray(weights[k], np.float64).ravel() for k in sorted(weights)])


def unflatten(vec: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`vec` cut back into `like`'s layers (sorted-name order), in each layer's dtype."""
    out: dict[str, np.ndarray] = {}
    i = 0
    for k in sorted(like):
        ref = np.asarray(like[k])
        out[k] = vec[i : i + ref.size].reshape(ref.shape).astype(ref.dtype)
        i += ref.size
    if i != vec.size:
        raise ValueError(f"unflatten: {vec.size} values for a model of {i}")
    return out
