"""Plan a vehicle-level DP schedule from a fleet size and a privacy budget.

Why a rule, and this one. The DP-SGD step adds N(0, σ²C²) to the sum of the sampled vehicles'
clipped gradients and divides by the expected number m of vehicles per step, so the noise on
the averaged gradient has std (σ/m)·C. In the large-σ regime of the subsampled Gaussian,
ε ≈ q·√(2T·ln(1/δ))/σ with q = m/N, hence

    σ/m ≈ √(2T·ln(1/δ)) / (N·ε)                                    (independent of m)

Consequences: the noise per averaged gradient is set by T, N and ε, not by m (m only has to be
large enough to stay in the large-σ regime, σ ≳ 2); and the steps a budget affords grow with N·ε.

What limits the model is the noise that accumulates in the weights: T steps of lr η add a random
walk of std η·C·(σ/m)·√T per coordinate (before curvature pulls it back). Starting from the
constant-velocity prior (the residual at zero), the measurements say (pooled FDE@3s relative to
the prior alone; experiments/demo_schedule.py on validation episodes, experiments/fleet_scale.py
on test episodes): with W = (σ/m)·√T ≤ 0.074 every schedule scored 0.80-0.82× the prior
(N = 960, ε = 7.5: T = 15, 50, 100 on validation; N = 10,000: T = 300, W = 0.05), with
W = 0.12-0.16 0.85-0.88×, and with W ≥ 0.19 0.93-1.10× (N = 1,000, ε = 8: T = 300; N = 3,000,
ε = 1: T = 130). Plan v1 bounded σ/m alone (0.017, from a sweep with a randomly initialised
residual) and so let W grow as √T: exactly the long, noisy schedules that lost to the prior.

The rule (plan-v2), for N vehicles, target (ε, δ) and R rounds, with a weight-noise budget B:

(a) m = the smallest power of two ≥ MIN_VEHICLES_PER_STEP, capped by N/2 (rounded down to a
    power of two) and by `max_vehicles_per_step` (compute);
(b) T = the largest multiple of R (≤ `max_total_steps`, ≤ R·`max_steps_per_round`) for which the
    σ calibrated for (q = m/N, T) keeps W = (σ/m)·√T ≤ B; with σ/m ≈ √(2T·ln(1/δ))/(N·ε),
    T ≈ B·N·ε/√(2·ln(1/δ)): the schedule grows linearly with the fleet;
(c) while σ at that T is below SIGMA_FLOOR (the small-σ regime, where σ/m is inflated) m is
    doubled within the caps and (b) redone;
(d) σ = the smallest noise multiplier whose PRV ε (fedfsd.privacy.accounting.compute_epsilon,
    the ledger's own accountant) is ≤ the target for those T steps at rate q; when a step cap
    binds in (b), σ may fall under SIGMA_FLOOR: m is then doubled (within the caps) until the
    RDP-calibrated σ (cheap, ≥ the PRV one) is ≥ SIGMA_FLOOR.

The default budget (NOISE_BUDGET) is chosen on validation episodes by experiments/demo_schedule.py
(see experiments/README.md): the largest B whose validation score is within 0.01 of the best,
since at a given fleet the flat region costs nothing and larger fleets turn B into more steps.

Cost: each PRV evaluation costs 0.1-6 s (more at large q). The search brackets every quantity
with the RDP accountant first (RDP ε ≥ PRV ε, and RDP costs milliseconds), then bisects with PRV,
so a plan needs a few dozen PRV evaluations at most.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

from pydantic import BaseModel, ConfigDict

from fedfsd.errors import InputError
from fedfsd.privacy.accounting import compute_epsilon

# Default weight-noise budget W = (σ/m)·√T (module docstring; chosen on validation episodes by
# experiments/demo_schedule.py).
NOISE_BUDGET = 0.05
# σ at which σ/m is within ~5% of its large-σ limit (measured: N = 10,000, ε = 3, T = 1,000:
# σ/m = 0.00473 at σ = 2.4, 0.00458 at σ = 4.7, 0.0053 at σ = 1.4).
SIGMA_FLOOR = 2.0
# Fewer vehicles per step than this makes the gradient's sampling variance, not DP noise, the
# limit; the sweep's 16 vehicles per step was its worst regime.
MIN_VEHICLES_PER_STEP = 64
# Compute cap on expected vehicles per step (m × K frames per step): 1,024 × 8 frames is a
# ~0.2 s DP step of the object-list MLP on one CPU core. Region policies' default
# max_vehicles_per_step (fedfsd.config) equals it, so a plan is not silently capped.
MAX_VEHICLES_PER_STEP = 1024
MAX_TOTAL_STEPS = 2000  # total DP steps of a run (all rounds)
MAX_STEPS_PER_ROUND = 200  # = RegionPolicy.max_local_steps' default
DEFAULT_LR = 0.2  # the sweep's best schedule (20 × 3 steps, 128 vehicles, lr 0.2)
RULE = (
    "plan-v2: m = 2^k >= 64 (<= N/2, cap), doubled while sigma < 2; max T with sigma/m*sqrt(T) <= B"
)

_SIGMA_REL_TOL = 0.005  # σ is calibrated to within 0.5% (above) of the smallest admissible σ


class PlanError(InputError, ValueError):
    """A plan that cannot be made: bad inputs or an unreachable target; the message says why."""


class Plan(BaseModel):
    """A DP schedule for one region's fleet (JSON-serialisable; `run_config` feeds the server)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vehicles: int
    epsilon_target: float
    delta: float
    rounds: int
    vehicles_per_step: int
    sample_rate: float
    noise_multiplier: float
    steps_per_round: int
    total_steps: int
    lr: float
    clip_norm: float
    frames_per_vehicle: int
    epsilon_prv: float
    epsilon_rdp: float
    noise_ratio: float  # σ/m: noise std on the averaged clipped gradient, in units of C
    weight_noise: float  # W = (σ/m)·√T: the noise a run accumulates in the weights (per lr)
    noise_budget: float  # the limit B on W this plan was made under
    limited_by: str  # which constraint set T: "noise ratio", "max total steps", ...
    rule: str = RULE
    plan_seconds: float = 0.0  # wall time of plan_schedule, first-use imports included

    def run_config(self) -> dict[str, Any]:
        """The aggregator's run-config keys this plan sets (fedfsd aggregator run --plan)."""
        return {
            "num-server-rounds": self.rounds,
            "local-steps": self.steps_per_round,
            "vehicles-per-step": self.vehicles_per_step,
            "noise-multiplier": self.noise_multiplier,
            "lr": self.lr,
            "clip-norm": self.clip_norm,
            "frames-per-vehicle": self.frames_per_vehicle,
        }

    def to_json_dict(self) -> dict[str, Any]:
        """The plan file's content: every field plus `run_config` (what the aggregator reads)."""
        return {**self.model_dump(), "run_config": self.run_config()}


def _eps(sigma: float, q: float, steps: int, delta: float, accountant: str = "prv") -> float:
    return compute_epsilon([(sigma, q, steps)], delta, accountant)


def _rdp_curve(sigma: float, q: float, delta: float) -> Any:
    """T → RDP ε for T steps at (σ, q): one per-step RDP vector, then composition is a product.

    The same orders and conversion as Opacus' RDPAccountant (what compute_epsilon's "rdp" uses),
    without recomputing the per-step RDP for every T.
    """
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    orders = RDPAccountant.DEFAULT_ALPHAS
    one = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders))

    def eps(steps: int) -> float:
        with warnings.catch_warnings():  # "optimal order is the largest alpha": a bound still
            warnings.simplefilter("ignore", UserWarning)
            e, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=one * steps, delta=delta)
        return float(e)

    return eps


def _rdp_sigma(target_eps: float, delta: float, q: float, steps: int) -> float:
    """σ calibrated with RDP (cheap): an upper bound on the PRV-calibrated σ."""

    def over(sigma: float) -> bool:
        return _rdp_curve(sigma, q, delta)(steps) > target_eps

    lo, hi = 0.05, 1.0
    while over(hi):
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise PlanError(f"no noise multiplier reaches ε = {target_eps:g} at q = {q:.4g}")
    while hi - lo > 0.002 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if over(mid) else (lo, mid)
    return hi


def calibrate_sigma(
    target_eps: float, delta: float, q: float, steps: int, admissible: float | None = None
) -> float:
    """Smallest σ (within 0.5%) whose PRV ε for `steps` steps at rate q is ≤ `target_eps`.

    Starts from a σ known to be admissible (`admissible`, else the RDP-calibrated σ: RDP ε ≥
    PRV ε), then a bracketed secant search on log σ vs log ε (ε ∝ 1/σ for large σ) with fedfsd's
    own compute_epsilon (PRV, the ledger's accountant), so a plan is never refused by the
    region's own budget check. Typically 3-6 PRV evaluations.
    """
    if not (target_eps > 0 and math.isfinite(target_eps)):
        raise PlanError(f"ε target must be a positive number, got {target_eps}")
    if steps < 1:
        raise PlanError(f"steps must be >= 1, got {steps}")
    hi = admissible if admissible is not None else _rdp_sigma(target_eps, delta, q, steps)
    e_hi = _eps(hi, q, steps, delta)
    while e_hi > target_eps:  # not expected (RDP ≥ PRV); be safe
        hi *= 1.05
        e_hi = _eps(hi, q, steps, delta)
    lo, e_lo = 0.0, math.inf  # inadmissible side (unknown yet)
    for _ in range(30):
        if e_hi >= target_eps * (1 - _SIGMA_REL_TOL) or (lo and hi - lo <= _SIGMA_REL_TOL * hi):
            break
        if e_hi <= 0:
            guess = hi / 2
        elif math.isinf(e_lo):  # ε ∝ 1/σ: aim a little below the target from the admissible side
            guess = max(hi / 2, hi * e_hi / (target_eps * (1 - _SIGMA_REL_TOL / 2)))
        else:  # secant in (log σ, log ε) between the bracket's ends
            t = (math.log(target_eps) - math.log(e_hi)) / (math.log(e_lo) - math.log(e_hi))
            guess = math.exp(math.log(hi) + t * (math.log(lo) - math.log(hi)))
            guess = min(max(guess, lo + 0.1 * (hi - lo)), hi - 0.1 * (hi - lo))
        e = _eps(guess, q, steps, delta)
        if e <= target_eps:
            hi, e_hi = guess, e
        else:
            lo, e_lo = guess, e
    return hi


def _max_multiple(ok: Any, k_max: int, k_lo: int = 0, grow: bool = False) -> int:
    """Largest k in [k_lo, k_max] with ok(k) (ok monotone: True then False; ok(k_lo) assumed).

    `grow`: the answer is expected near k_lo, so bracket upwards by factors of 1.5 first.
    """
    if k_lo >= k_max:
        return k_max
    lo, hi = k_lo, k_max
    if grow:
        while True:
            nxt = min(k_max, max(lo + 1, math.ceil(lo * 1.5)))
            if not ok(nxt):
                hi = nxt
                break
            lo = nxt
            if lo == k_max:
                return k_max
    elif ok(k_max):
        return k_max
    # ok(lo) (or lo == 0), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def _pow2_ceil(x: float) -> int:
    return 1 << max(0, int(math.ceil(math.log2(max(x, 1)))))


def _check_inputs(
    vehicles: int, epsilon: float, delta: float, rounds: int, noise_budget: float, **caps: int
) -> None:
    if vehicles < 2:
        raise PlanError(f"vehicles must be >= 2, got {vehicles}")
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise PlanError(f"epsilon must be a positive number, got {epsilon}")
    if not 0 < delta < 1:
        raise PlanError(f"delta must be in (0, 1), got {delta}")
    if not delta < 1.0 / vehicles:
        raise PlanError(
            f"delta {delta:g} must be < 1/vehicles = {1.0 / vehicles:.3g} "
            "(a larger δ can reveal a whole vehicle); choose δ well below 1/N"
        )
    if rounds < 1:
        raise PlanError(f"rounds must be >= 1, got {rounds}")
    if not (noise_budget > 0 and math.isfinite(noise_budget)):
        raise PlanError(f"noise budget must be a positive number, got {noise_budget}")
    for name, v in caps.items():
        if v < 1:
            raise PlanError(f"{name.replace('_', '-')} must be >= 1, got {v}")


def plan_schedule(
    vehicles: int,
    epsilon: float,
    delta: float,
    rounds: int,
    *,
    frames_per_vehicle: int = 8,
    clip_norm: float = 1.0,
    max_vehicles_per_step: int = MAX_VEHICLES_PER_STEP,
    max_total_steps: int = MAX_TOTAL_STEPS,
    max_steps_per_round: int = MAX_STEPS_PER_ROUND,
    noise_budget: float = NOISE_BUDGET,
    lr: float = DEFAULT_LR,
) -> Plan:
    """The schedule the module docstring's rule gives; PlanError if none reaches the target.

    `vehicles` is the region's declared, rounded-DOWN public fleet size: planning with fewer
    vehicles than the fleet has over-estimates q = m/N, so the planned ε is an upper bound.
    """
    t0 = time.monotonic()
    _check_inputs(
        vehicles,
        epsilon,
        delta,
        rounds,
        noise_budget,
        frames_per_vehicle=frames_per_vehicle,
        max_vehicles_per_step=max_vehicles_per_step,
        max_total_steps=max_total_steps,
        max_steps_per_round=max_steps_per_round,
    )
    if not clip_norm > 0 or not lr > 0:
        raise PlanError("clip norm and lr must be > 0")
    k_cap = min(max_total_steps // rounds, max_steps_per_round)  # steps per round
    if k_cap < 1:
        raise PlanError(
            f"max-total-steps {max_total_steps} is below one step per round for {rounds} rounds"
        )
    cap_name = (
        "max total steps" if k_cap * rounds > max_total_steps - rounds else "max steps per round"
    )
    m_cap = min(_pow2_floor(vehicles / 2), _pow2_floor(max_vehicles_per_step))
    m = min(m_cap, _pow2_ceil(MIN_VEHICLES_PER_STEP))

    def sigma_max(m: int, k: int) -> float:
        """The largest σ/m·m that keeps W ≤ B over k steps per round."""
        return noise_budget * m / math.sqrt(k * rounds)

    def steps_for(m: int, accountant: str) -> int:
        """Largest steps per round whose σ keeps W ≤ B (0 if not even one).

        ε(σ_max(T), q, T) rises with T (more steps, less noise each), so the test is monotone.
        RDP ε ≥ PRV ε: the RDP answer is a lower bound, and PRV searches upwards from it.
        """
        q = m / vehicles
        with warnings.catch_warnings():  # small σ: "optimal order is the smallest alpha"; the
            warnings.simplefilter("ignore", UserWarning)  # bound still holds, just loosely
            k = _max_multiple(
                lambda k: _eps(sigma_max(m, k), q, k * rounds, delta, "rdp") <= epsilon, k_cap
            )
        if accountant == "prv" and k < k_cap:
            k = _max_multiple(
                lambda k: k > 0 and _eps(sigma_max(m, k), q, k * rounds, delta) <= epsilon,
                k_cap,
                k,
                grow=True,
            )
        return k

    # rule (c) with the cheap accountant: double m while σ at the planned T is small
    k = steps_for(m, "rdp")
    while m < m_cap and (k == 0 or sigma_max(m, max(k, 1)) < SIGMA_FLOOR):
        m *= 2
        k = steps_for(m, "rdp")
    k = steps_for(m, "prv")
    if k == 0:
        q = m / vehicles
        fit = _max_multiple(
            lambda t: t > 0 and _eps(noise_budget * m / math.sqrt(t), q, t, delta) <= epsilon,
            rounds - 1,
        )
        hint = (
            f"at most {fit} step(s) fit, so plan at most {fit} round(s)"
            if fit
            else "not even one step fits"
        )
        raise PlanError(
            f"ε = {epsilon:g} for {vehicles} vehicles cannot keep the weight noise "
            f"(σ/m)·√T ≤ {noise_budget:g} over {rounds} round(s) (one step each, {m} vehicles "
            f"per step): {hint}; or raise ε or --noise-budget"
        )
    limited_by = "noise budget" if k < k_cap else cap_name
    total = k * rounds
    admissible = sigma_max(m, k)
    if limited_by != "noise budget":  # rule (d): a step cap binds, W is below its budget
        while True:
            admissible = min(sigma_max(m, k), _rdp_sigma(epsilon, delta, m / vehicles, total))
            if admissible >= SIGMA_FLOOR or m >= m_cap:
                break
            m *= 2
    sigma = calibrate_sigma(epsilon, delta, m / vehicles, total, admissible=admissible)
    sigma = math.ceil(sigma * 1e4) / 1e4  # 4 decimals, rounded up: ε only falls
    q = m / vehicles
    return Plan(
        vehicles=vehicles,
        epsilon_target=epsilon,
        delta=delta,
        rounds=rounds,
        vehicles_per_step=m,
        sample_rate=q,
        noise_multiplier=sigma,
        steps_per_round=k,
        total_steps=total,
        lr=lr,
        clip_norm=clip_norm,
        frames_per_vehicle=frames_per_vehicle,
        epsilon_prv=_eps(sigma, q, total, delta),
        epsilon_rdp=_eps(sigma, q, total, delta, "rdp"),
        noise_ratio=sigma / m,
        weight_noise=sigma / m * math.sqrt(total),
        noise_budget=noise_budget,
        limited_by=limited_by,
        plan_seconds=round(time.monotonic() - t0, 2),
    )


# ---- distributed noise (issue 15): σ for a target ε under both trust assumptions -------------


class DistributedSigmaPlan(BaseModel):
    """σ a DP-FedSGD schedule (one noisy sum per round) needs for ε, under each assumption."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vehicles: int
    epsilon_target: float
    delta: float
    rounds: int
    vehicles_per_step: int
    sample_rate: float
    regions: int
    min_honest_regions: int
    dimension: int
    clip_norm: float
    scale: float
    sigma_distributed: float  # enough if ≥ t regions are honest and secure aggregation holds
    sigma_own_noise: float  # enough if every other region cheated
    sigma_local: float  # today's local mode, same schedule (Gaussian, RDP: comparable)
    # Noise std on the global average of the R regions' summed gradients (units of C): every
    # region adds variance (σ s C)²/t, so σ/(m·√(R·t)); local mode: σ_local/(m·√R).
    noise_ratio_distributed: float
    noise_ratio_own_noise: float
    noise_ratio_local: float


def _sigma_for(target: float, eps_of: Any, lo: float = 0.3, hi: float = 100.0) -> float:
    """Smallest σ (to _SIGMA_REL_TOL, from above) with eps_of(σ) ≤ target (bisection in log σ)."""
    if eps_of(hi) > target:
        raise PlanError(f"ε = {target:g} is unreachable even at σ = {hi:g}")
    if eps_of(lo) <= target:
        return lo
    while hi / lo > 1 + _SIGMA_REL_TOL:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps_of(mid) <= target else (mid, hi)
    return hi


def plan_distributed_sigma(
    vehicles: int,
    epsilon: float,
    delta: float,
    rounds: int,
    *,
    regions: int,
    min_honest_regions: int,
    vehicles_per_step: int,
    dimension: int,
    clip_norm: float = 1.0,
) -> DistributedSigmaPlan:
    """σ for ε after `rounds` distributed releases at q = m/N, under each assumption."""
    from fedfsd.privacy.distributed_accounting import SkellamRound
    from fedfsd.privacy.distributed_accounting import epsilon as dist_eps
    from fedfsd.privacy.skellam import choose_scale, share_variance

    if not 2 <= min_honest_regions <= regions:
        raise PlanError(f"--min-honest {min_honest_regions} must be in 2..regions ({regions})")
    if not (0 < delta < 1 / vehicles and epsilon > 0 and rounds >= 1 and dimension >= 1):
        raise PlanError("need ε > 0, 0 < δ < 1/vehicles, rounds ≥ 1 and dimension ≥ 1")
    m = min(vehicles_per_step, vehicles)
    q = m / vehicles
    s = choose_scale(clip_norm, dimension)

    def eps_of(assumption: Any) -> Any:
        def f(sigma: float) -> float:
            r = SkellamRound(
                sample_rate=q,
                share_variance=share_variance(sigma, s, clip_norm, min_honest_regions),
                min_honest_regions=min_honest_regions,
                scale=s,
                clip_norm=clip_norm,
                dimension=dimension,
                rounds=rounds,
            )
            return dist_eps([r], delta, assumption)

        return f

    sd = _sigma_for(epsilon, eps_of("distributed"))
    so = _sigma_for(epsilon, eps_of("own_noise"))
    sl = _sigma_for(epsilon, lambda sigma: compute_epsilon([(sigma, q, rounds)], delta, "rdp"))
    root = math.sqrt(regions * min_honest_regions)
    return DistributedSigmaPlan(
        vehicles=vehicles,
        epsilon_target=epsilon,
        delta=delta,
        rounds=rounds,
        vehicles_per_step=m,
        sample_rate=q,
        regions=regions,
        min_honest_regions=min_honest_regions,
        dimension=dimension,
        clip_norm=clip_norm,
        scale=s,
        sigma_distributed=sd,
        sigma_own_noise=so,
        sigma_local=sl,
        noise_ratio_distributed=sd / (m * root),
        noise_ratio_own_noise=so / (m * root),
        noise_ratio_local=sl / (m * math.sqrt(regions)),
    )
