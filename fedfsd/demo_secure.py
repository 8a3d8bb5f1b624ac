"""What `fedfsd demo --secure-aggregation` changes in the demo (issue 15).

The demo is the same (data, regions, baselines, personalisation, scoring, reports); only the
federation differs: each region's policy says `trust_model = "distributed"` with
`min_honest_regions` t, the aggregator runs every round as one secure DP-FedSGD step, and σ comes
from the planner's distributed mode (`fedfsd privacy plan --trust-model distributed`). Why one
module: the plain demo's code stays as it was, and every secure-only choice is in one place.

ε is never recomputed here: both values per region come from the regions' reports (written from
their ledgers), and the live view reads the aggregator's epsilon.csv when a secure run writes it,
else the regions' ledgers (the demo plays every role; it says which it read).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRUST_MODEL = "distributed"


@dataclass(frozen=True)
class SecurePlan:
    """The demo's secure schedule: one DP-FedSGD step per round, σ from the distributed planner.

    It has the attributes the demo reads from a local `Plan` (vehicles_per_step,
    noise_multiplier, steps_per_round, lr, rounds, to_json_dict), so the rest of the demo uses
    either without a branch.
    """

    dist: Any  # fedfsd.privacy.planner.DistributedSigmaPlan
    enforce_on: str  # the ε each region's budget is enforced on: "distributed" or "own_noise"
    noise_multiplier: float  # the planner's σ for `enforce_on`, at least the policies' floor
    lr: float  # the aggregator's server-lr: w ← w − lr·(noisy mean gradient)

    steps_per_round = 1

    @property
    def vehicles_per_step(self) -> int:
        return int(self.dist.vehicles_per_step)

    @property
    def rounds(self) -> int:
        return int(self.dist.rounds)

    @property
    def min_honest_regions(self) -> int:
        return int(self.dist.min_honest_regions)

    def to_json_dict(self) -> dict[str, Any]:
        """plan.json: the planner's whole answer and what the demo chose from it."""
        return {
            "trust_model": TRUST_MODEL,
            "enforce_on": self.enforce_on,
            "noise_multiplier": self.noise_multiplier,
            "server_lr": self.lr,
            "steps_per_round": 1,
            "total_steps": self.rounds,
            "distributed_plan": self.dist.model_dump(),
        }

    def describe(self) -> str:
        d = self.dist
        return (
            f"secure DP-FedSGD schedule from the planner's distributed mode for {d.vehicles} "
            f"declared vehicles per region, {d.regions} regions, t = {d.min_honest_regions}, "
            f"ε {d.epsilon_target:g}, δ {d.delta:g}: {d.rounds} rounds of one step, "
            f"{d.vehicles_per_step} expected vehicles per step and region, σ "
            f"{self.noise_multiplier:.3f} (σ for ε under the distributed assumption "
            f"{d.sigma_distributed:.3f}, from own noise alone {d.sigma_own_noise:.3f}; budget "
            f"enforced on {self.enforce_on}), server lr {self.lr:g}"
        )


def vehicles_per_step(wanted: int, public_vehicles: int) -> int:
    """m: the wanted expected vehicles per step, at most half the declared fleet (power of two).

    The same cap as the local planner's: q = m/N ≤ 1/2 (the subsampling bound is loose at
    large q: docs/privacy.md, "Distributed noise").
    """
    half = max(1, public_vehicles // 2)
    return max(1, min(wanted, 1 << (half.bit_length() - 1)))


def model_dimension(model: str) -> int:
    """d: the number of coordinates a secure round sums (the registry model's parameters)."""
    from fedfsd.aggregator.server_app import initial_weights
    from fedfsd.aggregator.settings import RunSettings

    weights = initial_weights(RunSettings.model_validate({"model": model}))
    return int(sum(v.size for v in weights.values()))


def plan_secure(
    *,
    public_vehicles: int,
    epsilon: float,
    delta: float,
    rounds: int,
    regions: int,
    min_honest_regions: int,
    wanted_vehicles_per_step: int,
    model: str,
    clip_norm: float,
    enforce_on: str,
    min_noise_multiplier: float,
    lr: float,
) -> SecurePlan:
    """σ from `plan_distributed_sigma` for the assumption the budget is enforced on.

    A σ below the regions' floor (`min_noise_multiplier`) is raised to it: a region refuses a
    round whose σ is below its policy, and more noise only lowers ε.
    """
    from fedfsd.privacy.planner import plan_distributed_sigma

    dist = plan_distributed_sigma(
        public_vehicles,
        epsilon,
        delta,
        rounds,
        regions=regions,
        min_honest_regions=min_honest_regions,
        vehicles_per_step=vehicles_per_step(wanted_vehicles_per_step, public_vehicles),
        dimension=model_dimension(model),
        clip_norm=clip_norm,
    )
    sigma = dist.sigma_distributed if enforce_on == "distributed" else dist.sigma_own_noise
    sigma = math.ceil(max(sigma, min_noise_multiplier) * 1e4) / 1e4  # 4 decimals, rounded up
    return SecurePlan(dist=dist, enforce_on=enforce_on, noise_multiplier=sigma, lr=lr)


def policy_fields(plan: SecurePlan) -> dict[str, Any]:
    """The trust keys of each region's policy (docs/contracts.md, "Region policy")."""
    return {
        "trust_model": TRUST_MODEL,
        "min_honest_regions": plan.min_honest_regions,
        "enforce_on": plan.enforce_on,
    }


def run_config_fields(plan: SecurePlan) -> dict[str, Any]:
    """The run-config keys that make every round a secure one (`region-keys`: the federation)."""
    return {
        "secure-aggregation": True,
        "secagg-threshold": plan.min_honest_regions,
        "server-lr": plan.lr,
    }


def node_config(deploy_dir: Path) -> dict[str, Any]:
    """Each region's extra node config: the peers' registered keys (written by the federation)."""
    return {"peer-keys": str(deploy_dir / "region-keys.json")}


def ledger_epsilons(ledger: Path) -> dict[int, tuple[float, float]]:
    """round -> (ε distributed, ε own noise) of the region's distributed releases so far.

    Read while the region may be appending: a torn or missing ledger gives what is complete.
    """
    from fedfsd.privacy.ledger import Ledger, LedgerError

    try:
        recs = Ledger(ledger).releases() if ledger.exists() else []
    except (LedgerError, OSError, ValueError):
        return {}
    return {
        int(r["round"]): (float(r["epsilon_distributed"]), float(r["epsilon_own_noise"]))
        for r in recs
        if r.get("trust_model") == TRUST_MODEL
    }


def report_epsilons(reports: list[Path]) -> dict[str, dict[str, Any]]:
    """Per region, both ε and the enforced one, as the region's report states them."""
    from fedfsd.privacy.report import load_json
    from fedfsd.proto.fedfsd.v1 import report_pb2 as pb

    out: dict[str, dict[str, Any]] = {}
    for path in reports:
        doc = load_json(path)
        if not isinstance(doc, pb.EpsilonReport):
            continue
        d = doc.distributed
        out[doc.region] = {
            "epsilon_distributed": d.epsilon_distributed,
            "epsilon_own_noise": d.epsilon_own_noise,
            "enforce_on": d.enforce_on,
            "assumption_distributed": d.assumption_distributed,
            "assumption_own_noise": d.assumption_own_noise,
            "report": str(path),
        }
    return out


def transcript_summary(agg: Path) -> dict[str, Any]:
    """The aggregator's protocol transcript, condensed: rounds applied and who was summed."""
    path = agg / "secagg_transcript.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    summed = sorted({r for tr in lines for r in tr.get("summed", [])})
    return {
        "file": str(path),
        "rounds": len(lines),
        "applied": sum(1 for tr in lines if tr.get("applied")),
        "regions_summed": summed,
        "recovered_after_masking": sorted(
            {r for tr in lines for r in tr.get("recovered_after_masking", [])}
        ),
        "failures": [tr.get("failure") for tr in lines if tr.get("failure")],
    }


def has_rows(path: Path) -> bool:
    """A CSV or JSONL file with at least one line past a header (secure runs may write none)."""
    if not path.exists():
        return False
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    return len(lines) > (1 if path.suffix == ".csv" else 0)
