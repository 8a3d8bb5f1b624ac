"""ε from an accountant history, with Opacus' accountants.

A history is Opacus' own form: a list of `(noise_multiplier, sample_rate, steps)` for a
Poisson-subsampled Gaussian mechanism. fedfsd keeps one history per region and fleet, carried
across every step of every round and run (the ledger persists it), because a fresh accountant
per round silently under-reports ε. PRV is the headline (tight, Gopi et al. 2021; Opacus returns
its upper bound), RDP the conservative cross-check. GDP is refused: it under-reports by 2.5-12%
on fedfsd's settings (see /work/shared/notes/privacy.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

from fedfsd.errors import InputError

ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")

History = list[tuple[float, float, int]]

PRV_EPS_ERROR = 0.01  # Opacus' default absolute ε error for PRV
PRV_REL_ERROR = 0.005  # target relative error once the default error would exceed 1% of ε
PRV_MIN_EPS_ERROR = 0.002  # finer meshes cost seconds: floor on the absolute error


class AccountantError(InputError, ValueError):
    """An accountant fedfsd does not allow, or a history it cannot account."""


def check_accountant(name: str) -> str:
    """Return the normalised accountant name, refusing GDP and unknown names."""
    n = name.lower().strip()
    if n == "gdp":
        raise AccountantError(
            "accountant 'gdp' is refused: it is a CLT approximation that under-reports ε "
            "for fedfsd's settings; use 'prv' (headline) or 'rdp' (cross-check)"
        )
    if n not in ACCOUNTANTS:
        raise AccountantError(f"unknown accountant {name!r}; choose one of prv, rdp")
    return n


def normalise_history(history: Iterable[Sequence[float]]) -> History:
    """Validate a history and merge adjacent entries with the same (σ, q), as Opacus does."""
    out: History = []
    for entry in history:
        if len(entry) != 3:
            raise AccountantError(f"history entry {entry!r} is not (sigma, q, steps)")
        sigma, q, steps = float(entry[0]), float(entry[1]), int(entry[2])
        if not (math.isfinite(sigma) and sigma >= 0):
            raise AccountantError(f"noise multiplier {sigma} must be finite and >= 0")
        if not 0 < q <= 1:
            raise AccountantError(f"sample rate {q} must be in (0, 1]")
        if steps < 0 or steps != entry[2]:
            raise AccountantError(f"steps {entry[2]} must be a non-negative integer")
        if steps == 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def extend_history(
    history: Iterable[Sequence[float]], sigma: float, q: float, steps: int
) -> History:
    """The history after `steps` more steps at (σ, q)."""
    return normalise_history([*history, (sigma, q, steps)])


def compute_epsilon(
    history: Iterable[Sequence[float]], delta: float, accountant: str = "prv"
) -> float:
    """ε at `delta` for the whole history (0 for an empty one, ∞ if any step had σ = 0)."""
    acc_name = check_accountant(accountant)
    if not 0 < delta < 1:
        raise AccountantError(f"delta {delta} must be in (0, 1)")
    return _epsilon(tuple(normalise_history(history)), float(delta), acc_name)


@functools.lru_cache(maxsize=256)
def _epsilon(hist: tuple[tuple[float, float, int], ...], delta: float, acc_name: str) -> float:
    """Opacus' accountants are slow (seconds under load): cache by (history, δ, name)."""
    if not hist:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in hist):
        return math.inf
    import warnings

    from opacus.accountants import PRVAccountant, RDPAccountant

    if acc_name == "rdp":
        acc = RDPAccountant()
        acc.history = [tuple(h) for h in hist]
        return float(acc.get_epsilon(delta=delta))
    acc = PRVAccountant()
    acc.history = [tuple(h) for h in hist]
    with warnings.catch_warnings():  # q = 1 (a metric release): PRV takes log(1 - q) = log(0)
        warnings.simplefilter("ignore", RuntimeWarning)
        eps = float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
        if PRV_EPS_ERROR > 0.01 * eps:
            # Opacus' PRV error is absolute (ε upper bound ≤ ε + eps_error): refine it for
            # small ε so the headline stays within ~0.5% of the true value (floor:
            # PRV_MIN_EPS_ERROR).
            fine = max(PRV_MIN_EPS_ERROR, PRV_REL_ERROR * eps)
            eps = float(acc.get_epsilon(delta=delta, eps_error=fine))
    return eps
