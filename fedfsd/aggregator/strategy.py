"""FedAvg (optionally with server momentum) over the verified updates of one round.

Regions send updates (new − received), not weights, so averaging is done on updates directly:
Δ = Σ wᵢ Δᵢ / Σ wᵢ with wᵢ the reply's `num-examples` (1 or a coarse bucket, never an exact
count). With momentum β > 0 this is FedAvgM (Hsu et al. 2019) in the same convention as
`flwr.serverapp.strategy.FedAvgM`: v ← β v + Δ (v ← Δ in the first round), w ← w + η v.
Averaging already-private updates is post-processing and costs no privacy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class FedAvgMomentum:
    """Server-side aggregation state: the momentum buffer, if any."""

    server_lr: float = 1.0
    momentum: float = 0.0
    buffer: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"server momentum must be in [0, 1), got {self.momentum}")
        if not self.server_lr > 0:
            raise ValueError(f"server learning rate must be > 0, got {self.server_lr}")

    @staticmethod
    def average(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
        """Weighted mean of updates; weights must be positive."""
        if not updates:
            raise ValueError("nothing to average")
        weights = np.array([float(w) for _, w in updates], dtype=np.float64)
        if np.any(weights <= 0) or not np.all(np.isfinite(weights)):
            raise ValueError(f"weights must be positive and finite, got {weights.tolist()}")
        weights /= weights.sum()
        names = list(updates[0][0])
        out = {}
        for name in names:
            acc = np.zeros(np.shape(updates[0][0][name]), dtype=np.float64)
            for (u, _), w in zip(updates, weights, strict=True):
                acc += w * np.asarray(u[name], dtype=np.float64)
            out[name] = acc.astype(np.float32)
        return out

    def step(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
    ) -> dict[str, np.ndarray]:
        """New global weights from the accepted updates of one round."""
        delta = self.average(updates)
        if self.momentum > 0.0:
            if self.buffer is None:
                self.buffer = {k: v.copy() for k, v in delta.items()}
            else:
                self.buffer = {
                    k: (self.momentum * self.buffer[k] + delta[k]).astype(np.float32) for k in delta
                }
            delta = self.buffer
        return {
            k: (np.asarray(global_weights[k], dtype=np.float32) + self.server_lr * delta[k]).astype(
                np.float32
            )
            for k in global_weights
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """The momentum buffer (empty without momentum or before the first step)."""
        return {} if self.buffer is None else {k: v.copy() for k, v in self.buffer.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the momentum buffer from a checkpoint."""
        self.buffer = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()} or None
