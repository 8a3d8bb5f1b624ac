"""One local round of a region: budget check → train → record the spend → release.

The order is what makes the ledger trustworthy:

1. project ε after this round from the ledger's history; over budget → `BudgetExceeded`
   (nothing trained, recorded or released);
2. a (run_id, round) already on the ledger returns its cached release, no new spend (so an
   aggregator `--resume` or a retried message never double-counts);
3. vehicle-level DP-SGD, update L2-clipped to the policy's bound;
4. cache the weights (atomically; a cache without a ledger line is never returned), append the
   spend to the ledger and fsync, write the release marker, and only THEN return. A crash
   anywhere before the fsync leaves nothing released and nothing counted; a crash after it
   leaves the spend counted once and the release returned from the cache on retry.

The whole round holds an exclusive lock on the ledger, so two processes cannot both spend.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfsd.config import DPParams, RegionPolicy, TrainRequest
from fedfsd.privacy.accounting import compute_epsilon, extend_history
from fedfsd.privacy.ledger import (
    NORMALISATION,
    SCHEMA,
    Ledger,
    LedgerError,
    fault_point,
    update_digest,
)

if TYPE_CHECKING:
    from fedfsd.data.frames import VehicleFramesLike

RNG_NOTE = "torch.Generator seeded from the OS (secure_mode off: torchcsprng not installable)"


class BudgetExceeded(RuntimeError):
    """This round would take the fleet's ε over the policy budget; nothing was released."""

    def __init__(self, spent: float, projected: float, budget: float) -> None:
        self.spent, self.projected, self.budget = spent, projected, budget
        super().__init__(
            f"privacy budget exceeded: ε spent {spent:.3f}, this round would bring it to "
            f"{projected:.3f} > budget {budget:g}; round refused, nothing released"
        )


@dataclass
class LocalRoundResult:
    """What a local round released (see docs/contracts.md)."""

    new_weights: dict[str, np.ndarray]
    epsilon: float  # PRV after this round (∞ when non-private)
    epsilon_rdp: float
    budget: float
    steps: int
    sample_rate: float
    # Stays in the region: mean loss over the sampled vehicles, NOT differentially private (a
    # loss that leaves is a separate release, fedfsd.privacy.metrics).
    train_loss: float
    n_vehicles: int
    params: DPParams
    private: bool = True
    cached: bool = False  # True when this (run_id, round) had already been released
    update_norm: float = 0.0
    update_sha256: str = ""
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def epsilon_left(self) -> float:
        return max(0.0, self.budget - self.epsilon) if self.private else 0.0


def _clip_update(
    global_w: dict[str, np.ndarray], new_w: dict[str, np.ndarray], bound: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """Clip new − global to L2 ≤ bound; returns (new weights, exact update, its norm)."""
    upd = {k: (new_w[k] - global_w[k]).astype(np.float32) for k in global_w}
    norm = math.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in upd.values()))
    # Aim a hair below the bound (as the egress guard does): `new − received` is recomputed in
    # float32 at the border, and it must not land above the bound, or the guard would clip it
    # again and the released bytes would no longer match this ledger line's digest.
    scale = min(1.0, bound / (norm + 1e-12) * (1.0 - 1e-6)) if norm > bound else 1.0

    def exact_of(s: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
        new = {k: (global_w[k] + upd[k] * np.float32(s)).astype(np.float32) for k in global_w}
        exact = {k: new[k] - global_w[k] for k in global_w}  # what `new − received` gives
        n = math.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in exact.values()))
        return new, exact, n

    new, exact, exact_norm = exact_of(scale)
    while exact_norm > bound:  # pragma: no cover - only on pathological rounding
        scale *= 1.0 - 1e-5
        new, exact, exact_norm = exact_of(scale)
    return new, exact, exact_norm


def _result_from_record(
    rec: dict[str, Any], weights: dict[str, np.ndarray], params: DPParams
) -> LocalRoundResult:
    private = bool(rec.get("private", True))
    return LocalRoundResult(
        new_weights=weights,
        epsilon=float(rec["epsilon_prv"]) if private else math.inf,
        epsilon_rdp=float(rec["epsilon_rdp"]) if private else math.inf,
        budget=float(rec["epsilon_budget"]),
        steps=int(rec["steps"]),
        sample_rate=float(rec["sample_rate"]),
        train_loss=math.nan if rec.get("train_loss") is None else float(rec["train_loss"]),
        n_vehicles=int(rec["vehicles"]),
        params=params,
        private=private,
        cached=True,
        update_norm=float(rec["update_norm"]),
        update_sha256=rec["update_sha256"],
        record=rec,
    )


def run_local_round(
    frames: VehicleFramesLike,
    policy: RegionPolicy,
    ledger_path: str | Path,
    global_weights: dict[str, np.ndarray],
    request: TrainRequest,
    run_id: str,
    round_idx: int,
    model_name: str,
    *,
    private: bool = True,
    method: str = "auto",
    seed: int | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    fleet_vehicles: int | None = None,
) -> LocalRoundResult:
    """Train one local round under the region's policy and ledger (see module doc).

    `fleet_vehicles`: every vehicle id in the region's dataset (train, validation and test
    splits; default: the training vehicles). δ must be below 1/fleet_vehicles, and the ledger
    opens with that count. DP-SGD samples the training vehicles with q = vehicles per step /
    the policy's `public_fleet_size` (a rounded-down public count) or the exact training count.
    """
    import torch

    from fedfsd import __version__
    from fedfsd.models import build_model, get_weights, set_weights
    from fedfsd.privacy.dpsgd import VehicleDPSGD, sample_rate
    from fedfsd.privacy.objective import model_kwargs

    all_vehicles = max(int(fleet_vehicles or 0), frames.n_vehicles)
    policy.check_dataset(frames.region, all_vehicles)
    params = policy.effective(request)
    accounted = policy.accounted_vehicles(frames.n_vehicles)
    q = sample_rate(params.vehicles_per_step, accounted)
    fleet_id = frames.fleet_id or f"{frames.region}-unnamed"
    ledger = Ledger(ledger_path)
    with ledger.locked():
        if ledger.is_unopened():  # creation crashed before its line was complete
            ledger.path.unlink()
        if not ledger.exists():
            ledger.create(
                region=frames.region,
                fleet_id=fleet_id,
                vehicles=all_vehicles,
                delta=policy.delta,
                epsilon_budget=policy.epsilon_budget,
                private=private,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
            )
        ledger.check_matches(
            region=frames.region, fleet_id=fleet_id, private=private, delta=policy.delta
        )
        # A torn tail or missing line whose release already left is tampering or loss, not a
        # crash: refuse before anything trains (fedfsd.privacy.ledger, "Crash safety").
        ledger.check_integrity()

        done = ledger.find_release(run_id, round_idx)
        if done is not None:
            cached = ledger.read_cache(run_id, round_idx)
            if (
                cached is None
                or update_digest(
                    {k: cached[k] - np.asarray(global_weights[k], np.float32) for k in cached}
                )
                != done["update_sha256"]
            ):
                raise LedgerError(
                    f"run {run_id!r} round {round_idx} was already released but its cached "
                    "weights are missing or do not match the received weights; refusing to "
                    "release a second, uncounted update"
                )
            ledger.mark_released(run_id, round_idx)  # idempotent: a crash may have skipped it
            return _result_from_record(done, cached, params)

        history = ledger.history()
        sigma = params.noise_multiplier
        if private:
            after = extend_history(history, sigma, q, params.steps)
            projected = compute_epsilon(after, policy.delta, "prv")
            if projected > policy.epsilon_budget:
                spent = compute_epsilon(history, policy.delta, "prv")
                raise BudgetExceeded(spent, projected, policy.epsilon_budget)

        bev = model_name == "bev_cnn"
        kw = model_kwargs(frames, model_name)
        model = build_model(model_name, frames.features.shape[1], frames.labels.shape[1], **kw)
        set_weights(model, global_weights)
        trainer = VehicleDPSGD(
            model,
            params,
            frames.n_vehicles,
            private=private,
            method=method,  # type: ignore[arg-type]
            history=history,
            modality="bev" if bev else "objects",
            seed=seed,
            device=device,
            accounted_vehicles=accounted,
        )
        losses: list[float] = []
        train_started = time.perf_counter()
        for s in range(params.steps):
            r = trainer.step(frames)
            if r.n_vehicles:
                losses.append(r.loss)
            if progress is not None:
                progress(s + 1, params.steps)
            if s == params.steps // 2:
                fault_point("train")
        train_seconds = time.perf_counter() - train_started
        if private:
            trainer.check_sample_rate()
            if trainer.history != after:
                raise RuntimeError(f"accountant history {trainer.history} != projected {after}")
            eps = projected  # the same history (checked above), so the same ε
            eps_rdp = compute_epsilon(trainer.history, policy.delta, "rdp")
        else:
            eps = eps_rdp = math.inf
        with torch.no_grad():
            trained = get_weights(trainer.model.cpu())
        global32 = {k: np.asarray(v, dtype=np.float32) for k, v in global_weights.items()}
        new_w, update, norm = _clip_update(global32, trained, params.update_norm_bound)
        train_loss = float(np.mean(losses)) if losses else math.nan

        record: dict[str, Any] = {
            "kind": "release",
            "schema": SCHEMA,
            "region": frames.region,
            "fleet_id": fleet_id,
            "run_id": run_id,
            "round": int(round_idx),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": model_name,
            "lr": params.lr,
            "noise_multiplier": sigma if private else 0.0,
            # The policy's noise floor in force, so a reviewer can check σ against it.
            "min_noise_multiplier": policy.min_noise_multiplier,
            "clip_norm": params.clip_norm,
            "sample_rate": q,
            # The denominator of q: the public fleet size when declared, else the exact count.
            "vehicles": accounted,
            "public_fleet_size": policy.public_fleet_size is not None,
            "expected_vehicles_per_step": min(params.vehicles_per_step, accounted),
            "frames_per_vehicle": params.frames_per_vehicle,
            "steps": params.steps,
            "sampling": "poisson",
            "normalisation": NORMALISATION if private else "mean loss over sampled vehicles",
            "delta": policy.delta,
            "epsilon_prv": eps if private else None,
            "epsilon_rdp": eps_rdp if private else None,
            "epsilon_budget": policy.epsilon_budget,
            "accountant_history": [list(h) for h in trainer.history],
            "update_norm": norm,
            "update_sha256": update_digest(update),
            # The global model this round started from: evaluation answers only for it.
            "received_sha256": update_digest(global32),
            "private": private,
            "code_version": __version__,
            "rng": RNG_NOTE
            if seed is None
            else f"torch.Generator seeded with {seed} (reproducible; NOT for production)",
            "method": trainer.method if private else "non-private",
            "train_loss": train_loss if math.isfinite(train_loss) else None,
            # Wall time of the DP-SGD steps alone (not accounting, not I/O): lets the region
            # operator, and experiments/federation_cost.py, separate training from overhead.
            "train_seconds": round(train_seconds, 4),
        }
        if request.initial_model_sha256:  # the aggregator started from a pretrained model
            record["initial_model_sha256"] = request.initial_model_sha256
        ledger.write_cache(run_id, round_idx, new_w)
        fault_point("cache")
        ledger.append(record)
        fault_point("record")
        ledger.mark_released(run_id, round_idx)  # the line is durable: the release may leave
        return LocalRoundResult(
            new_weights=new_w,
            epsilon=eps,
            epsilon_rdp=eps_rdp,
            budget=policy.epsilon_budget,
            steps=params.steps,
            sample_rate=q,
            train_loss=train_loss,
            n_vehicles=accounted,
            params=params,
            private=private,
            cached=False,
            update_norm=norm,
            update_sha256=record["update_sha256"],
            record=record,
        )
