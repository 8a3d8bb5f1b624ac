"""Ledgers shared by the report and verify tests (no tests here).

`real_ledgers` trains a few real local rounds (vehicle-level DP-SGD through `run_local_round`)
on tiny synthetic fleets once per test session; `written_ledger` writes the documented ledger
format through `Ledger` for cases training cannot produce (non-Poisson, non-private).
"""

from __future__ import annotations

from pathlib import Path

from fedfsd.privacy.accounting import compute_epsilon, extend_history

_CACHE: dict[str, dict[str, Path]] = {}

POLICY = dict(
    epsilon_budget=20.0,
    delta=1e-4,
    min_noise_multiplier=1.0,
    max_clip_norm=1.0,
    update_norm_bound=5.0,
    max_local_steps=4,
    max_vehicles_per_step=8,
    max_frames_per_vehicle=4,
)


def real_ledgers(root: Path) -> dict[str, Path]:
    """eu: run-1 round 1 then run-2 round 1; cn: run-1 round 1 (σ 1.2). Built once."""
    if "real" in _CACHE:
        return _CACHE["real"]
    from fedfsd.config import RegionPolicy, TrainRequest
    from fedfsd.data.testing import make_synthetic_frames
    from fedfsd.models import build_model, get_weights
    from fedfsd.privacy.local_round import run_local_round

    out: dict[str, Path] = {}
    plan = {"eu": [("run-1", 1), ("run-2", 1)], "cn": [("run-1", 1)]}
    for i, (region, rounds) in enumerate(plan.items()):
        frames = make_synthetic_frames(40, 6, seed=i + 1, region=region)
        policy = RegionPolicy(region=region, **POLICY)
        weights = get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))
        sigma = 1.0 if region == "eu" else 1.2
        req = TrainRequest(
            local_steps=4, vehicles_per_step=8, frames_per_vehicle=4, noise_multiplier=sigma
        )
        path = root / f"{region}.ledger.jsonl"
        for run_id, rnd in rounds:
            res = run_local_round(frames, policy, path, weights, req, run_id, rnd, "mlp", seed=rnd)
            weights = res.new_weights
        out[region] = path
    _CACHE["real"] = out
    return out


def written_ledger(
    path: Path,
    region: str = "us",
    *,
    vehicles: int = 100,
    per_step: int = 10,
    sigma: float = 1.0,
    steps: int = 10,
    rounds: int = 2,
    sampling: str = "poisson",
    private: bool = True,
    delta: float = 1e-4,
) -> Path:
    """A ledger in the documented record format, written through the real `Ledger`."""
    from fedfsd.privacy.ledger import Ledger

    led = Ledger(path)
    led.create(
        region=region,
        fleet_id=f"{region}-fleet",
        vehicles=vehicles,
        delta=delta,
        epsilon_budget=20.0,
        private=private,
        created="2026-01-01T00:00:00+00:00",
    )
    q = per_step / vehicles
    hist: list = []
    for r in range(1, rounds + 1):
        hist = extend_history(hist, sigma, q, steps) if private else []
        led.append(
            {
                "kind": "release",
                "schema": 1,
                "region": region,
                "fleet_id": f"{region}-fleet",
                "run_id": "run-w",
                "round": r,
                "time": "2026-01-01T00:00:00+00:00",
                "model": "mlp",
                "lr": 0.05,
                "noise_multiplier": sigma if private else 0.0,
                "clip_norm": 1.0,
                "sample_rate": q,
                "vehicles": vehicles,
                "expected_vehicles_per_step": per_step,
                "frames_per_vehicle": 4,
                "steps": steps,
                "sampling": sampling,
                "normalisation": "sum of clipped vehicle gradients + noise",
                "delta": delta,
                "epsilon_prv": compute_epsilon(hist, delta, "prv") if private else None,
                "epsilon_rdp": compute_epsilon(hist, delta, "rdp") if private else None,
                "epsilon_budget": 20.0,
                "accountant_history": [list(h) for h in hist],
                "update_norm": 1.0,
                "update_sha256": "00" * 32,
                "private": private,
                "code_version": "0.1.0",
                "rng": "torch default generator",
            }
        )
    return path
