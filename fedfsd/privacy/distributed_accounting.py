"""ε of distributed-noise releases: Poisson-subsampled Skellam mechanisms, composed in RDP.

One distributed release (one round of a region in `distributed` trust mode, DP-FedSGD) is one
Poisson-subsampled (rate q) Skellam mechanism on the region's rounded integer gradient sum, with
the inflated sensitivities of fedfsd.privacy.skellam. Its ε is stated under two assumptions:

- **distributed**: at least t = `min_honest_regions` regions are honest and secure aggregation
  holds, so the released sum carries Skellam noise of variance ≥ t·μ_share;
- **own noise**: every other region cheated or colluded with the aggregator, so only the
  region's own share μ_share protects its vehicles.

The bounds (all in Rényi DP at integer orders α ≥ 2):

- Skellam, Agarwal, Kairouz & Liu, "The Skellam Mechanism for Differentially Private Federated
  Learning", NeurIPS 2021 (multi-dimensional RDP theorem), written with μ the per-coordinate
  *variance* of the noise and Δ1, Δ2 the L1, L2 sensitivities:
      ε(α) ≤ α·Δ2²/(2μ) + min( ((2α − 1)·Δ2² + 6·Δ1) / (4μ²),  3·Δ1/(2μ) ).
  The first term is the Gaussian mechanism's RDP; the second vanishes as μ grows.
- Poisson subsampling, Zhu & Wang, "Poisson Subsampled Rényi Differential Privacy", ICML 2019,
  Theorem 6 (the general upper bound, any mechanism, integer α ≥ 2):
      ε'(α) ≤ 1/(α−1) · log{ (1−q)^(α−1)·(αq − q + 1) + C(α,2)·q²·(1−q)^(α−2)·e^{ε(2)}
                             + 3·Σ_{l=3..α} C(α,l)·(1−q)^(α−l)·q^l·e^{(l−1)·ε(l)} },
  computed in log space; the unsampled ε(α) is also a valid bound, so the smaller is used.
- Composition adds RDP over releases (and over the region's Gaussian DP-SGD history when a ledger
  mixes local and distributed releases: Opacus' subsampled-Gaussian RDP at the same orders);
  the conversion to (ε, δ) is Opacus' `get_privacy_spent` (Balle et al. 2020).

PRV cannot account Skellam here, so a ledger with a distributed release is accounted in RDP
throughout (its ε is conservative against PRV for the Gaussian part); a ledger's two histories
travel together as fedfsd.privacy.accounting_mixed.Spend (`Ledger.spend()`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import gammaln, logsumexp  # type: ignore[import-untyped]

from fedfsd.privacy.accounting import AccountantError, normalise_history
from fedfsd.privacy.skellam import inflated_sensitivities

Assumption = Literal["distributed", "own_noise"]
ASSUMPTIONS: tuple[Assumption, ...] = ("distributed", "own_noise")
# Integer orders only: both bounds are stated for integer α. 2..256 covers ε from ~0.05 to ~50
# at fedfsd's δ; the Gaussian part uses the same orders so RDP curves add.
ORDERS: tuple[int, ...] = (*range(2, 65), *range(68, 257, 4))
METHOD = (
    "RDP: Skellam bound (Agarwal, Kairouz & Liu 2021) on the rounded integer sum with inflated "
    "sensitivities, Poisson-subsampled (Zhu & Wang 2019, Thm 6), composed over releases, "
    "converted with Opacus get_privacy_spent"
)
STATEMENTS: dict[str, str] = {
    "distributed": "if at least {t} regions are honest and secure aggregation holds",
    "own_noise": "if every other region cheated (only this region's own noise share counts)",
}


class SkellamRound(BaseModel):
    """The recorded parameters of distributed releases at one setting (a ledger history entry).

    `as_list`/`from_list` give the ledger's compact form [q, μ_share, t, s, C, d, rounds]."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sample_rate: float = Field(gt=0, le=1)
    share_variance: float = Field(gt=0)
    min_honest_regions: int = Field(ge=1)
    scale: float = Field(gt=0)
    clip_norm: float = Field(gt=0)
    dimension: int = Field(ge=1)
    rounds: int = Field(ge=0)

    def key(self) -> tuple[float, float, int, float, float, int]:
        return (
            self.sample_rate,
            self.share_variance,
            self.min_honest_regions,
            self.scale,
            self.clip_norm,
            self.dimension,
        )

    def as_list(self) -> list[float]:
        return [*self.key(), self.rounds]

    @classmethod
    def from_list(cls, entry: Sequence[float]) -> SkellamRound:
        if len(entry) != 7:
            raise AccountantError(f"distributed history entry {entry!r} is not 7 numbers")
        q, mu, t, s, c, d, n = entry
        if int(t) != t or int(d) != d or int(n) != n:
            raise AccountantError(f"distributed history entry {entry!r}: t, d, rounds not integers")
        return cls(
            sample_rate=q,
            share_variance=mu,
            min_honest_regions=int(t),
            scale=s,
            clip_norm=c,
            dimension=int(d),
            rounds=int(n),
        )

    def variance(self, assumption: Assumption) -> float:
        """Noise variance protecting a vehicle under the assumption."""
        if assumption == "distributed":
            return self.min_honest_regions * self.share_variance
        return self.share_variance


SkellamHistory = list[SkellamRound]


def normalise_skellam_history(entries: Iterable[Sequence[float] | SkellamRound]) -> SkellamHistory:
    """Validate and merge adjacent entries with the same parameters (as the Gaussian history)."""
    out: SkellamHistory = []
    for e in entries:
        r = e if isinstance(e, SkellamRound) else SkellamRound.from_list(e)
        if r.rounds == 0:
            continue
        if out and out[-1].key() == r.key():
            out[-1] = out[-1].model_copy(update={"rounds": out[-1].rounds + r.rounds})
        else:
            out.append(r)
    return out


def skellam_rdp(alpha: int, l1: float, l2: float, variance: float) -> float:
    """RDP of the Skellam mechanism at integer order α (Agarwal, Kairouz & Liu 2021)."""
    if alpha < 2 or int(alpha) != alpha:
        raise AccountantError(f"the Skellam bound needs an integer order ≥ 2, got {alpha}")
    gauss = alpha * l2 * l2 / (2 * variance)
    extra = min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))
    return gauss + extra


def _log_binom(n: int, k: int) -> float:
    return float(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1))


def subsampled_rdp(alpha: int, q: float, base: Sequence[float]) -> float:
    """Zhu & Wang (2019) Thm 6 at integer α ≥ 2; `base[l - 2]` is the unsampled RDP at order l.

    Returns min(bound, unsampled ε(α)); q = 1 gives the unsampled bound exactly."""
    if alpha < 2 or int(alpha) != alpha:
        raise AccountantError(f"the subsampling bound needs an integer order ≥ 2, got {alpha}")
    if not 0 < q <= 1:
        raise AccountantError(f"sample rate {q} must be in (0, 1]")
    if len(base) < alpha - 1:
        raise AccountantError(f"need the unsampled RDP at orders 2..{alpha}")
    unsampled = float(base[alpha - 2])
    if q == 1.0:
        return unsampled
    lq, l1q = math.log(q), math.log1p(-q)
    terms = [(alpha - 1) * l1q + math.log1p((alpha - 1) * q)]
    terms.append(_log_binom(alpha, 2) + 2 * lq + (alpha - 2) * l1q + float(base[0]))
    for j in range(3, alpha + 1):
        terms.append(
            math.log(3)
            + _log_binom(alpha, j)
            + j * lq
            + (alpha - j) * l1q
            + (j - 1) * float(base[j - 2])
        )
    bound = float(logsumexp(terms)) / (alpha - 1)
    return min(bound, unsampled)


@functools.lru_cache(maxsize=512)
def _round_rdp(
    q: float, variance: float, l1: float, l2: float, orders: tuple[int, ...]
) -> tuple[float, ...]:
    top = max(orders)
    base = [skellam_rdp(a, l1, l2, variance) for a in range(2, top + 1)]
    return tuple(subsampled_rdp(a, q, base) for a in orders)


def skellam_round_rdp(
    r: SkellamRound, assumption: Assumption, orders: Sequence[int] = ORDERS
) -> np.ndarray:
    """RDP curve of ONE release with r's parameters under the assumption."""
    if assumption not in ASSUMPTIONS:
        raise AccountantError(f"unknown assumption {assumption!r}; one of {ASSUMPTIONS}")
    l1, l2 = inflated_sensitivities(r.scale, r.clip_norm, r.dimension)
    curve = _round_rdp(r.sample_rate, r.variance(assumption), l1, l2, tuple(int(a) for a in orders))
    return np.asarray(curve)


def gaussian_rdp(history: Iterable[Sequence[float]], orders: Sequence[int] = ORDERS) -> np.ndarray:
    """Opacus' subsampled-Gaussian RDP of a (σ, q, steps) history at the given orders."""
    from opacus.accountants.analysis.rdp import compute_rdp

    total = np.zeros(len(orders))
    for sigma, q, steps in normalise_history(history):
        if sigma == 0:
            return np.full(len(orders), math.inf)
        total += np.asarray(
            compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=[float(a) for a in orders])
        )
    return total


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: Sequence[int] = ORDERS) -> float:
    """(ε, δ) from an RDP curve with Opacus' conversion (0 for a zero curve)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not 0 < delta < 1:
        raise AccountantError(f"delta {delta} must be in (0, 1)")
    if not np.any(rdp):
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the smallest": the bounds need α ≥ 2
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=[float(a) for a in orders], rdp=rdp, delta=delta)
    return float(eps)


def epsilon(
    skellam_history: Iterable[Sequence[float] | SkellamRound],
    delta: float,
    assumption: Assumption,
    gaussian_history: Iterable[Sequence[float]] = (),
    orders: Sequence[int] = ORDERS,
) -> float:
    """ε at δ of the distributed releases (and any Gaussian history) under one assumption."""
    rdp = gaussian_rdp(gaussian_history, orders)
    for r in normalise_skellam_history(skellam_history):
        rdp = rdp + r.rounds * skellam_round_rdp(r, assumption, orders)
    return rdp_to_epsilon(rdp, delta, orders)


def epsilons(
    skellam_history: Iterable[Sequence[float] | SkellamRound],
    delta: float,
    gaussian_history: Iterable[Sequence[float]] = (),
) -> dict[str, float]:
    """ε under both assumptions: {"distributed": …, "own_noise": …}."""
    sk = normalise_skellam_history(skellam_history)
    gh = normalise_history(gaussian_history)
    return {a: epsilon(sk, delta, a, gh) for a in ASSUMPTIONS}
