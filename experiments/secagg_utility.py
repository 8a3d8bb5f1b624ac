"""What distributed noise buys in accuracy (issue 15): local vs distributed noise at ε = 3.

    .venv/bin/python experiments/secagg_utility.py --data /work/main/.fedfsd/exp-data
    .venv/bin/python experiments/secagg_utility.py --quick      # one seed, two learning rates
    .venv/bin/python experiments/secagg_utility.py --tiny       # synthetic smoke run (tests)

For 3 regions (cn, eu, us) and 4 (cn, eu, us, jp), each with the same N training vehicles, it
trains the object-list MLP from the constant-velocity prior with the SAME DP-FedSGD schedule
under both trust models and scores pooled and per-region FDE@3 s on TEST episodes:

- **local** (today): every round each region runs one DP-SGD step of its own (Gaussian noise of
  σ_local: ε = 3 from its own noise alone) through `run_local_round`, the egress guard, the
  manifest and the aggregator's `verify_update`; the aggregator averages the updates (FedAvg,
  server lr 1, no momentum), so the model moves by −lr × the mean of the regions' noisy mean
  gradients.
- **distributed**: every round is one secure-aggregation round through the real code
  (`fedfsd.aggregator.secure_round.run_secure_round` driving `fedfsd.region.secure_release`
  in process): each region sends round(s·Σ clipped gradients) plus a Skellam share sized by
  `fedfsd.privacy.distributed_release` so any t = `default_threshold(R)` shares reach σ_distributed
  (ε = 3 under the distributed assumption), masked with pairwise masks and unmasked by the
  aggregator, which steps the model by −lr × sum / (s·R·m). Quantisation, the L2 projection and
  the modular sum are all included.

Both take T rounds of one step each and m expected vehicles per step per region from the
planner (`plan_schedule` for ε = 3, N and δ = default_delta(N), one round of T steps), σ for each
mechanism from `plan_distributed_sigma` (both accounted in RDP, so the comparison is the
mechanism, not the accountant; `sigma_local` is the Gaussian one). lr is chosen per (R,
mechanism, seed) from a small grid on VALIDATION episodes; only the chosen model is scored on
TEST. Each region's ε is read back from its ledger: ε under the distributed assumption and from
its own noise alone (distributed), and the PRV ε the ledger states (local).

Fleets: like fleet_scale.py, the N-vehicle fleet of a region is a seeded subset (data_seed 11)
of that region's cached fleet-scale dataset (cn/eu/us: the fleet-scale study's 10,600-vehicle
datasets; jp: its 2,000-vehicle one); test episodes are the dataset's whole test split.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import typer
from common import (
    DATA_CACHE,
    bad_option,
    console,
    default_delta,
    ensure_dataset,
    load_region,
    machine,
    make_policy,
    mean_std,
    out_dir,
    rich_table,
    sized_preset,
    write_json,
)
from fleet_scale import RegionData, _seed, federate, fleet_ids, subset_vehicles, val_fde
from privacy_utility import score  # test metrics per region + frame-weighted 'pooled'

ALL_REGIONS = ("cn", "eu", "us", "jp")
PRIOR = "constant-velocity prior"
MECHANISMS = ("local", "distributed")


@dataclass
class Study:
    """Sizes and settings of one run (recorded in the JSON)."""

    vehicles: int = 1000  # training vehicles per region (the demo's fleet size)
    region_counts: list[int] = field(default_factory=lambda: [3, 4])  # first R of ALL_REGIONS
    # Vehicles generated per region's fleet-scale dataset: the fleet-scale study's cached data.
    dataset_vehicles: dict[str, int] = field(
        default_factory=lambda: {"cn": 10600, "eu": 10600, "us": 10600, "jp": 2000}
    )
    data_seed: int = 11
    synthetic: bool = False
    epsilon: float = 3.0
    frames_per_vehicle: int = 8
    clip_norm: float = 1.0
    max_vehicles_per_step: int = 512  # as fleet_scale.py
    max_total_steps: int = 300
    noise_budget: float | None = None  # None: the planner's default
    lrs: list[float] = field(default_factory=lambda: [0.2, 0.5, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    update_norm_bound: float = 20.0
    fedadam_lr: float = 0.03  # unused (fleet_scale.federate reads it for FedAdam only)
    model: str = "mlp"


# -- data ------------------------------------------------------------------------------------------
def load_fleets(st: Study, cache: Path) -> dict[str, RegionData]:
    """Train/val fleets of `st.vehicles` vehicles and the whole test split, every region."""
    need = ALL_REGIONS[: max(st.region_counts)]
    out: dict[str, RegionData] = {}
    for i, r in enumerate(need):
        if st.synthetic:
            from fedfsd.data.testing import make_synthetic_frames

            base = st.data_seed + 100 * i
            small = max(8, st.vehicles // 4)
            parts = [
                make_synthetic_frames(k, 12, base + j, region=r)
                for j, k in enumerate((st.vehicles, small, small))
            ]
            for part in parts[1:]:
                part.fleet_id = parts[0].fleet_id
            out[r] = RegionData(*parts)
            continue
        path = ensure_dataset(
            cache, r, st.dataset_vehicles[r], None, st.data_seed, fleet_scale=True
        )
        train = load_region(path, "train")
        ids = fleet_ids(train, st.vehicles, st.data_seed)
        out[r] = RegionData(
            subset_vehicles(train, ids, st.vehicles),
            subset_vehicles(load_region(path, "val"), ids, st.vehicles),
            load_region(path, "test"),
        )
    return out


# -- schedule --------------------------------------------------------------------------------------
def make_schedules(st: Study, dim: int) -> dict[int, dict[str, Any]]:
    """Per R: T and m from plan_schedule (one round of T steps: the same for every R), σ of each
    mechanism from plan_distributed_sigma."""
    from fedfsd.aggregator.secure_round import default_threshold
    from fedfsd.privacy.planner import plan_distributed_sigma, plan_schedule

    delta = default_delta(st.vehicles)
    plan = plan_schedule(
        st.vehicles,
        st.epsilon,
        delta,
        1,
        frames_per_vehicle=st.frames_per_vehicle,
        clip_norm=st.clip_norm,
        max_vehicles_per_step=st.max_vehicles_per_step,
        max_total_steps=st.max_total_steps,
        max_steps_per_round=st.max_total_steps,
        **({} if st.noise_budget is None else {"noise_budget": st.noise_budget}),
    )
    out = {}
    for regions in st.region_counts:
        t = default_threshold(regions)
        dist = plan_distributed_sigma(
            st.vehicles,
            st.epsilon,
            delta,
            plan.total_steps,
            regions=regions,
            min_honest_regions=t,
            vehicles_per_step=plan.vehicles_per_step,
            dimension=dim,
            clip_norm=st.clip_norm,
        )
        out[regions] = {
            "regions": regions,
            "threshold": t,
            "delta": delta,
            "rounds": plan.total_steps,
            "vehicles_per_step": plan.vehicles_per_step,
            "plan": plan.model_dump(),
            "distributed_plan": dist.model_dump(),
            "sigma": {"local": dist.sigma_local, "distributed": dist.sigma_distributed},
            # noise std on the global average of the regions' mean gradients, units of C
            "noise_on_average": {
                "local": dist.noise_ratio_local,
                "distributed": dist.noise_ratio_distributed,
            },
        }
    return out


# -- the two mechanisms ----------------------------------------------------------------------------
def train_local(
    st: Study, trains: dict[str, Any], sched: dict[str, Any], lr: float, init: Any, work: Path,
    tag: str, seed: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:  # fmt: skip
    """T rounds × 1 local DP-SGD step (σ_local) per region, FedAvg (fleet_scale.federate)."""
    from fedfsd.privacy.ledger import Ledger
    from fedfsd.privacy.planner import Plan

    plan = Plan(
        **{
            **sched["plan"],
            "rounds": sched["rounds"],
            "steps_per_round": 1,
            "noise_multiplier": sched["sigma"]["local"],
            "lr": lr,
        }
    )
    w, info = federate(st, trains, st.epsilon, plan, init, work, tag, seed)  # type: ignore[arg-type]
    if info["rejected"]:
        raise RuntimeError(f"local run {tag}: updates rejected: {info['rejected']}")
    eps = {}
    for r in trains:
        led = Ledger(work / tag / r / "ledger.jsonl")
        eps[r] = {
            "own_noise_prv": info["epsilon_spent"][r],
            "own_noise_rdp": led.epsilon(default_delta(trains[r].n_vehicles), "rdp"),
            "releases": len(led.releases()),
        }
    return w, {"epsilon": eps}


def train_distributed(
    st: Study, trains: dict[str, Any], sched: dict[str, Any], lr: float, init: Any, work: Path,
    tag: str, seed: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:  # fmt: skip
    """T secure-aggregation rounds with Skellam shares, all parties in this process."""
    from fedfsd.aggregator.secure_round import make_spec, run_secure_round
    from fedfsd.config import RegionPolicy
    from fedfsd.privacy import signing
    from fedfsd.privacy.ledger import Ledger
    from fedfsd.region.secure_release import RegionContext, handle_stage

    regions = sorted(trains)
    sigma, t, m = sched["sigma"]["distributed"], sched["threshold"], sched["vehicles_per_step"]
    ctxs: dict[str, RegionContext] = {}
    keys = {}
    for r in regions:
        ledger = work / tag / r / "ledger.jsonl"
        ledger.parent.mkdir(parents=True, exist_ok=True)
        sk = signing.load_or_create_key(signing.ledger_key_path(ledger))
        keys[r] = sk.public_key()
        base = make_policy(
            r,
            n_vehicles=trains[r].n_vehicles,
            epsilon_budget=st.epsilon,
            noise_multiplier=sigma,
            clip_norm=st.clip_norm,
            update_norm_bound=st.update_norm_bound,
            local_steps=1,
            vehicles_per_step=m,
            frames_per_vehicle=st.frames_per_vehicle,
        )
        policy = RegionPolicy(
            **{
                **base.model_dump(),
                "trust_model": "distributed",
                "min_honest_regions": t,
                "enforce_on": "distributed",  # σ was sized for ε under this assumption
            }
        )
        ctxs[r] = RegionContext(
            policy=policy,
            ledger_path=ledger,
            signing_key=sk,
            peer_keys={},
            frames=trains[r],
            fleet_vehicles=trains[r].n_vehicles,
            run_id=tag,
            round_idx=0,
        )
    for c in ctxs.values():
        c.peer_keys = keys
    dim = int(sum(np.asarray(v).size for v in init.values()))
    spec = make_spec(
        dim=dim,
        clip_norm=st.clip_norm,
        noise_multiplier=sigma,
        vehicles_per_step=m,
        frames_per_vehicle=st.frames_per_vehicle,
        model=st.model,
    )
    errors: dict[str, str] = {}

    def transport(stage: str, out: dict[str, bytes], weights: Any) -> dict[str, bytes]:
        got = {}
        for r, payload in out.items():
            try:
                got[r] = handle_stage(ctxs[r], stage, payload, spec, weights)
            except Exception as e:  # a region's refusal: no reply (the round then fails)
                errors[r] = repr(e)
        return got

    w = init
    bits = None
    for rnd in range(1, sched["rounds"] + 1):
        for r, c in ctxs.items():
            c.round_idx = rnd
            c.seed = _seed(tag, seed, r, rnd)  # reproducible; production draws from the OS
        res = run_secure_round(
            regions=regions,
            region_keys=keys,
            spec=spec,
            run_id=tag,
            round_idx=rnd,
            threshold=t,
            weights=w,
            server_lr=lr,
            transport=transport,
        )
        if res.weights is None or errors:
            raise RuntimeError(f"secure round {rnd} of {tag} failed: {res.reason} {errors}")
        w = res.weights
        bits = spec.quantizer(len(regions)).bit_width
    eps = {}
    for r, c in ctxs.items():
        rels = Ledger(c.ledger_path).releases()
        last = rels[-1]
        eps[r] = {
            "distributed": last["epsilon_distributed"],
            "own_noise": last["epsilon_own_noise"],
            "releases": len(rels),
        }
    return w, {"epsilon": eps, "scale": spec.scale, "bit_width": bits}


TRAIN = {"local": train_local, "distributed": train_distributed}


# -- one seed --------------------------------------------------------------------------------------
def run_seed(
    st: Study, data: dict[str, RegionData], scheds: dict[int, dict], seed: int, work: Path
) -> dict[str, Any]:
    """For every R and mechanism: each lr of the grid, the one best on validation scored on test."""
    from fedfsd.models import build_model, get_weights, prior_only_weights

    any_train = next(iter(data.values())).train
    prior = prior_only_weights(
        get_weights(
            build_model(st.model, any_train.features.shape[1], any_train.labels.shape[1], seed=seed)
        )
    )
    tests = {r: d.test for r, d in data.items()}
    out: dict[str, Any] = {"seed": seed, "runs": {}}
    out["prior"] = score(SimpleNamespace(regions=list(tests), model=st.model), prior, tests)
    for n in st.region_counts:
        regions = list(ALL_REGIONS[:n])
        trains = {r: data[r].train for r in regions}
        vals = [data[r].val for r in regions]
        scorer = SimpleNamespace(regions=regions, model=st.model)
        for mech in MECHANISMS:
            t0 = time.monotonic()
            cands: dict[float, tuple[float, Any, dict]] = {}
            for lr in st.lrs:
                tag = f"R{n}-{mech}-lr{lr:g}-s{seed}"
                w, info = TRAIN[mech](st, trains, scheds[n], lr, prior, work, tag, seed)
                cands[lr] = (val_fde(st, w, vals), w, info)
                console.print(f"  R={n} {mech:<11} lr {lr:g}: val FDE {cands[lr][0]:.3f}")
            lr_best = min(cands, key=lambda k: cands[k][0])
            val, w, info = cands[lr_best]
            out["runs"][f"{n}/{mech}"] = {
                "regions": regions,
                "mechanism": mech,
                "lr": lr_best,
                "val_fde": {f"{k:g}": v[0] for k, v in cands.items()},
                "scores": score(scorer, w, tests),
                "seconds": time.monotonic() - t0,
                **info,
            }
    return out


# -- summary ---------------------------------------------------------------------------------------
def pooled(scores: dict[str, dict], tests: dict[str, int], regions: list[str]) -> float:
    """Frame-weighted FDE over `regions`' test splits."""
    total = sum(tests[r] for r in regions)
    return sum(scores[r]["fde"] * tests[r] for r in regions) / total


def summarise(
    st: Study, seeds: list[dict], scheds: dict[int, dict], frames: dict[str, int]
) -> dict[str, Any]:
    """Mean ± std over seeds per (R, mechanism); ratios to the prior; the √R comparison."""
    base3 = list(ALL_REGIONS[:3])
    rows: dict[str, Any] = {}
    for n in st.region_counts:
        regions = list(ALL_REGIONS[:n])
        prior = [pooled(s["prior"], frames, regions) for s in seeds]
        rows[f"{n}/prior"] = {
            "regions": n,
            "mechanism": "prior",
            "pooled_fde": mean_std(prior),
            "pooled_fde_cn_eu_us": mean_std([pooled(s["prior"], frames, base3) for s in seeds]),
            "per_region_fde": {
                r: mean_std([s["prior"][r]["fde"] for s in seeds]) for r in ALL_REGIONS[:n]
            },
        }
        for mech in MECHANISMS:
            runs = [s["runs"][f"{n}/{mech}"] for s in seeds]
            fde = [r["scores"]["pooled"]["fde"] for r in runs]
            eps_keys = ("distributed", "own_noise") if mech == "distributed" else ("own_noise_prv",)
            rows[f"{n}/{mech}"] = {
                "regions": n,
                "mechanism": mech,
                "threshold": scheds[n]["threshold"] if mech == "distributed" else None,
                "sigma_per_region": scheds[n]["sigma"][mech],
                "noise_on_average": scheds[n]["noise_on_average"][mech],
                "epsilon_max_over_regions": {
                    k: max(r["epsilon"][g][k] for r in runs for g in r["epsilon"]) for k in eps_keys
                },
                "lr_chosen": [r["lr"] for r in runs],
                "pooled_fde": mean_std(fde),
                "pooled_fde_cn_eu_us": mean_std([pooled(r["scores"], frames, base3) for r in runs]),
                "per_region_fde": {
                    g: mean_std([r["scores"][g]["fde"] for r in runs]) for g in ALL_REGIONS[:n]
                },
                "ratio_to_prior": mean_std([f / p for f, p in zip(fde, prior, strict=True)]),
            }
    root = {}
    for n in st.region_counts:
        loc, dis = rows[f"{n}/local"], rows[f"{n}/distributed"]
        t = scheds[n]["threshold"]
        root[str(n)] = {
            "threshold": t,
            "ideal_noise_gain_sqrt_t": math.sqrt(t),
            "ideal_noise_gain_sqrt_R": math.sqrt(n),
            "planned_noise_gain": loc["noise_on_average"] / dis["noise_on_average"],
            "sigma_distributed_over_sigma_local": dis["sigma_per_region"] / loc["sigma_per_region"],
            "pooled_fde_local": loc["pooled_fde"][0],
            "pooled_fde_distributed": dis["pooled_fde"][0],
            "fde_gain_distributed": loc["pooled_fde"][0] - dis["pooled_fde"][0],
        }
    return {"rows": rows, "sqrt_r": root}


def print_tables(st: Study, doc: dict[str, Any]) -> None:
    regs = list(ALL_REGIONS[: max(st.region_counts)])
    cols = ["R mechanism", "t", "σ/region", "noise on avg", "ε dist / own", "lr", "FDE pooled",
            "pooled cn+eu+us", "× prior"]  # fmt: skip

    def ms(v: list[float]) -> str:
        return f"{v[0]:.3f} ± {v[1]:.3f}"

    rows, per_region = [], []
    for row in doc["summary"]["rows"].values():
        prior = row["mechanism"] == "prior"
        eps = row.get("epsilon_max_over_regions", {})
        if prior:
            e = "–"
        elif "distributed" in eps:
            e = f"{eps['distributed']:.2f} / {eps['own_noise']:.2f}"
        else:
            e = f"– / {eps['own_noise_prv']:.2f}"
        name = f"{row['regions']} {row['mechanism']}"
        rows.append([
            name,
            "–" if row.get("threshold") is None else str(row["threshold"]),
            "–" if prior else row["sigma_per_region"],
            "–" if prior else f"{row['noise_on_average']:.5f}",
            e,
            "–" if prior else ",".join(f"{v:g}" for v in row["lr_chosen"]),
            ms(row["pooled_fde"]),
            ms(row["pooled_fde_cn_eu_us"]),
            "1" if prior else ms(row["ratio_to_prior"]),
        ])  # fmt: skip
        per_region.append(
            [name, *[ms(row["per_region_fde"][r]) if r in row["per_region_fde"] else "–"
                     for r in regs]]
        )  # fmt: skip
    seeds = len(doc["seeds"])
    console.print(
        rich_table(
            f"ε = {st.epsilon:g}, {st.vehicles} vehicles per region: test FDE@3 s (m), mean ± std "
            f"over {seeds} seed(s); ε: the largest a region's ledger states (distributed "
            "assumption / own noise; local: PRV); noise on avg: std on the averaged gradient, "
            "units of C",
            cols,
            rows,
        )
    )
    console.print(
        rich_table(
            f"per region: test FDE@3 s (m), mean ± std over {seeds} seed(s)",
            ["R mechanism", *[f"FDE {r}" for r in regs]],
            per_region,
        )
    )
    for n, v in doc["summary"]["sqrt_r"].items():
        console.print(
            f"R={n}, t={v['threshold']}: ideal noise gain on the average √t = "
            f"{v['ideal_noise_gain_sqrt_t']:.2f} (√R = {v['ideal_noise_gain_sqrt_R']:.2f} if "
            f"t = R); planned gain (local / distributed noise on the average) = "
            f"{v['planned_noise_gain']:.2f} (σ_distributed / σ_local = "
            f"{v['sigma_distributed_over_sigma_local']:.2f}); pooled FDE local "
            f"{v['pooled_fde_local']:.3f} vs distributed {v['pooled_fde_distributed']:.3f} m"
        )


def plot(st: Study, doc: dict[str, Any], path: Path) -> Path:
    """Pooled test FDE per R: prior, local, distributed (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = doc["summary"]["rows"]
    width = 0.27
    for i, mech in enumerate(("prior", *MECHANISMS)):
        vals = [rows[f"{n}/{mech}"]["pooled_fde"] for n in st.region_counts]
        ax.bar(
            np.arange(len(st.region_counts)) + (i - 1) * width,
            [v[0] for v in vals],
            width,
            yerr=[v[1] for v in vals],
            capsize=3,
            label=mech if mech != "prior" else PRIOR,
        )
    ax.set_xticks(np.arange(len(st.region_counts)), [f"{n} regions" for n in st.region_counts])
    ax.set_ylabel("pooled FDE@3 s, test episodes (m)")
    ax.set_title(f"ε = {st.epsilon:g} per region, {st.vehicles} vehicles each")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SIZES: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": {"seeds": [0], "lrs": [0.2, 1.0]},
    "tiny": {
        "synthetic": True,
        "vehicles": 40,
        "seeds": [0],
        "lrs": [0.5, 1.0],
        "max_total_steps": 3,
        "max_vehicles_per_step": 16,
        "noise_budget": 10.0,  # tiny synthetic fleets: any noise level, it is a smoke run
    },
}


def main(
    quick: bool = typer.Option(False, help="one seed, lr grid 0.2 and 1.0"),
    tiny: bool = typer.Option(False, help="seconds, synthetic fleets: a smoke test only"),
    out: str = typer.Option(None, help="output folder (default experiments/out/secagg_utility)"),
    data: str = typer.Option(str(DATA_CACHE), help="cache of generated fleet datasets"),
    vehicles: int = typer.Option(None, help="training vehicles per region (default 1,000)"),
    seeds: int = typer.Option(None, help="seeds (default 2)"),
    lrs: str = typer.Option(None, help="comma-separated lr grid chosen from on validation"),
) -> None:
    """Run the comparison, print the table, write secagg_utility.json and secagg_utility.png."""
    from fedfsd.models import build_model, get_weights

    preset = sized_preset(SIZES, quick, tiny, vehicles=vehicles, seeds=seeds)
    if "seeds" in preset and isinstance(preset["seeds"], int | float):
        preset["seeds"] = list(range(int(preset["seeds"])))
    if lrs:
        try:
            preset["lrs"] = sorted({float(v) for v in lrs.split(",")})
        except ValueError:
            bad_option(f"--lrs must be numbers separated by commas, got {lrs!r}")
        if any(v <= 0 for v in preset["lrs"]):
            bad_option("--lrs must be > 0")
    st = Study(**preset)
    folder = out_dir("secagg_utility", out)
    work = folder / "work"
    if work.exists():
        import shutil

        shutil.rmtree(work)  # old ledgers would refuse (budget) or replay a released round
    t0, c0 = time.monotonic(), time.process_time()
    data_ = load_fleets(st, Path(data))
    load_s = time.monotonic() - t0
    tr = next(iter(data_.values())).train
    dim = sum(v.size for v in get_weights(build_model(st.model, tr.features.shape[1],
                                                      tr.labels.shape[1])).values())  # fmt: skip
    scheds = make_schedules(st, int(dim))
    for n, s in scheds.items():
        console.print(
            f"R={n}: T = {s['rounds']} rounds × 1 step, m = {s['vehicles_per_step']}, "
            f"σ local {s['sigma']['local']:.3f}, σ distributed {s['sigma']['distributed']:.3f} "
            f"(t = {s['threshold']})"
        )
    per_seed: list[dict] = []
    frames = {r: d.test.n_frames for r, d in data_.items()}
    for seed in st.seeds:
        console.print(f"[bold]seed {seed}[/]")
        per_seed.append(run_seed(st, data_, scheds, seed, work))
        # Written after every seed: a run stopped early still leaves the seeds it finished.
        doc = document(st, scheds, per_seed, data_, frames, load_s, t0, c0)
        write_json(folder / "secagg_utility.json", doc)
    plot(st, doc, folder / "secagg_utility.png")
    print_tables(st, doc)
    console.print(
        f"wrote {folder / 'secagg_utility.json'} ({doc['seconds']['total_wall']:.0f} s wall, "
        f"{doc['seconds']['total_cpu']:.0f} s CPU)"
    )


def document(
    st: Study,
    scheds: dict[int, dict],
    per_seed: list[dict],
    data: dict[str, RegionData],
    frames: dict[str, int],
    load_s: float,
    t0: float,
    c0: float,
) -> dict[str, Any]:
    """The JSON document for the seeds finished so far."""
    return {
        "study": asdict(st),
        "seeds_done": len(per_seed),
        "machine": machine(),
        "schedules": {str(n): s for n, s in scheds.items()},
        "summary": summarise(st, per_seed, scheds, frames),
        "seeds": per_seed,
        "data": {
            r: {
                "train_vehicles": d.train.n_vehicles,
                "train_frames": d.train.n_frames,
                "val_frames": d.val.n_frames,
                "test_frames": d.test.n_frames,
            }
            for r, d in data.items()
        },
        "seconds": {
            "load": load_s,
            "total_wall": time.monotonic() - t0,
            "total_cpu": time.process_time() - c0,
        },
        "notes": [
            f"{len(per_seed)} of {len(st.seeds)} seed(s) done; lr chosen per (R, mechanism, "
            "seed) on validation episodes from the grid; test episodes only scored",
            "same schedule for both mechanisms: T rounds of one DP-FedSGD step, m expected "
            "vehicles per step per region (plan_schedule); σ from plan_distributed_sigma (RDP)",
            "distributed: the real secure round in process (quantisation, Skellam shares, "
            "masking and unmasking); local: run_local_round + egress guard + verify_update + "
            "FedAvg",
            "DP noise and sampling seeded here for reproducibility (production seeds from the OS)",
        ]
        + (["SYNTHETIC fleets (smoke run): numbers are not meaningful"] if st.synthetic else []),
    }


if __name__ == "__main__":
    typer.run(main)
