"""One local round of a region: budget check → train → record the spend → release.

The order is what makes the ledger trustworthy:

1. project ε after this round from the ledger's histories (on a ledger that also holds
   distributed releases, the RDP composition of both under the policy's `enforce_on`;
   fedfsd.privacy.accounting_mixed); over budget → `BudgetExceeded` (nothing trained,
   recorded or released);
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
from typing import Any, cast

import numpy as np

from fedfsd.config import DPParams, RegionPolicy, TrainRequest
from fedfsd.errors import PrivacyRefusal
from fedfsd.privacy.accounting import History
from fedfsd.privacy.accounting_mixed import Spend
from fedfsd.privacy.clipping import clip_update
from fedfsd.privacy.ledger import (
    NORMALISATION,
    SCHEMA,
    Ledger,
    LedgerError,
    fault_point,
    update_digest,
)
from fedfsd.privacy.release_record import ReleaseRecord
from fedfsd.wire import l2_norm

RNG_NOTE = "torch.Generator seeded from the OS (secure_mode off: torchcsprng not installable)"


class BudgetExceeded(PrivacyRefusal, RuntimeError):
    """This round would take the fleet's ε over the policy budget; nothing was released."""

    def border_safe(self) -> str:
        """The message states only ε spent, projected and the budget: safe to send."""
        return str(self)

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
    record: ReleaseRecord = field(default_factory=lambda: cast(ReleaseRecord, {}))

    @property
    def epsilon_left(self) -> float:
        return max(0.0, self.budget - self.epsilon) if self.private else 0.0


def _result_from_record(
    rec: ReleaseRecord, weights: dict[str, np.ndarray], params: DPParams
) -> LocalRoundResult:
    private = bool(rec.get("private", True))
    return LocalRoundResult(
        new_weights=weights,
        epsilon=float(rec["epsilon_prv"] or math.inf) if private else math.inf,
        epsilon_rdp=float(rec["epsilon_rdp"] or math.inf) if private else math.inf,
        budget=float(rec["epsilon_budget"]),
        steps=int(rec["steps"]),
        sample_rate=float(rec["sample_rate"]),
        train_loss=float(rec.get("train_loss") or math.nan),
        n_vehicles=int(rec["vehicles"]),
        params=params,
        private=private,
        cached=True,
        update_norm=float(rec["update_norm"]),
        update_sha256=rec["update_sha256"],
        record=rec,
    )


def open_ledger(
    ledger: Ledger,
    frames: Any,
    fleet_id: str,
    all_vehicles: int,
    policy: RegionPolicy,
    private: bool,
) -> None:
    """Create the ledger on first use, then refuse one that is not this fleet's or not intact."""
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


def _cached_release(
    ledger: Ledger,
    run_id: str,
    round_idx: int,
    global_weights: dict[str, np.ndarray],
    params: DPParams,
) -> LocalRoundResult | None:
    """The release of a (run, round) already on the ledger, for the same received weights."""
    done = ledger.find_release(run_id, round_idx)
    if done is None:
        return None
    cached = ledger.read_cache(run_id, round_idx)
    if (
        cached is None
        or update_digest({k: cached[k] - np.asarray(global_weights[k], np.float32) for k in cached})
        != done["update_sha256"]
    ):
        raise LedgerError(
            f"run {run_id!r} round {round_idx} was already released but its cached "
            "weights are missing or do not match the received weights; refusing to "
            "release a second, uncounted update"
        )
    ledger.mark_released(run_id, round_idx)  # idempotent: a crash may have skipped it
    return _result_from_record(done, cached, params)


def _project_budget(
    spend: Spend, policy: RegionPolicy, params: DPParams, q: float
) -> tuple[Spend, float]:
    """The spend after this round and its enforced ε; over budget → BudgetExceeded.

    Gaussian-only ledger: PRV, as always. A ledger with distributed releases: the RDP
    composition of both parts under the policy's `enforce_on` (a local policy enforces on
    "own_noise", which holds whatever the other regions did)."""
    after = spend.plus_gaussian(params.noise_multiplier, q, params.steps)
    projected = after.epsilon(policy.delta, policy.enforce_on, "prv")
    if projected > policy.epsilon_budget:
        spent = spend.epsilon(policy.delta, policy.enforce_on, "prv")
        raise BudgetExceeded(spent, projected, policy.epsilon_budget)
    return after, projected


@dataclass
class _Training:
    """What the DP-SGD steps produced (the weights stay in the region until clipped)."""

    weights: dict[str, np.ndarray]
    history: History
    method: str
    losses: list[float]
    seconds: float


def _train(
    frames: Any,
    model_name: str,
    global_weights: dict[str, np.ndarray],
    params: DPParams,
    history: History,
    after: History | None,
    accounted: int,
    *,
    private: bool,
    method: str,
    seed: int | None,
    device: str,
    progress: Callable[[int, int], None] | None,
    workers: int = 1,
) -> _Training:
    """params.steps steps of vehicle-level DP-SGD from the received weights.

    In private mode the sample rate Opacus recorded and the accountant history must equal what
    the budget was projected with (``after``), or nothing is released. ``workers`` > 1 trains
    the same mechanism over several processes (fedfsd.privacy.distributed).
    """
    if workers > 1:
        from fedfsd.privacy.distributed import train_distributed

        out = train_distributed(
            frames, model_name, global_weights, params, history, accounted,
            workers=workers, method=method, seed=seed, device=device, progress=progress,
        )  # fmt: skip
        if out.history != after:
            raise RuntimeError(f"accountant history {out.history} != projected {after}")
        return _Training(out.weights, out.history, out.method, out.losses, out.seconds)
    import torch

    from fedfsd.models import build_model, get_weights, set_weights
    from fedfsd.privacy.dpsgd import VehicleDPSGD
    from fedfsd.privacy.objective import model_kwargs

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
        modality="bev" if model_name == "bev_cnn" else "objects",
        seed=seed,
        device=device,
        accounted_vehicles=accounted,
    )
    losses: list[float] = []
    started = time.perf_counter()
    for s in range(params.steps):
        r = trainer.step(frames)
        if r.n_vehicles:
            losses.append(r.loss)
        if progress is not None:
            progress(s + 1, params.steps)
        if s == params.steps // 2:
            fault_point("train")
    seconds = time.perf_counter() - started
    if private:
        trainer.check_sample_rate()
        if trainer.history != after:
            raise RuntimeError(f"accountant history {trainer.history} != projected {after}")
    with torch.no_grad():
        weights = get_weights(trainer.model.cpu())
    return _Training(
        weights=weights,
        history=list(trainer.history),
        method=trainer.method if private else "non-private",
        losses=losses,
        seconds=seconds,
    )


def _clip_to_bound(
    global32: dict[str, np.ndarray], trained: dict[str, np.ndarray], bound: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """(new weights, the update the border will recompute from them, its norm ≤ bound)."""
    update = {k: trained[k] - global32[k] for k in global32}
    clipped, _ = clip_update(update, bound, received=global32)
    new = {k: (global32[k] + clipped[k]).astype(np.float32) for k in global32}
    exact = {k: new[k] - global32[k] for k in global32}  # what `new − received` gives
    return new, exact, l2_norm(exact)


def _record(
    ledger: Ledger, run_id: str, round_idx: int, new_w: dict, record: ReleaseRecord
) -> None:
    """Cache, then append and fsync the spend, then mark released: only then may it leave."""
    ledger.write_cache(run_id, round_idx, new_w)
    fault_point("cache")
    ledger.append(dict(record))
    fault_point("record")
    ledger.mark_released(run_id, round_idx)  # the line is durable: the release may leave


def run_local_round(
    frames: Any,
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
    workers: int = 1,
) -> LocalRoundResult:
    """Train one local round under the region's policy and ledger (see module doc).

    `fleet_vehicles`: every vehicle id in the region's dataset (train, validation and test
    splits; default: the training vehicles). δ must be below 1/fleet_vehicles, and the ledger
    opens with that count. DP-SGD samples the training vehicles with q = vehicles per step /
    the policy's `public_fleet_size` (a rounded-down public count) or the exact training count.
    `workers` processes train it together (the same mechanism and ledger line as one; see
    fedfsd.privacy.distributed) on `device` ("cpu" or "cuda"; refused when absent).
    """
    from fedfsd.privacy.device import check_device
    from fedfsd.privacy.dpsgd import sample_rate

    device = check_device(device, workers, private=private)

    all_vehicles = max(int(fleet_vehicles or 0), frames.n_vehicles)
    policy.check_dataset(frames.region, all_vehicles)
    params = policy.effective(request)
    accounted = policy.accounted_vehicles(frames.n_vehicles)
    q = sample_rate(params.vehicles_per_step, accounted)
    fleet_id = frames.fleet_id or f"{frames.region}-unnamed"
    ledger = Ledger(ledger_path)
    with ledger.locked():
        open_ledger(ledger, frames, fleet_id, all_vehicles, policy, private)
        cached = _cached_release(ledger, run_id, round_idx, global_weights, params)
        if cached is not None:
            return cached
        spend = ledger.spend()
        after, projected = _project_budget(spend, policy, params, q) if private else (None, 0.0)
        trained = _train(
            frames,
            model_name,
            global_weights,
            params,
            spend.gaussian,
            after.gaussian if after is not None else None,
            accounted,
            private=private,
            method=method,
            seed=seed,
            device=device,
            progress=progress,
            workers=workers,
        )
        if private:
            eps = projected  # the same history (checked in _train), so the same ε
            done = spend.with_gaussian(trained.history)
            eps_rdp = done.epsilon(policy.delta, policy.enforce_on, "rdp")
            mixed: dict[str, Any] = done.record_fields(policy.delta, policy.enforce_on)
        else:
            eps = eps_rdp = math.inf
            mixed = {}
        global32 = {k: np.asarray(v, dtype=np.float32) for k, v in global_weights.items()}
        new_w, update, norm = _clip_to_bound(global32, trained.weights, params.update_norm_bound)
        train_loss = float(np.mean(trained.losses)) if trained.losses else math.nan
        record = _release_record(
            frames, policy, params, request, fleet_id, run_id, round_idx, model_name,
            q=q, accounted=accounted, private=private, seed=seed, eps=eps, eps_rdp=eps_rdp,
            trained=trained, norm=norm, update=update, global32=global32, train_loss=train_loss,
        )  # fmt: skip
        # On a mixed ledger the line also states both ε and carries the distributed history.
        record = cast(ReleaseRecord, {**record, **mixed})
        _record(ledger, run_id, round_idx, new_w, record)
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


def _release_record(
    frames: Any,
    policy: RegionPolicy,
    params: DPParams,
    request: TrainRequest,
    fleet_id: str,
    run_id: str,
    round_idx: int,
    model_name: str,
    *,
    q: float,
    accounted: int,
    private: bool,
    seed: int | None,
    eps: float,
    eps_rdp: float,
    trained: _Training,
    norm: float,
    update: dict[str, np.ndarray],
    global32: dict[str, np.ndarray],
    train_loss: float,
) -> ReleaseRecord:
    """The ledger line of this release: every mechanism parameter a reviewer needs."""
    from fedfsd import __version__

    record: ReleaseRecord = {
        "kind": "release",
        "schema": SCHEMA,
        "region": frames.region,
        "fleet_id": fleet_id,
        "run_id": run_id,
        "round": int(round_idx),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model_name,
        "lr": params.lr,
        "noise_multiplier": params.noise_multiplier if private else 0.0,
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
        "accountant_history": [list(h) for h in trained.history],
        "update_norm": norm,
        "update_sha256": update_digest(update),
        # The global model this round started from: evaluation answers only for it.
        "received_sha256": update_digest(global32),
        "private": private,
        "code_version": __version__,
        "rng": RNG_NOTE
        if seed is None
        else f"torch.Generator seeded with {seed} (reproducible; NOT for production)",
        "method": trained.method,
        "train_loss": train_loss if math.isfinite(train_loss) else None,
        # Wall time of the DP-SGD steps alone (not accounting, not I/O): lets the region
        # operator, and experiments/federation_cost.py, separate training from overhead.
        "train_seconds": round(trained.seconds, 4),
    }
    if request.initial_model_sha256:  # the aggregator started from a pretrained model
        record["initial_model_sha256"] = request.initial_model_sha256
    return record
