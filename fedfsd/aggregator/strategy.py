"""Server optimisers over the verified updates of one round: FedAvg, FedAvgM, FedAdam.

Regions send updates (new − received), not weights, so averaging is done on updates directly:
Δ = Σ wᵢ Δᵢ / Σ wᵢ with wᵢ the reply's `num-examples` (1 or a coarse bucket, never an exact
count). With momentum β > 0 this is FedAvgM (Hsu et al. 2019) in the same convention as
`flwr.serverapp.strategy.FedAvgM`: v ← β v + Δ (v ← Δ in the first round), w ← w + η v.
FedAdam follows Reddi et al. 2021 ("Adaptive Federated Optimization", Algorithm 2) on the same
averaged update Δ. Averaging and any server optimiser over already-private updates are
post-processing and cost no privacy.
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
        if foreign := sorted(k for k in state if k.startswith(ADAM_PREFIXES)):
            raise ValueError(
                f"checkpoint holds FedAdam state ({foreign[0]}, ...): resume with "
                "server-optimizer fedadam"
            )
        self.buffer = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()} or None


ADAM_PREFIXES = ("adam_m/", "adam_v/")


@dataclass
class FedAdam:
    """FedAdam (Reddi et al. 2021, Algorithm 2) on the averaged update Δ of each round.

    m ← β1·m + (1 − β1)·Δ;  v ← β2·v + (1 − β2)·Δ²;  w ← w + η·m / (√v + τ), with m₀ = 0 and
    v₀ = τ² (the paper's v₋₁ ≥ τ²), element-wise, no bias correction (as in the paper; Flower's
    FedAdam adds Adam's). τ bounds the adaptivity: a coordinate whose updates are pure noise of
    std s moves by about η·(1 − β1)·Δ/(s + τ) per round. State (m, v) goes to the checkpoint.
    """

    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: dict[str, np.ndarray] | None = field(default=None, repr=False)
    v: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.server_lr > 0:
            raise ValueError(f"server learning rate must be > 0, got {self.server_lr}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")

    average = staticmethod(FedAvgMomentum.average)

    def step(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
    ) -> dict[str, np.ndarray]:
        """New global weights from the accepted updates of one round."""
        delta = {k: v.astype(np.float64) for k, v in self.average(updates).items()}
        if self.m is None or self.v is None:
            self.m = {k: np.zeros_like(d) for k, d in delta.items()}
            self.v = {k: np.full_like(d, self.tau**2) for k, d in delta.items()}
        b1, b2 = self.beta1, self.beta2
        self.m = {
            k: b1 * np.asarray(self.m[k], np.float64) + (1 - b1) * d for k, d in delta.items()
        }
        self.v = {
            k: b2 * np.asarray(self.v[k], np.float64) + (1 - b2) * d * d for k, d in delta.items()
        }
        return {
            k: (
                np.asarray(global_weights[k], np.float64)
                + self.server_lr * self.m[k] / (np.sqrt(self.v[k]) + self.tau)
            ).astype(np.float32)
            for k in global_weights
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """First and second moments, keyed `adam_m/<name>` and `adam_v/<name>`."""
        if self.m is None or self.v is None:
            return {}
        out = {f"adam_m/{k}": np.asarray(v, np.float64) for k, v in self.m.items()}
        out.update({f"adam_v/{k}": np.asarray(v, np.float64) for k, v in self.v.items()})
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the moments from a checkpoint (refuses a FedAvgM momentum buffer)."""
        if not state:
            self.m = self.v = None
            return
        if other := sorted(k for k in state if not k.startswith(ADAM_PREFIXES)):
            raise ValueError(
                f"checkpoint holds server momentum state ({other[0]}, ...), not FedAdam's: "
                "resume with the run's own server-optimizer"
            )
        self.m = {
            k[len("adam_m/") :]: np.asarray(v) for k, v in state.items() if k.startswith("adam_m/")
        }
        self.v = {
            k[len("adam_v/") :]: np.asarray(v) for k, v in state.items() if k.startswith("adam_v/")
        }
        if set(self.m) != set(self.v):
            raise ValueError("checkpoint's FedAdam state has mismatched first and second moments")


ServerOptimizer = FedAvgMomentum | FedAdam


def make_server_optimizer(
    name: str,
    *,
    server_lr: float = 1.0,
    momentum: float = 0.0,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> ServerOptimizer:
    """The server optimiser a run config names ("fedavg", "fedavgm" or "fedadam")."""
    if name in ("fedavg", "fedavgm"):
        if name == "fedavgm" and momentum <= 0:
            raise ValueError("fedavgm needs a server momentum > 0")
        return FedAvgMomentum(server_lr=server_lr, momentum=momentum)
    if name == "fedadam":
        return FedAdam(server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau)
    raise ValueError(f"unknown server optimizer {name!r}; choose fedavg, fedavgm or fedadam")
