"""The region's per-round plan for a distributed release: share size, scale, ε both ways, refusal.

A region in `distributed` trust mode calls `plan_distributed_release` before anything leaves
(the same place the local path projects its budget): it fixes the quantisation scale s and the
noise-share variance μ_share = (σ s C)²/t, computes ε after this round under both assumptions
(fedfsd.privacy.distributed_accounting) and raises `DistributedBudgetExceeded` when the one the
policy enforces (`enforce_on`) would pass the budget. `record_fields` gives the ledger fields
the release line adds (docs/contracts.md "Ledger records"; fedfsd.privacy.release_record).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fedfsd.config import PolicyError, RegionPolicy
from fedfsd.errors import PrivacyRefusal
from fedfsd.privacy.accounting import History, normalise_history
from fedfsd.privacy.distributed_accounting import (
    SkellamHistory,
    SkellamRound,
    epsilons,
    normalise_skellam_history,
)
from fedfsd.privacy.skellam import choose_scale, share_variance


class DistributedBudgetExceeded(PrivacyRefusal, RuntimeError):
    """This round's distributed release would take the enforced ε over the budget."""

    def border_safe(self) -> str:
        """Only ε spent, projected, the budget and the assumption: safe to send."""
        return str(self)

    def __init__(self, assumption: str, spent: float, projected: float, budget: float) -> None:
        self.assumption, self.spent, self.projected, self.budget = (
            assumption,
            spent,
            projected,
            budget,
        )
        super().__init__(
            f"privacy budget exceeded (ε enforced on {assumption}): ε spent {spent:.3f}, this "
            f"round would bring it to {projected:.3f} > budget {budget:g}; round refused, "
            "nothing released"
        )


@dataclass(frozen=True)
class DistributedPlan:
    """What one distributed round will add and what ε it leaves, under both assumptions."""

    entry: SkellamRound  # this round (rounds = 1)
    history: SkellamHistory  # cumulative Skellam history after this round
    gaussian_history: History  # the region's Gaussian history (unchanged by this round)
    noise_multiplier: float
    epsilon_distributed: float
    epsilon_own_noise: float
    enforce_on: str
    budget: float

    @property
    def share_variance(self) -> float:
        return self.entry.share_variance

    @property
    def scale(self) -> float:
        return self.entry.scale

    @property
    def epsilon_enforced(self) -> float:
        return (
            self.epsilon_distributed if self.enforce_on == "distributed" else self.epsilon_own_noise
        )


def plan_distributed_release(
    policy: RegionPolicy,
    *,
    noise_multiplier: float,
    clip_norm: float,
    sample_rate: float,
    dimension: int,
    skellam_history: Iterable[Sequence[float] | SkellamRound] = (),
    gaussian_history: Iterable[Sequence[float]] = (),
    scale: float | None = None,
) -> DistributedPlan:
    """Plan one distributed round; refuses (before anything leaves) a round that would overspend.

    σ is the policy's floor at least, C at most its maximum; s defaults to `choose_scale`."""
    if policy.trust_model != "distributed" or policy.min_honest_regions is None:
        raise PolicyError(
            f"trust_model: the policy of {policy.region!r} is {policy.trust_model!r}; a "
            "distributed release needs trust_model = 'distributed' and min_honest_regions"
        )
    sigma = max(float(noise_multiplier), policy.min_noise_multiplier)
    c = min(float(clip_norm), policy.max_clip_norm)
    s = choose_scale(c, dimension) if scale is None else float(scale)
    t = policy.min_honest_regions
    entry = SkellamRound(
        sample_rate=sample_rate,
        share_variance=share_variance(sigma, s, c, t),
        min_honest_regions=t,
        scale=s,
        clip_norm=c,
        dimension=dimension,
        rounds=1,
    )
    before = normalise_skellam_history(skellam_history)
    gauss = normalise_history(gaussian_history)
    after = normalise_skellam_history([*before, entry])
    eps = epsilons(after, policy.delta, gauss)
    plan = DistributedPlan(
        entry=entry,
        history=after,
        gaussian_history=gauss,
        noise_multiplier=sigma,
        epsilon_distributed=eps["distributed"],
        epsilon_own_noise=eps["own_noise"],
        enforce_on=policy.enforce_on,
        budget=policy.epsilon_budget,
    )
    if plan.epsilon_enforced > policy.epsilon_budget:
        spent = epsilons(before, policy.delta, gauss)[policy.enforce_on] if before or gauss else 0.0
        raise DistributedBudgetExceeded(
            policy.enforce_on, spent, plan.epsilon_enforced, policy.epsilon_budget
        )
    return plan


def plan_from_ledger(ledger: Any, policy: RegionPolicy, **kw: Any) -> DistributedPlan:
    """`plan_distributed_release` with the histories of a `fedfsd.privacy.ledger.Ledger`."""
    return plan_distributed_release(
        policy,
        skellam_history=ledger.distributed_history(),
        gaussian_history=ledger.gaussian_history(),
        **kw,
    )


def record_fields(plan: DistributedPlan, policy: RegionPolicy) -> dict[str, Any]:
    """The mechanism and ε fields a distributed release line carries (the rest of the line, as
    for a local release, is the caller's: region, run, round, digests, …)."""
    e = plan.entry
    enforced = plan.epsilon_enforced
    if not math.isfinite(enforced):
        raise DistributedBudgetExceeded(plan.enforce_on, math.inf, math.inf, plan.budget)
    return {
        "trust_model": "distributed",
        "noise_multiplier": plan.noise_multiplier,
        "min_noise_multiplier": policy.min_noise_multiplier,
        "clip_norm": e.clip_norm,
        "sample_rate": e.sample_rate,
        "steps": 1,
        "sampling": "poisson",
        "delta": policy.delta,
        "min_honest_regions": e.min_honest_regions,
        "quantisation_scale": e.scale,
        "dimension": e.dimension,
        "noise_share_variance": e.share_variance,
        "epsilon_distributed": plan.epsilon_distributed,
        "epsilon_own_noise": plan.epsilon_own_noise,
        "enforce_on": plan.enforce_on,
        "epsilon_prv": enforced,
        "epsilon_rdp": enforced,
        "epsilon_budget": policy.epsilon_budget,
        "accountant_history": [list(h) for h in plan.gaussian_history],
        "distributed_history": [r.as_list() for r in plan.history],
    }
