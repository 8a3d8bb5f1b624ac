"""Privacy–utility study: is the federated, vehicle-level-DP model worth running?

    .venv/bin/python experiments/privacy_utility.py --quick
    .venv/bin/python experiments/privacy_utility.py                 # full size
    .venv/bin/python experiments/privacy_utility.py --tiny          # synthetic smoke run (tests)

On the held-out episodes of every region it compares
(a) centralised non-private training on the pooled data (the limit data-residency law forbids),
(b) each region alone, without and with vehicle-level DP,
(c) fedfsd federated with vehicle-level DP at several ε budgets, and without DP,
and scores every model on each training region, on their pooled test set (frame-weighted) and
on a held-out region that took no part in training (default `jp`).

The federation runs IN-PROCESS but through fedfsd's real code path: each round every region calls
`fedfsd.privacy.local_round.run_local_round` (its own policy and ledger), the region's egress
guard (`fedfsd.region.egress.guard_update` + manifest), the aggregator's verification
(`fedfsd.aggregator.update_checks.verify_update`) and FedAvg
(`fedfsd.aggregator.strategy.FedAvgMomentum`).
That is the algorithm the gRPC deployment runs, minus transport (costed by federation_cost.py).

For a target ε, each region's noise multiplier σ comes from Opacus' `get_noise_multiplier`
(accountant="prv") for its own q = vehicles per step / vehicles and rounds × local steps, raised
if fedfsd's own PRV accounting says it would overshoot; the region's policy sets σ as its floor
(the aggregator asks for σ = 0, so the policy decides, as in production). After training the ε
actually spent is read back from each region's ledger.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import typer
from common import (
    DATA_CACHE,
    bad_option,
    calibrate_sigma,
    console,
    ensure_dataset,
    load_region,
    machine,
    make_policy,
    mean_std,
    out_dir,
    pool_frames,
    rich_table,
    sized_preset,
    synthetic_region,
    write_json,
)

from fedfsd.run_config import default  # the schedule's defaults: one source

METRICS = ("ade", "fde", "accel_mae")
TARGET_RATIO = 1.25


@dataclass
class Study:
    """Sizes and hyper-parameters of one run of the study (recorded in the JSON)."""

    regions: list[str] = field(default_factory=lambda: ["cn", "eu", "us"])
    holdout: str = "jp"
    vehicles: int = 300
    episodes: int = 40
    data_seed: int = 11
    synthetic: bool = False
    # DP schedule (federated and local-only with DP). Vehicle-level DP at a few hundred vehicles
    # per region favours few, large steps: σ grows slowly with q but the noise per step is
    # divided by the expected vehicles per step. Chosen with experiments/dp_schedule_sweep.py
    # (the best federated pooled FDE whose win over local-only DP held on every region).
    rounds: int = 20
    local_steps: int = 3
    lr: float = default("lr")
    vehicles_per_step: int = default("vehicles-per-step")
    frames_per_vehicle: int = default("frames-per-vehicle")
    clip_norm: float = default("clip-norm")
    server_momentum: float = default("server-momentum")
    server_lr: float = default("server-lr")
    # Non-private schedule (centralised, local-only and federated without DP): without noise
    # more steps keep helping, so these models get many more, smaller steps. The centralised
    # model takes `len(regions)` × vehicles per step (it sees all regions' data).
    np_rounds: int = 10
    np_local_steps: int = 200
    np_lr: float = 0.1
    np_vehicles_per_step: int = 16
    update_norm_bound: float = 20.0
    epsilons: list[float] = field(default_factory=lambda: [1.0, 3.0, 8.0])
    local_dp_epsilon: float = 8.0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    model: str = default("model")


# -- training --------------------------------------------------------------------------------------
def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


@dataclass(frozen=True)
class Schedule:
    """Rounds, steps and step size of one condition."""

    rounds: int
    local_steps: int
    lr: float
    vehicles_per_step: int


def schedule(st: Study, private: bool, vps_factor: int = 1) -> Schedule:
    """The DP schedule or the non-private one (see `Study`)."""
    if private:
        return Schedule(st.rounds, st.local_steps, st.lr, st.vehicles_per_step * vps_factor)
    return Schedule(st.np_rounds, st.np_local_steps, st.np_lr, st.np_vehicles_per_step * vps_factor)


def _request(st: Study, sc: Schedule) -> Any:
    from fedfsd.config import TrainRequest

    return TrainRequest(
        local_steps=sc.local_steps,
        lr=sc.lr,
        noise_multiplier=0.0,  # the aggregator asks for nothing: each region's policy decides σ
        clip_norm=st.clip_norm,
        vehicles_per_step=sc.vehicles_per_step,
        frames_per_vehicle=st.frames_per_vehicle,
        model=st.model,
    )


def _policy(st: Study, frames: Any, eps: float | None, sc: Schedule) -> Any:
    """The region's policy for one condition; `eps=None` means non-private."""
    from fedfsd.privacy.dpsgd import sample_rate

    vps = sc.vehicles_per_step
    probe = make_policy(
        frames.region,
        n_vehicles=frames.n_vehicles,
        epsilon_budget=1.0,
        noise_multiplier=1.0,
        clip_norm=st.clip_norm,
        update_norm_bound=st.update_norm_bound,
        local_steps=sc.local_steps,
        vehicles_per_step=vps,
        frames_per_vehicle=st.frames_per_vehicle,
    )
    if eps is None:
        return probe.model_copy(update={"epsilon_budget": 1e9})
    q = sample_rate(vps, frames.n_vehicles)
    sigma = calibrate_sigma(eps, probe.delta, q, sc.rounds * sc.local_steps)
    return probe.model_copy(update={"epsilon_budget": eps, "min_noise_multiplier": sigma})


def initial(st: Study, frames: Any, seed: int) -> dict[str, np.ndarray]:
    """The round-0 model every condition of one seed starts from."""
    from fedfsd.models import build_model, get_weights

    return get_weights(
        build_model(st.model, frames.features.shape[1], frames.labels.shape[1], seed=seed)
    )


def train_alone(
    st: Study,
    frames: Any,
    eps: float | None,
    init: dict[str, np.ndarray],
    work: Path,
    tag: str,
    seed: int,
    vps_factor: int = 1,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """rounds × local steps of `run_local_round` on one fleet (local-only or centralised)."""
    from fedfsd.privacy.ledger import Ledger
    from fedfsd.privacy.local_round import run_local_round

    sc = schedule(st, eps is not None, vps_factor)
    policy = _policy(st, frames, eps, sc)
    ledger = work / f"{tag}-s{seed}" / "ledger.jsonl"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    request = _request(st, sc)
    weights = init
    for rnd in range(1, sc.rounds + 1):
        res = run_local_round(
            frames,
            policy,
            ledger,
            weights,
            request,
            f"{tag}-s{seed}",
            rnd,
            st.model,
            private=eps is not None,
            seed=_seed(tag, seed, rnd),
        )
        weights = res.new_weights
    spent = Ledger(ledger).epsilon(policy.delta, "prv") if eps is not None else math.inf
    info = {
        "sigma": policy.min_noise_multiplier if eps is not None else 0.0,
        "q": res.sample_rate,
        "delta": policy.delta,
        "epsilon_spent": spent,
        "vehicles": frames.n_vehicles,
    }
    return weights, info


def federate(
    st: Study,
    trains: dict[str, Any],
    eps: float | None,
    init: dict[str, np.ndarray],
    work: Path,
    tag: str,
    seed: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The federation in-process: region rounds → egress guard → verify → FedAvg (module doc)."""
    from fedfsd.aggregator.strategy import FedAvgMomentum
    from fedfsd.aggregator.update_checks import Expectation, verify_update
    from fedfsd.privacy.ledger import Ledger
    from fedfsd.privacy.local_round import run_local_round
    from fedfsd.region.egress import guard_update, make_manifest, num_examples

    sc = schedule(st, eps is not None)
    policies = {r: _policy(st, f, eps, sc) for r, f in trains.items()}
    ledgers = {r: work / f"{tag}-s{seed}" / r / "ledger.jsonl" for r in trains}
    for p in ledgers.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    run_id = f"{tag}-s{seed}"
    request = _request(st, sc)
    strategy = FedAvgMomentum(server_lr=st.server_lr, momentum=st.server_momentum)
    weights = init
    rejected: list[str] = []
    for rnd in range(1, sc.rounds + 1):
        exp = Expectation.from_weights(
            weights, norm_bound=st.update_norm_bound, run_id=run_id, round_idx=rnd
        )
        accepted = []
        for r, frames in trains.items():
            pol = policies[r]
            res = run_local_round(
                frames,
                pol,
                ledgers[r],
                weights,
                request,
                run_id,
                rnd,
                st.model,
                private=eps is not None,
                seed=_seed(tag, seed, r, rnd),
            )
            release = guard_update(weights, res.new_weights, pol.update_norm_bound)
            manifest = make_manifest(
                region=r,
                run_id=run_id,
                round_idx=rnd,
                release=release,
                update_norm_bound=pol.update_norm_bound,
                epsilon=res.epsilon if math.isfinite(res.epsilon) else 0.0,
                epsilon_budget=res.budget,
                delta=pol.delta,
                steps=res.steps,
            )
            reason = verify_update(release.arrays, manifest, exp)
            if reason is not None:
                rejected.append(f"round {rnd} {r}: {reason}")
                continue
            accepted.append((release.arrays, float(num_examples(pol.weighting, frames.n_vehicles))))
        if accepted:
            weights = strategy.step(weights, accepted)
    info: dict[str, Any] = {"rejected": rejected, "regions": {}}
    for r, pol in policies.items():
        info["regions"][r] = {
            "sigma": pol.min_noise_multiplier if eps is not None else 0.0,
            "q": sc.vehicles_per_step / trains[r].n_vehicles,
            "delta": pol.delta,
            "vehicles": trains[r].n_vehicles,
            "epsilon_spent": (
                Ledger(ledgers[r]).epsilon(pol.delta, "prv") if eps is not None else math.inf
            ),
        }
    return weights, info


# -- evaluation ------------------------------------------------------------------------------------
def score(st: Study, weights: dict[str, np.ndarray], tests: dict[str, Any]) -> dict[str, dict]:
    """Metrics per test region, plus 'pooled' over the training regions (frame-weighted)."""
    from fedfsd.region.evaluation import evaluate_weights

    out = {r: evaluate_weights(f, weights, st.model) for r, f in tests.items()}
    total = sum(tests[r].n_frames for r in st.regions)
    out["pooled"] = {
        m: sum(out[r][m] * tests[r].n_frames for r in st.regions) / total for m in METRICS
    }
    return out


def eps_label(eps: float | None) -> str:
    return "no DP" if eps is None else f"ε={eps:g}"


def run_study(st: Study, work: Path, data_cache: Path) -> dict[str, Any]:
    """Every condition for every seed; returns the raw per-seed scores and the privacy spend."""
    t0 = time.monotonic()
    trains, tests = load_data(st, data_cache)
    load_s = time.monotonic() - t0
    pooled_train = pool_frames([trains[r] for r in st.regions])
    raw: dict[str, list[dict]] = {}  # condition -> per seed scores
    privacy: dict[str, Any] = {}
    timing: dict[str, float] = {}

    def record(name: str, weights: dict[str, np.ndarray], t: float) -> None:
        raw.setdefault(name, []).append(score(st, weights, tests))
        timing[name] = timing.get(name, 0.0) + time.monotonic() - t

    for seed in st.seeds:
        init = initial(st, pooled_train, seed)
        console.print(f"[bold]seed {seed}[/]")
        t = time.monotonic()
        # Same number of steps; each step sees as many vehicles as all regions together.
        w, _ = train_alone(
            st,
            pooled_train,
            None,
            init,
            work,
            "centralised",
            seed,
            vps_factor=len(st.regions),
        )
        record("centralised (pooled, no DP)", w, t)
        for r in st.regions:
            for eps in (None, st.local_dp_epsilon):
                t = time.monotonic()
                w, info = train_alone(st, trains[r], eps, init, work, f"local-{r}-{eps}", seed)
                name = f"local {r} ({eps_label(eps)})"
                record(name, w, t)
                if eps is not None:
                    privacy.setdefault(name, []).append(info)
        for eps in [None, *st.epsilons]:
            t = time.monotonic()
            w, info = federate(st, trains, eps, init, work, f"fed-{eps}", seed)
            name = f"federated ({eps_label(eps)})"
            record(name, w, t)
            if info["rejected"]:
                console.print(f"[yellow]{name}: rejected updates: {info['rejected']}[/]")
            privacy.setdefault(name, []).append(info)
        console.print(f"  seed {seed} done ({time.monotonic() - t0:.0f} s so far)")
    return {
        "raw": raw,
        "privacy": privacy,
        "seconds": {"load": load_s, **timing, "total": time.monotonic() - t0},
        "data": {
            r: {
                "train_vehicles": trains[r].n_vehicles if r in trains else None,
                "train_frames": trains[r].n_frames if r in trains else None,
                "test_frames": tests[r].n_frames,
            }
            for r in tests
        },
    }


def load_data(st: Study, data_cache: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train splits of the training regions; test splits of those and of the held-out region."""
    trains: dict[str, Any] = {}
    tests: dict[str, Any] = {}
    for i, r in enumerate([*st.regions, st.holdout]):
        if st.synthetic:
            tr, te = synthetic_region(r, st.vehicles, st.episodes, st.data_seed + 100 * i)
        else:
            path = ensure_dataset(data_cache, r, st.vehicles, st.episodes, st.data_seed)
            tr = load_region(path, "train") if r != st.holdout else None
            te = load_region(path, "test")
        if r != st.holdout:
            trains[r] = tr
        tests[r] = te
    return trains, tests


# -- summary ---------------------------------------------------------------------------------------
def summarise(st: Study, res: dict[str, Any]) -> dict[str, Any]:
    """Mean ± std over seeds per condition and test set, and the two targets."""
    summary: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, per_seed in res["raw"].items():
        summary[name] = {}
        for test in per_seed[0]:
            summary[name][test] = {
                m: list(mean_std([s[test][m] for s in per_seed])) for m in METRICS
            }
    top = f"federated (ε={st.local_dp_epsilon:g})"
    central = "centralised (pooled, no DP)"
    targets: dict[str, Any] = {}
    if top in summary:
        fed, cen = summary[top]["pooled"]["fde"][0], summary[central]["pooled"]["fde"][0]
        targets["within_1.25x_of_centralised"] = {
            "federated_pooled_fde": fed,
            "centralised_pooled_fde": cen,
            "ratio": fed / cen,
            "met": fed <= TARGET_RATIO * cen,
        }
        per_region = {}
        for r in st.regions:
            f = summary[top][r]["fde"][0]
            dp = summary[f"local {r} (ε={st.local_dp_epsilon:g})"][r]["fde"][0]
            nodp = summary[f"local {r} (no DP)"][r]["fde"][0]
            per_region[r] = {
                "federated_fde": f,
                "local_dp_fde": dp,
                "local_no_dp_fde": nodp,
                "beats_local_dp": f < dp,
                "beats_local_no_dp": f < nodp,
            }
        targets["beats_every_local_only"] = {
            "per_region": per_region,
            "met_vs_local_dp": all(v["beats_local_dp"] for v in per_region.values()),
            "met_vs_local_no_dp": all(v["beats_local_no_dp"] for v in per_region.values()),
        }
    return {"summary": summary, "targets": targets}


def plot(st: Study, summary: dict[str, Any], path: Path) -> Path:
    """Left: pooled FDE vs ε (federated) against centralised/local; right: FDE per region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = sorted(st.epsilons)
    ys = [summary[f"federated (ε={e:g})"]["pooled"]["fde"] for e in xs]
    ax1.errorbar(
        xs,
        [y[0] for y in ys],
        yerr=[y[1] for y in ys],
        marker="o",
        capsize=3,
        label="federated, vehicle-level DP",
    )
    cen = summary["centralised (pooled, no DP)"]["pooled"]["fde"][0]
    nodp = summary["federated (no DP)"]["pooled"]["fde"][0]
    ax1.axhline(cen, color="k", ls="--", label="centralised, no DP")
    ax1.axhline(TARGET_RATIO * cen, color="k", ls=":", label="1.25 × centralised")
    ax1.axhline(nodp, color="tab:green", ls="--", label="federated, no DP")
    ax1.set_xscale("log")
    ax1.set_xticks(xs, [f"{e:g}" for e in xs])
    ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_xlabel("ε per region (PRV)")
    ax1.set_ylabel("FDE@3 s on pooled held-out episodes (m)")
    ax1.legend(fontsize=8)
    tests = [*st.regions, st.holdout]
    conds = [
        ("centralised (pooled, no DP)", "centralised"),
        (f"federated (ε={st.local_dp_epsilon:g})", f"federated ε={st.local_dp_epsilon:g}"),
        ("federated (no DP)", "federated no DP"),
        (None, f"own local ε={st.local_dp_epsilon:g}"),
        ("no-dp", "own local no DP"),
    ]
    width = 0.8 / len(conds)
    for i, (cond, label) in enumerate(conds):
        vals, errs = [], []
        for t in tests:
            if cond is None or cond == "no-dp":
                if t == st.holdout:
                    vals.append(np.nan)
                    errs.append(0)
                    continue
                key = f"local {t} ({'no DP' if cond else f'ε={st.local_dp_epsilon:g}'})"
            else:
                key = cond
            m, s = summary[key][t]["fde"]
            vals.append(m)
            errs.append(s)
        ax2.bar(np.arange(len(tests)) + i * width, vals, width, yerr=errs, capsize=2, label=label)
    ax2.set_xticks(
        np.arange(len(tests)) + 0.4 - width / 2,
        [t + (" (held out)" if t == st.holdout else "") for t in tests],
    )
    ax2.set_ylabel("FDE@3 s (m), held-out episodes")
    ax2.legend(fontsize=8)
    fig.suptitle(f"privacy–utility, {len(st.seeds)} seed(s), mean ± std")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_tables(st: Study, doc: dict[str, Any]) -> None:
    summary = doc["summary"]
    tests = [*st.regions, "pooled", st.holdout]
    rows = []
    for name, per_test in summary.items():
        row = [name]
        for t in tests:
            m, s = per_test[t]["fde"]
            row.append(f"{m:.2f} ± {s:.2f}")
        m, s = per_test["pooled"]["ade"]
        row.append(f"{m:.2f} ± {s:.2f}")
        m, s = per_test["pooled"]["accel_mae"]
        row.append(f"{m:.3f} ± {s:.3f}")
        rows.append(row)
    cols = [
        "model",
        *[f"FDE {t}" for t in tests[:-1]],
        f"FDE {st.holdout} (held out)",
        "ADE pooled",
        "accel MAE pooled",
    ]
    console.print(
        rich_table("held-out episodes, metres / m/s² (mean ± std over seeds)", cols, rows)
    )
    prow = []
    for name, infos in doc["privacy"].items():
        if "regions" in infos[0]:
            for r in infos[0]["regions"]:
                eps = [i["regions"][r]["epsilon_spent"] for i in infos]
                i0 = infos[0]["regions"][r]
                prow.append([name, r, i0["vehicles"], i0["q"], i0["sigma"], i0["delta"], max(eps)])
        else:
            i0 = infos[0]
            prow.append(
                [
                    name,
                    name.split()[1],
                    i0["vehicles"],
                    i0["q"],
                    i0["sigma"],
                    i0["delta"],
                    max(i["epsilon_spent"] for i in infos),
                ]
            )
    console.print(
        rich_table(
            "privacy spent (read back from each region's ledger; max over seeds)",
            ["condition", "region", "vehicles", "q", "σ", "δ", "ε spent (PRV)"],
            prow,
        )
    )
    t = doc["targets"]
    if t:
        a = t["within_1.25x_of_centralised"]
        console.print(
            f"target 1 (federated ε={st.local_dp_epsilon:g} within 1.25× of centralised, pooled "
            f"FDE): {a['federated_pooled_fde']:.2f} m vs {a['centralised_pooled_fde']:.2f} m = "
            f"{a['ratio']:.2f}× → [{'green' if a['met'] else 'red'}]"
            f"{'MET' if a['met'] else 'MISSED'}[/]"
        )
        b = t["beats_every_local_only"]
        for r, v in b["per_region"].items():
            console.print(
                f"target 2 \\[{r}]: federated {v['federated_fde']:.2f} m vs local DP "
                f"{v['local_dp_fde']:.2f} m / local no DP {v['local_no_dp_fde']:.2f} m"
            )
        console.print(
            f"target 2 (better than every local-only model on its own region): vs local DP "
            f"{'MET' if b['met_vs_local_dp'] else 'MISSED'}; vs local non-private "
            f"{'MET' if b['met_vs_local_no_dp'] else 'MISSED'}"
        )


SIZES: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": {
        "vehicles": 120,
        "episodes": 12,
        "vehicles_per_step": 48,
        "np_rounds": 5,
        "np_local_steps": 60,
        "seeds": [0, 1],
    },
    "tiny": {
        "synthetic": True,
        "vehicles": 40,
        "episodes": 10,  # frames per vehicle in synthetic mode
        "rounds": 2,
        "local_steps": 3,
        "vehicles_per_step": 8,
        "np_rounds": 2,
        "np_local_steps": 3,
        "np_vehicles_per_step": 8,
        "seeds": [0, 1],
        "epsilons": [8.0],
    },
}


def main(
    quick: bool = typer.Option(False, help="a few minutes on 2 cores (smaller fleets, 2 seeds)"),
    tiny: bool = typer.Option(False, help="seconds, synthetic fleets: a smoke test only"),
    out: str = typer.Option(None, help="output folder (default experiments/out/privacy_utility)"),
    data: str = typer.Option(str(DATA_CACHE), help="cache of generated fleet datasets"),
    seeds: int = typer.Option(None, help="number of seeds (overrides the size preset)"),
    rounds: int = typer.Option(None, help="federated rounds (overrides the size preset)"),
    local_steps: int = typer.Option(None, help="local DP steps per round"),
    vehicles: int = typer.Option(None, help="fleet size per region (generated data)"),
    episodes: int = typer.Option(None, help="episodes per region (generated data)"),
    lr: float = typer.Option(None, help="local SGD learning rate"),
    vehicles_per_step: int = typer.Option(None, help="expected vehicles per DP step"),
    clip_norm: float = typer.Option(None, help="per-vehicle clipping norm C"),
    server_momentum: float = typer.Option(None, help="aggregator momentum (0 = FedAvg)"),
    np_local_steps: int = typer.Option(
        None, help="local steps per round of the non-private models (centralised, no-DP)"
    ),
    epsilons: str = typer.Option(None, help="comma-separated ε targets, e.g. 1,3,8"),
) -> None:
    """Run the study, print the tables, write privacy_utility.json and privacy_utility.png."""
    preset = sized_preset(
        SIZES,
        quick,
        tiny,
        rounds=rounds,
        local_steps=local_steps,
        vehicles=vehicles,
        episodes=episodes,
        lr=lr,
        vehicles_per_step=vehicles_per_step,
        clip_norm=clip_norm,
        np_local_steps=np_local_steps,
    )
    if server_momentum is not None:
        if not 0 <= server_momentum < 1:
            bad_option("--server-momentum must be in [0, 1)")
        preset["server_momentum"] = server_momentum
    if seeds is not None:
        if seeds < 1:
            bad_option("--seeds must be ≥ 1")
        preset["seeds"] = list(range(seeds))
    if epsilons:
        try:
            preset["epsilons"] = sorted({float(e) for e in epsilons.split(",")})
        except ValueError:
            bad_option(f"--epsilons must be numbers separated by commas, got {epsilons!r}")
        if any(e <= 0 for e in preset["epsilons"]):
            bad_option("--epsilons must be > 0")
    st = Study(**preset)
    st.local_dp_epsilon = max(st.epsilons)
    folder = out_dir("privacy_utility", out)
    work = folder / "work"
    if work.exists():
        import shutil

        shutil.rmtree(work)  # ledgers of an earlier run would refuse (budget) or replay (cache)
    res = run_study(st, work, Path(data))
    doc = {
        "study": asdict(st),
        "machine": machine(),
        **summarise(st, res),
        "privacy": res["privacy"],
        "data": res["data"],
        "seconds": res["seconds"],
        "raw": res["raw"],
        "notes": [
            "federation in-process through fedfsd's code path: run_local_round per region (own "
            "policy + ledger) → egress guard_update + manifest → aggregator verify_update → "
            "FedAvgMomentum (FedAvg, equal weights); same algorithm as over gRPC minus transport",
            "σ per region from opacus get_noise_multiplier(accountant='prv') for q and "
            "rounds × local steps; ε spent read back from each region's ledger",
            "centralised: non-private, pooled train splits, the non-private schedule "
            f"(np_rounds × np_local_steps at np_lr) with {len(st.regions)}× vehicles per step; "
            "local-only and federated without DP use the same non-private schedule, with DP "
            "the DP schedule (rounds × local_steps at lr, vehicles_per_step)",
            "test sets: held-out episodes (episode-level split from each dataset's manifest); "
            "'pooled' is frame-weighted over the training regions; "
            f"{st.holdout} took no part in training",
            "DP noise and vehicle sampling are seeded here for reproducibility (production "
            "seeds them from the OS)",
        ]
        + (["SYNTHETIC fleets (smoke run): numbers are not meaningful"] if st.synthetic else []),
    }
    write_json(folder / "privacy_utility.json", doc)
    plot(st, doc["summary"], folder / "privacy_utility.png")
    print_tables(st, doc)
    console.print(
        f"wrote {folder / 'privacy_utility.json'} and {folder / 'privacy_utility.png'} "
        f"({res['seconds']['total']:.0f} s)"
    )


if __name__ == "__main__":
    typer.run(main)
