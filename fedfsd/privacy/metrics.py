"""Differentially private, ledgered release of evaluation metrics and the training loss.

Nothing a region computes from its fleet leaves outside its ledger. A metric leaves only when the
policy lists it in `allowed_metrics`, and then as one Gaussian mechanism over vehicles:

- each vehicle contributes one number per metric, its mean error over its own frames, clipped to
  [0, B_m] (`metric_clip`) and divided by B_m, plus a 1 for the count: a vector with L2 norm
  ≤ Δ = √(k + 1) for k metrics, whatever the vehicle's number of frames;
- the vector sums get N(0, σ_m² Δ²) noise per coordinate (σ_m = `metric_noise_multiplier`);
- only the ratios B_m · clip(noisy sum / max(noisy count, 1), 0, 1) leave: post-processing, so
  neither the exact count nor an exact mean is released.

That is one Gaussian mechanism with noise multiplier σ_m on every vehicle (sample rate q = 1,
one step): it composes with the DP-SGD steps in the same accountant history as (σ_m, 1.0, 1).
The spend is checked against the budget and appended to the ledger (kind "metric", with the
values) BEFORE the values are returned to the caller; a repeated request for the same run, round
and phase returns the recorded values without new spend.

Evaluation answers only for a global model the region received in a train message of this run:
the weights' digest must equal the `received_sha256` of the ledger's release for (run, round).
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedfsd.config import KNOWN_METRICS, RegionPolicy
from fedfsd.errors import PrivacyRefusal
from fedfsd.privacy.accounting_mixed import Spend
from fedfsd.privacy.distributed_accounting import Assumption
from fedfsd.privacy.ledger import SCHEMA, Ledger

KIND = "metric"
PHASES = ("train", "evaluate")
MECHANISM = (
    "Gaussian mechanism over vehicles (q = 1, one step): per-vehicle means clipped to [0, B] and "
    "divided by B, plus a count of 1; L2 sensitivity sqrt(k + 1); noise N(0, (σ_m·sqrt(k+1))²) "
    "per coordinate; released value B · clip(noisy sum / max(noisy count, 1), 0, 1)"
)
RNG_NOTE = "numpy PCG64 seeded from the OS (secrets.randbits); not a CSPRNG"


class MetricRefused(PrivacyRefusal, RuntimeError):
    """No metric leaves; the message is safe to send across the border."""

    def border_safe(self) -> str:
        """The message itself: it is written to be border-safe."""
        return str(self)


@dataclass(frozen=True)
class MetricRelease:
    """What left (values) and what it cost (ε after it, at the ledger's δ)."""

    values: dict[str, float]
    epsilon: float
    cached: bool
    record: dict[str, Any]


def metrics_for(policy: RegionPolicy, phase: str) -> list[str]:
    """The metrics a phase may release: all allowed ones on evaluation, only `loss` in training."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}")
    allowed = [m for m in KNOWN_METRICS if m in policy.allowed_metrics]
    return allowed if phase == "evaluate" else [m for m in allowed if m == "loss"]


def noisy_means(
    per_vehicle: Mapping[str, np.ndarray],
    bounds: Mapping[str, float],
    sigma: float,
    rng: np.random.Generator,
) -> tuple[dict[str, float], float]:
    """The Gaussian mechanism of the module doc; returns (released values, noisy count)."""
    names = sorted(per_vehicle)
    if not names:
        raise ValueError("no metric to release")
    std = sigma * math.sqrt(len(names) + 1)
    n = len(per_vehicle[names[0]])
    noisy_n = n + float(rng.normal(0.0, std))
    out: dict[str, float] = {}
    for m in names:
        b = float(bounds[m])
        v = np.nan_to_num(np.asarray(per_vehicle[m], np.float64), nan=b, posinf=b, neginf=0.0)
        total = float(np.sum(np.clip(v, 0.0, b) / b)) + float(rng.normal(0.0, std))
        out[m] = b * min(1.0, max(0.0, total / max(noisy_n, 1.0)))
    return out, noisy_n


def check_evaluable(ledger: Ledger, run_id: str, round_idx: int, weights_sha256: str) -> None:
    """Refuse weights that are not the global model received for (run, round) (see module)."""
    rel = ledger.find_release(run_id, round_idx) if ledger.exists() else None
    if rel is None:
        raise MetricRefused("evaluation refused: no update released for this run and round")
    if rel.get("received_sha256") != weights_sha256:
        raise MetricRefused(
            "evaluation refused: weights differ from the global model received for this round"
        )


def _epsilon(spend: Spend, delta: float, name: str, enforce: Assumption) -> float:
    with warnings.catch_warnings():  # Opacus PRV takes log(1 - q) = log(0) at q = 1
        warnings.simplefilter("ignore", RuntimeWarning)
        return spend.epsilon(delta, enforce, name)


def release_metrics(
    ledger_path: str | Path,
    policy: RegionPolicy,
    *,
    run_id: str,
    round_idx: int,
    phase: str,
    model_sha256: str,
    score: Callable[[], Mapping[str, np.ndarray]],
    rng: np.random.Generator | None = None,
) -> MetricRelease:
    """Budget check → score → noise → ledger line (fsync'd) → values; see the module doc.

    `score()` returns each vehicle's mean error per metric ({metric: [V]}) and is called only
    once the spend is known to fit the budget. Raises `MetricRefused` (border-safe reason) or
    `fedfsd.privacy.local_round.BudgetExceeded`.
    """
    from fedfsd import __version__
    from fedfsd.privacy.local_round import BudgetExceeded

    names = metrics_for(policy, phase)
    if not names:
        raise MetricRefused("no metric allowed by the region's policy")
    ledger = Ledger(ledger_path)
    with ledger.locked():
        if not ledger.exists():
            raise MetricRefused("no privacy ledger yet")
        if not ledger.private:
            raise MetricRefused("non-private ledger: metrics are not released")
        for r in ledger.metric_releases():
            if (r["run_id"], int(r["round"]), r["phase"]) == (run_id, int(round_idx), phase):
                if r.get("model_sha256") != model_sha256:
                    raise MetricRefused(f"{phase} metrics were already released for this round")
                eps = float(r["epsilon_prv"])
                return MetricRelease(dict(r["values"]), eps, cached=True, record=r)
        delta = float(ledger.header["delta"])
        sigma = float(policy.metric_noise_multiplier)
        # Both histories: on a ledger with distributed releases ε composes them (RDP).
        spend, enforce = ledger.spend(), policy.enforce_on
        after = spend.plus_gaussian(sigma, 1.0, 1)
        projected = _epsilon(after, delta, "prv", enforce)
        if projected > policy.epsilon_budget:
            spent = _epsilon(spend, delta, "prv", enforce)
            raise BudgetExceeded(spent, projected, policy.epsilon_budget)
        per_vehicle = score()
        bounds = {m: float(policy.metric_clip[m]) for m in names}
        values, noisy_n = noisy_means(
            {m: per_vehicle[m] for m in names},
            bounds,
            sigma,
            rng if rng is not None else np.random.default_rng(secrets.randbits(128)),
        )
        header = ledger.header
        record = {
            "kind": KIND,
            "schema": SCHEMA,
            "region": header["region"],
            "fleet_id": header["fleet_id"],
            "run_id": run_id,
            "round": int(round_idx),
            "phase": phase,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "metrics": names,
            "values": values,
            "metric_clip": bounds,
            "mechanism": MECHANISM,
            "sensitivity": math.sqrt(len(names) + 1),
            "noise_multiplier": sigma,
            "sample_rate": 1.0,
            "steps": 1,
            "scored_vehicles": int(len(per_vehicle[names[0]])),  # stays in the region
            "noisy_count": noisy_n,
            "model_sha256": model_sha256,
            "delta": delta,
            "epsilon_prv": projected,
            "epsilon_rdp": _epsilon(after, delta, "rdp", enforce),
            "epsilon_budget": policy.epsilon_budget,
            "accountant_history": [list(h) for h in after.gaussian],
            "private": True,
            "code_version": __version__,
            "rng": RNG_NOTE if rng is None else "caller-supplied generator (NOT for production)",
            **after.record_fields(delta, enforce),  # a mixed ledger: both ε, Skellam history
        }
        ledger.append(record)
        return MetricRelease(values, projected, cached=False, record=record)
