"""ε of one vehicle fleet's whole spend: local (Gaussian) and distributed (Skellam) releases.

A region runs plain rounds (the region adds all the noise: Poisson-subsampled Gaussian, Opacus'
history) and secure rounds (it adds a Skellam share: fedfsd.privacy.distributed_accounting) on one
ledger, because the budget belongs to the vehicle fleet, not to a trust mode. A vehicle took part
in all of them, so its ε composes every release:

- own-noise ε  = Gaussian releases + the Skellam releases with the region's own share alone;
- distributed ε = Gaussian releases + the Skellam releases with the sum of ≥ t honest shares.

A Gaussian release gives the same protection under either assumption (the region added all of its
noise), so it enters both compositions unchanged. Composition is in RDP at the Skellam bound's
integer orders (Opacus' subsampled-Gaussian RDP for the Gaussian part), converted with Opacus'
`get_privacy_spent`; PRV cannot account Skellam. A spend without a distributed release keeps the
accountant the caller names (PRV headline, RDP cross-check): exactly today's numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedfsd.privacy.accounting import History, compute_epsilon, extend_history, normalise_history
from fedfsd.privacy.distributed_accounting import (
    ASSUMPTIONS,
    Assumption,
    SkellamHistory,
    SkellamRound,
    normalise_skellam_history,
)
from fedfsd.privacy.distributed_accounting import epsilon as composed_rdp_epsilon


@dataclass(frozen=True)
class Spend:
    """Both histories of a ledger: what every future ε of the fleet is computed from."""

    gaussian: History = field(default_factory=list)
    skellam: SkellamHistory = field(default_factory=list)

    @classmethod
    def of(
        cls,
        gaussian: Iterable[Sequence[float]] = (),
        skellam: Iterable[Sequence[float] | SkellamRound] = (),
    ) -> Spend:
        return cls(normalise_history(gaussian), normalise_skellam_history(skellam))

    @property
    def mixed(self) -> bool:
        """True once a distributed release is in the spend (ε is then RDP for both parts)."""
        return bool(self.skellam)

    def with_gaussian(self, gaussian: Iterable[Sequence[float]]) -> Spend:
        """The same distributed part with another Gaussian history (a projection's)."""
        return Spend(normalise_history(gaussian), self.skellam)

    def plus_gaussian(self, sigma: float, q: float, steps: int) -> Spend:
        """The spend after `steps` more Gaussian steps at (σ, q)."""
        return Spend(extend_history(self.gaussian, sigma, q, steps), self.skellam)

    def epsilon(
        self, delta: float, assumption: Assumption = "own_noise", accountant: str = "prv"
    ) -> float:
        """ε at δ under `assumption`: `accountant` (PRV/RDP) for a Gaussian-only spend, the RDP
        composition of both parts otherwise (`accountant` is then ignored)."""
        if not self.skellam:
            return compute_epsilon(self.gaussian, delta, accountant)
        return composed_rdp_epsilon(self.skellam, delta, assumption, self.gaussian)

    def epsilons(self, delta: float) -> dict[str, float]:
        """ε under both assumptions ({"distributed": …, "own_noise": …}); RDP when mixed."""
        return {a: self.epsilon(delta, a, "rdp") for a in ASSUMPTIONS}

    def record_fields(self, delta: float, enforce_on: Assumption) -> dict[str, Any]:
        """What a local (Gaussian) line on a mixed ledger adds: both ε, the assumption enforced
        and the distributed history it carries unchanged, so the line alone reproduces ε."""
        if not self.skellam:
            return {}
        eps = self.epsilons(delta)
        return {
            "epsilon_distributed": eps["distributed"],
            "epsilon_own_noise": eps["own_noise"],
            "enforce_on": enforce_on,
            "distributed_history": [r.as_list() for r in self.skellam],
        }
