"""Budget pre-flight: a region refuses a whole run up front when its plan cannot fit the budget.

Why: the per-round check (fedfsd.privacy.local_round) refuses only the round that would overspend,
so a run planned beyond the budget first spends most of it on early rounds and then leaves the
ledger stuck near the limit for ever, with a model nobody finished. Here the first train message
of a run projects every remaining round (rounds × steps at the effective σ and q, on top of the
ledger's history, with the ledger's own PRV accountant; on a ledger that also holds distributed
releases, the RDP composition with them under the policy's `enforce_on`,
fedfsd.privacy.accounting_mixed) and, if the total is over budget, refuses the run, spending
nothing, with a reason that says what would fit. The decision is kept beside
the ledger, so a refused run stays refused on later rounds (it would otherwise "fit" once fewer
rounds remain).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfsd.durable import write_atomic
from fedfsd.errors import PrivacyRefusal
from fedfsd.privacy.accounting import compute_epsilon, extend_history
from fedfsd.privacy.accounting_mixed import Spend
from fedfsd.privacy.distributed_accounting import Assumption
from fedfsd.wire import RUN_REFUSED_PREFIX

SIGMA_REL_TOL = 0.02  # the σ suggested is within 2 % above the smallest that fits


class RunUnaffordable(PrivacyRefusal, RuntimeError):
    """The run's whole plan does not fit the remaining budget; nothing was spent.

    The message holds only ε figures, round counts and mechanism parameters the aggregator asked
    for, so it may cross the border as it is.
    """

    def __init__(self, message: str, spent: float) -> None:
        super().__init__(message)
        self.spent = spent

    def border_safe(self) -> str:
        return str(self)


@dataclass(frozen=True)
class Projection:
    """The run's plan against the remaining budget."""

    rounds: int  # rounds still to come, this one included
    spent: float
    projected: float
    budget: float
    fits_rounds: int  # the largest number of these rounds that fits
    sigma_needed: float | None  # smallest σ for all `rounds` (None: nothing fits any more)

    @property
    def fits(self) -> bool:
        return self.projected <= self.budget


Account = Callable[[Sequence[Sequence[float]], float], float]


def _eps(history: Sequence[Sequence[float]], delta: float) -> float:
    return compute_epsilon(history, delta, "prv")


def project_run(
    history: Sequence[Sequence[float]],
    sigma: float,
    q: float,
    steps: int,
    rounds: int,
    delta: float,
    budget: float,
    account: Account = _eps,
) -> Projection:
    """ε after `rounds` more rounds of `steps` steps at (σ, q), and what would fit instead.

    `account(history, δ)`: ε of a Gaussian history (default PRV; on a ledger with distributed
    releases, the composition with them, fedfsd.privacy.accounting_mixed)."""
    spent = account(history, delta)
    projected = account(extend_history(history, sigma, q, steps * rounds), delta)
    if projected <= budget:
        return Projection(rounds, spent, projected, budget, rounds, sigma)

    def ok(k: int) -> bool:
        return account(extend_history(history, sigma, q, steps * k), delta) <= budget

    lo, hi = 0, rounds  # ok(0) when spent <= budget; not ok(rounds)
    if spent > budget:
        hi = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    fits = lo if spent <= budget else 0
    sigma_needed = _sigma_for(history, q, steps * rounds, delta, budget, sigma, account)
    return Projection(rounds, spent, projected, budget, fits, sigma_needed)


def _sigma_for(
    history: Sequence[Sequence[float]],
    q: float,
    steps: int,
    delta: float,
    budget: float,
    start: float,
    account: Account = _eps,
) -> float | None:
    """Smallest σ (within SIGMA_REL_TOL) for `steps` more steps at q within the budget."""
    spent = account(history, delta)
    if spent >= budget:
        return None

    def over(s: float) -> bool:
        return account(extend_history(history, s, q, steps), delta) > budget

    lo, hi = max(start, 1e-3), max(start, 1e-3) * 2
    while over(hi):
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return None
    while hi - lo > SIGMA_REL_TOL * hi:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if over(mid) else (lo, mid)
    return hi


def refusal_message(p: Projection, sigma: float, q: float, steps: int) -> str:
    """One line: what the run needs, what the budget allows, what would fit."""
    fit = [f"at most {p.fits_rounds} of these rounds fit at this σ"]
    if p.sigma_needed is not None:
        fit.append(f"or σ ≥ {p.sigma_needed:.3g} for all {p.rounds}")
    return (
        f"{RUN_REFUSED_PREFIX}{p.rounds} round(s) × {steps} steps at σ {sigma:g}, q {q:.4g} "
        f"would bring ε from {p.spent:.3f} to {p.projected:.3f} > budget {p.budget:g}; "
        f"{', '.join(fit)}; nothing spent (size runs with `fedfsd privacy plan`)"
    )


def decisions_path(ledger_path: Path) -> Path:
    """Where a ledger's pre-flight decisions live (next to it, one JSON object)."""
    return ledger_path.with_name(ledger_path.name + ".preflight.json")


def _read_decisions(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def check_run(
    ledger_path: Path,
    *,
    run_id: str,
    round_idx: int,
    total_rounds: Any,
    sigma: float,
    q: float,
    steps: int,
    delta: float,
    budget: float,
    enforce_on: Assumption = "own_noise",
) -> Projection | None:
    """Raise RunUnaffordable when the run (from this round on) cannot fit; None when not checked.

    Checked once per run (the first train message this region sees of it): a run with a release
    on the ledger, or one accepted before, is left to the per-round check. An aggregator that
    does not say how many rounds it asks for is not checked here.
    """
    from fedfsd.privacy.ledger import Ledger

    if isinstance(total_rounds, bool) or not isinstance(total_rounds, int):
        return None
    if total_rounds < round_idx:
        return None
    ledger = Ledger(ledger_path)
    with ledger.locked():  # one decision per run, even if two messages of it race
        return _check_locked(
            ledger, run_id, round_idx, total_rounds, sigma, q, steps, delta, budget, enforce_on
        )


def _check_locked(
    ledger: Any,
    run_id: str,
    round_idx: int,
    total_rounds: int,
    sigma: float,
    q: float,
    steps: int,
    delta: float,
    budget: float,
    enforce_on: Assumption = "own_noise",
) -> Projection | None:
    path = decisions_path(ledger.path)
    decided = _read_decisions(path).get(run_id)
    if isinstance(decided, dict):
        if decided.get("decision") == "refused":
            raise RunUnaffordable(str(decided["reason"]), float(decided.get("spent", 0.0)))
        return None
    spend = Spend()
    if ledger.exists() and not ledger.is_unopened():
        if any(r.get("run_id") == run_id for r in ledger.releases()):
            return None  # the run already spent here: each round is checked on its own
        spend = ledger.spend()  # distributed releases too: ε composes both (RDP)

    def account(history: Sequence[Sequence[float]], d: float) -> float:
        return spend.with_gaussian(history).epsilon(d, enforce_on, "prv")

    rounds = total_rounds - round_idx + 1
    p = project_run(spend.gaussian, sigma, q, steps, rounds, delta, budget, account)
    record: dict[str, Any] = {
        "decision": "accepted" if p.fits else "refused",
        "round": round_idx,
        "rounds": p.rounds,
        "spent": p.spent,
        "projected": p.projected,
        "budget": p.budget,
    }
    if not p.fits:
        record["reason"] = refusal_message(p, sigma, q, steps)
    doc = _read_decisions(path)
    doc[run_id] = record
    write_atomic(path, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))
    if not p.fits:
        raise RunUnaffordable(record["reason"], p.spent)
    return p
