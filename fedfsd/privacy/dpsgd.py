"""Vehicle-level DP-SGD on top of Opacus' optimizers and accountants.

The unit of privacy is the vehicle (DESIGN.md decision 4). Each step:

1. Poisson-sample vehicles with q = expected vehicles per step / vehicles in the fleet
   (derived here from vehicle counts, never inferred by Opacus from a data loader);
2. take ≤ K frames of each sampled vehicle (`frames.sample`) and its masked mean loss;
3. clip each *vehicle's* gradient to C, sum, add N(0, σ²C²), divide by the expected number of
   vehicles per step, and step.

Opacus has no per-unit mode, so we supply the per-vehicle part ourselves (see
`fedfsd.privacy.pervehicle`): on the MLP and the BEV CNN via ghost-style norms into Opacus'
`DPOptimizerFastGradientClipping` (which adds noise and scales), on any other model via `vmap`
per-vehicle gradients as `p.grad_sample` into Opacus' `DPOptimizer` (which clips, adds noise and
scales).
Opacus' accountant hook records every step, including steps whose Poisson batch is empty (those
still add noise: skipping them would change the mechanism the accountant describes).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fedfsd.config import DPParams
from fedfsd.errors import InputError, IntegrityError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedfsd.data.frames import VehicleFramesLike

Method = Literal["auto", "ghost", "vmap"]


class FixedBatchError(InputError, RuntimeError):
    """A caller-chosen batch in private mode: the accountant assumes Poisson sampling."""


class SampleRateMismatch(IntegrityError, RuntimeError):
    """Opacus' accountant recorded a sample rate other than the one derived from vehicle counts."""


@dataclass
class StepResult:
    """What one step did (loss is the mean over the sampled vehicles, NaN for an empty batch)."""

    n_vehicles: int
    loss: float


def sample_rate(vehicles_per_step: int, n_vehicles: int) -> float:
    """q = expected vehicles per step / vehicles in the fleet (capped at 1)."""
    if n_vehicles < 1:
        raise ValueError("the fleet has no vehicles")
    return min(1.0, vehicles_per_step / n_vehicles)


class VehicleDPSGD:
    """One region's local trainer; `private=False` is the labelled non-private baseline."""

    def __init__(
        self,
        model: nn.Module,
        params: DPParams,
        n_vehicles: int,
        *,
        private: bool = True,
        method: Method = "auto",
        history: list[tuple[float, float, int]] | None = None,
        modality: str = "objects",
        seed: int | None = None,
        device: str | torch.device = "cpu",
        accounted_vehicles: int | None = None,
        presummed: bool = False,
    ) -> None:
        """`n_vehicles` are sampled; q divides by `accounted_vehicles` (a public, rounded-down
        count ≤ n_vehicles) when given, so the true rate equals the accounted one and only the
        public count can be inferred from q. `presummed`: the caller writes the clipped
        per-vehicle sum into each `p.grad` itself (fedfsd.privacy.distributed sums it over
        worker processes) and the optimizer only adds noise, scales and steps."""
        import torch

        from fedfsd.privacy.objective import label_scales, per_vehicle_loss
        from fedfsd.privacy.pervehicle import supports_ghost

        self.model = model.to(device)
        self.params = params
        self.n_vehicles = n_vehicles
        self.private = private
        self.modality = modality
        self.device = torch.device(device)
        denom = n_vehicles if accounted_vehicles is None else int(accounted_vehicles)
        if not 1 <= denom <= n_vehicles:
            raise ValueError(f"accounted vehicles {denom} must be in [1, {n_vehicles}]")
        self.q = sample_rate(params.vehicles_per_step, denom)
        # Normalise by a public number (q × the accounted count), never by the exact fleet size.
        self.expected_batch = self.q * denom
        self.fixed_batches = False
        # Vehicle sampling and noise must be unpredictable to an adversary: seed from the OS
        # unless a test fixes the seed.
        seed = secrets.randbits(63) if seed is None else seed
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        scales = label_scales(self.device)
        self._loss = lambda out, y, m: per_vehicle_loss(out, y, m, scales)
        if method == "auto":
            method = "ghost" if supports_ghost(model) else "vmap"
        if method == "ghost" and not supports_ghost(model):
            raise ValueError(
                "method 'ghost' needs a per-frame nn.Sequential of Linear/Conv2d/GroupNorm/"
                "LayerNorm and parameter-free layers (see pervehicle.supports_ghost)"
            )
        self.method = method
        base = torch.optim.SGD(self.model.parameters(), lr=params.lr)
        self.accountant: Any = None
        if not private:
            self.optimizer: Any = base
            return
        from opacus.accountants import PRVAccountant
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        cls = DPOptimizerFastGradientClipping if method == "ghost" else DPOptimizer
        if presummed:  # the noise draws are the same as DPOptimizer's (same generator, order)
            cls = DPOptimizerFastGradientClipping
        self.optimizer = cls(
            base,
            noise_multiplier=params.noise_multiplier,
            max_grad_norm=params.clip_norm,
            expected_batch_size=self.expected_batch,
            loss_reduction="mean",
            generator=self.generator,
        )
        # The history continues the region's ledger: never a fresh accountant per round.
        self.accountant = PRVAccountant()
        self.accountant.history = [tuple(h) for h in (history or [])]
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.q))

    def sample_vehicles(self) -> np.ndarray:
        """Poisson sampling: each vehicle independently with probability q."""
        return np.flatnonzero(self.rng.random(self.n_vehicles) < self.q)

    def _batch(self, frames: VehicleFramesLike, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        import torch

        k = self.params.frames_per_vehicle
        x, y, mask = frames.sample(idx, k, self.rng, modality=self.modality)  # B may be 0
        return tuple(
            torch.as_tensor(np.asarray(a)).to(self.device, non_blocking=True) for a in (x, y, mask)
        )

    def step(self, frames: VehicleFramesLike, idx: np.ndarray | None = None) -> StepResult:
        """One step over a fresh Poisson sample (`idx`: caller's vehicles, non-private only).

        In private mode a caller-chosen batch is refused: the accountant records every step as
        Poisson sampling at rate q, which a chosen batch is not.
        """
        if idx is not None and self.private:
            raise FixedBatchError(
                "a caller-chosen batch is refused in private mode (the accountant counts "
                "Poisson sampling); use step_fixed_batch for benchmarks"
            )
        return self._step(frames, self.sample_vehicles() if idx is None else idx)

    def step_fixed_batch(self, frames: VehicleFramesLike, idx: np.ndarray) -> StepResult:
        """A step over chosen vehicles for benchmarks and tests: taints the trainer, whose
        `history` then refuses (nothing it trained can be released as private)."""
        if self.private:
            self.fixed_batches = True
        return self._step(frames, idx)

    def _step(self, frames: VehicleFramesLike, idx: np.ndarray) -> StepResult:
        x, y, mask = self._batch(frames, idx)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if not self.private:
            if len(idx) == 0:
                return StepResult(0, math.nan)
            from fedfsd.privacy.objective import forward_frames

            loss = self._loss(forward_frames(self.model, x), y, mask).mean()
            loss.backward()
            self.optimizer.step()
            return StepResult(len(idx), float(loss.detach()))
        losses = self.step_private(x, y, mask)
        return StepResult(len(idx), float(losses.mean()) if len(idx) else math.nan)

    def step_private(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-vehicle clipping into Opacus' optimizer; returns the per-vehicle losses."""
        from fedfsd.privacy.pervehicle import ghost_clipped_sum, vmap_grads

        if self.method == "ghost":
            losses, _ = ghost_clipped_sum(self.model, x, y, mask, self.params.clip_norm, self._loss)
        else:
            grads, losses = vmap_grads(self.model, x, y, mask, self._loss)
            for n, p in self.model.named_parameters():
                if p.requires_grad:
                    p.grad_sample = grads[n]  # type: ignore[attr-defined]  # opacus reads it
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses.detach()

    def check_sample_rate(self) -> None:
        """Assert that Opacus' accountant recorded exactly our q (DESIGN.md trap)."""
        if not self.private:
            return
        recorded = self.accountant.history[-1][1] if self.accountant.history else None
        if recorded is not None and recorded != self.q:
            raise SampleRateMismatch(f"Opacus recorded q = {recorded}, derived q = {self.q}")

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Opacus' accountant history (cumulative, including earlier rounds)."""
        if self.fixed_batches:
            raise FixedBatchError(
                "this trainer took caller-chosen batches: its steps are not "
                "Poisson-sampled and cannot be accounted"
            )
        return [] if self.accountant is None else [tuple(h) for h in self.accountant.history]
