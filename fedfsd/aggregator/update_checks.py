"""Checks every region update must pass before it counts (DESIGN.md decision 8).

Pure functions over numpy arrays and the parsed manifest, so they can be fuzzed without Flower.
`verify_update` returns `None` for an acceptable update or a short reason string that goes to
`rejected.jsonl`; it never raises on hostile input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedfsd.wire import MANIFEST_SCHEMA, UpdateManifest, array_digest, l2_norm

# Relative slack on the norm bound: the region clips in float32, we re-measure in float64.
NORM_RTOL = 1e-4
NORM_ATOL = 1e-6


@dataclass(frozen=True)
class Expectation:
    """What an acceptable update looks like in this round."""

    shapes: Mapping[str, tuple[int, ...]]  # the global model's state_dict names and shapes
    dtypes: Mapping[str, np.dtype]  # the global model's dtypes (float32)
    norm_bound: float  # the aggregator's own update-norm bound
    run_id: str
    round_idx: int

    @classmethod
    def from_weights(
        cls, weights: Mapping[str, np.ndarray], *, norm_bound: float, run_id: str, round_idx: int
    ) -> Expectation:
        """Derive names/shapes/dtypes from the global model sent this round."""
        return cls(
            shapes={k: tuple(np.shape(v)) for k, v in weights.items()},
            dtypes={k: np.asarray(v).dtype for k, v in weights.items()},
            norm_bound=float(norm_bound),
            run_id=str(run_id),
            round_idx=int(round_idx),
        )


def check_structure(update: Mapping[str, np.ndarray], exp: Expectation) -> str | None:
    """Names, shapes and dtypes equal the global model's; float only."""
    missing = sorted(set(exp.shapes) - set(update))
    extra = sorted(set(update) - set(exp.shapes))
    if missing or extra:
        return f"names differ from the global model: missing={missing[:5]} extra={extra[:5]}"
    for name in sorted(update):
        a = update[name]
        if not isinstance(a, np.ndarray):
            return f"{name}: not an array"
        if not np.issubdtype(a.dtype, np.floating):
            return f"{name}: dtype {a.dtype} is not float"
        if a.dtype != exp.dtypes[name]:
            return f"{name}: dtype {a.dtype} != {exp.dtypes[name]}"
        if tuple(a.shape) != tuple(exp.shapes[name]):
            return f"{name}: shape {tuple(a.shape)} != {tuple(exp.shapes[name])}"
    return None


def check_finite(update: Mapping[str, np.ndarray]) -> str | None:
    """Every value is finite (no NaN, no ±inf)."""
    for name in sorted(update):
        if not np.all(np.isfinite(update[name])):
            return f"{name}: contains NaN or inf"
    return None


def check_norm(update: Mapping[str, np.ndarray], bound: float) -> str | None:
    """Global L2 norm within the bound (with a small float32 tolerance)."""
    norm = l2_norm(update)
    if not math.isfinite(norm) or norm > bound * (1 + NORM_RTOL) + NORM_ATOL:
        return f"update norm {norm:.6g} exceeds bound {bound:.6g}"
    return None


def check_manifest(
    update: Mapping[str, np.ndarray], manifest: UpdateManifest, exp: Expectation
) -> str | None:
    """Schema, freshness (run id, round) and the digest over the arrays actually received.

    The digest hashes every name, dtype and shape, then every byte, in sorted name order: for
    the packed wire layout (which must be canonical to unpack at all) that is a hash of the
    layout and the packed buffer.
    """
    if manifest.schema != MANIFEST_SCHEMA:
        return (
            f"manifest schema {manifest.schema} is not {MANIFEST_SCHEMA} (one packed array + "
            "layout): the region runs an older fedfsd wire format"
        )
    if not manifest.region:
        return "manifest names no region"
    if manifest.run_id != exp.run_id:
        return f"wrong run: manifest run {manifest.run_id!r} != {exp.run_id!r}"
    if manifest.round != exp.round_idx:
        return f"stale round: manifest round {manifest.round} != current round {exp.round_idx}"
    if manifest.sha256 != array_digest(update):
        return "digest mismatch: manifest sha256 does not match the arrays received"
    return None


def verify_update(
    update: Mapping[str, np.ndarray], manifest: UpdateManifest | None, exp: Expectation
) -> str | None:
    """All checks in a fixed order; the first failure is the reason, None means accept."""
    if manifest is None:
        return "missing manifest"
    if manifest.refused_reason:
        return f"manifest marks the update refused: {manifest.refused_reason}"
    for reason in (
        check_structure(update, exp),
        check_finite(update),
        check_norm(update, exp.norm_bound),
        check_manifest(update, manifest, exp),
    ):
        if reason is not None:
            return reason
    return None
