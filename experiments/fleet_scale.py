"""Fleet-scale study (issue 18): is the federated DP model worth joining at real fleet sizes?

    .venv/bin/python experiments/fleet_scale.py                 # full size (see SIZES)
    .venv/bin/python experiments/fleet_scale.py --quick         # a few minutes
    .venv/bin/python experiments/fleet_scale.py --tiny          # synthetic smoke run (tests)

For each fleet size N (vehicles per training region) and privacy target ε it compares, on the
held-out TEST episodes of every training region (cn, eu, us) and of a region nobody trained on
(jp):

- the constant-velocity prior alone (the MLP's residual set to zero: no learned parameter);
- centralised non-private training on the pooled data (what residency law forbids);
- each region's own non-private model (`local-only (no DP) r`: its data never leaves, so the
  operator needs no DP for it) and its own DP model at the same ε (`local-only (DP) r`);
- the federated DP global model (plain, and with each lever alone and combined: public
  pretraining, a FedAdam server optimiser);
- `personalised r`: the federated model chosen on validation, fine-tuned in region r on its own
  logs without DP (never released).

Every choice is made on VALIDATION episodes (non-private step counts by early stopping, which
federated variant is kept, the fine-tuning length); TEST episodes are only scored. The DP schedule
of each (N, ε) comes from `fedfsd privacy plan` (fedfsd.privacy.planner), not from test scores.

Fleets: each training region is generated once at the largest size in fleet-scale mode
(`fedfsd data generate --fleet-scale`); a fleet of N vehicles is the first N vehicles of a seeded
permutation of that region's fleet (nested: the 300-vehicle fleet is inside the 1,000-vehicle one),
with only those vehicles' frames for training and validation — the other vehicles stay in the
traffic as non-fleet road users. Test episodes are the region's whole test split, the same for
every N, so numbers are comparable across sizes.

The federation runs IN-PROCESS through fedfsd's real code path, like privacy_utility.py: each
round every region calls `run_local_round` (own policy and ledger), the egress guard and
manifest, the aggregator's `verify_update`, then the server optimiser.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
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
    pool_frames,
    rich_table,
    sized_preset,
    write_json,
)
from privacy_utility import score  # test metrics per region + frame-weighted 'pooled'

from fedfsd.data.splits import train_share

METRICS = ("ade", "fde", "accel_mae")
PRIOR = "constant-velocity prior"
CENTRAL = "centralised (pooled, no DP)"


@dataclass
class Study:
    """Sizes and settings of one run (recorded in the JSON)."""

    sizes: list[int] = field(default_factory=lambda: [300, 1000, 3000, 10000])
    regions: list[str] = field(default_factory=lambda: ["cn", "eu", "us"])
    holdout: str = "jp"
    holdout_vehicles: int = 2000
    public_vehicles: int = 3000
    data_seed: int = 11
    # Episodes each training-region vehicle drives in (fleet-scale mode). 3 for ≤ 10,000
    # vehicles; the largest-fleet study uses 1, a third of the simulation (README says so).
    appearances: float = 3.0
    # Vehicles generated per training region; None: enough that the largest fleet drives in
    # train episodes (1.06 × it at 3 appearances, scaled by the train share at others).
    generate_vehicles: int | None = None
    synthetic: bool = False
    epsilons: list[float] = field(default_factory=lambda: [1.0, 3.0, 8.0])
    lever_epsilon: float = 3.0  # levers and personalisation are measured at this ε
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    max_seeds_large: int = 1  # seeds for sizes ≥ `seeds_large_from` (time; said in the README)
    seeds_large_from: int = 3000
    large: int = 10000  # the size the first target is stated for
    # DP schedule: from the planner, per (N, ε)
    rounds: int = 5
    frames_per_vehicle: int = 8
    clip_norm: float = 1.0
    max_vehicles_per_step: int = 512
    max_total_steps: int = 300
    noise_budget: float | None = None  # None: the planner's default (chosen on validation)
    update_norm_bound: float = 20.0
    fedadam_lr: float = 0.03
    # Non-private training (centralised, local, pretraining, fine-tuning): early stopping on
    # validation, evaluated every `np_eval_every` steps up to `np_max_steps`.
    np_max_steps: int = 2000
    np_eval_every: int = 250
    np_lr: float = 0.1
    np_vehicles_per_step: int = 64
    finetune_max_steps: int = 1200
    finetune_eval_every: int = 150
    finetune_lr: float = 0.05
    workers: int = 2
    model: str = "mlp"


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


# -- data ------------------------------------------------------------------------------------------
def subset_vehicles(frames: Any, keep_ids: set[str], n: int) -> Any:
    """The frames of the listed vehicles only (a smaller fleet of n vehicles in the same traffic).

    Every split of one fleet keeps one fleet id (`<dataset fleet>/n<n>`), so train and
    validation frames are recognisably the same fleet.
    """
    from fedfsd.data.vehicles import VehicleFrames

    sel = [i for i, v in enumerate(frames.vehicle_ids) if v in keep_ids]
    rows = np.concatenate(
        [np.arange(frames.offsets[i], frames.offsets[i + 1]) for i in sel]
        or [np.zeros(0, np.int64)]
    )
    counts = np.array([frames.offsets[i + 1] - frames.offsets[i] for i in sel], np.int64)
    return VehicleFrames(
        region=frames.region,
        features=frames.features[rows],
        labels=frames.labels[rows],
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        vehicle_ids=[frames.vehicle_ids[i] for i in sel],
        episodes=frames.episodes[rows],
        fleet_id=f"{frames.fleet_id}/n{n}",
        manifest=frames.manifest,
    )


def fleet_ids(train: Any, n: int, seed: int) -> set[str]:
    """The first n vehicles of a seeded permutation of the training vehicles (nested in n)."""
    order = np.random.default_rng([seed, 18]).permutation(train.n_vehicles)
    if n > train.n_vehicles:
        raise SystemExit(
            f"{train.region}: asked for {n} vehicles, the dataset has {train.n_vehicles} with "
            "train frames (each vehicle drives in about --appearances episodes, split into "
            "train/val/test; generate more with --generate)"
        )
    return {train.vehicle_ids[i] for i in order[:n]}


@dataclass
class RegionData:
    train: Any
    val: Any
    test: Any


def load_all(st: Study, cache: Path) -> tuple[dict[str, RegionData], Any, RegionData | None]:
    """Full train/val/test of every training region, the held-out test split, public data."""
    biggest = max(st.sizes)
    regions: dict[str, RegionData] = {}
    if st.synthetic:
        from fedfsd.data.testing import make_synthetic_frames

        for i, r in enumerate(st.regions):
            base = st.data_seed + 100 * i
            parts = [
                make_synthetic_frames(k, 12, base + j, region=r)
                for j, k in enumerate((biggest, max(8, biggest // 5), max(8, biggest // 5)))
            ]
            for part in parts[1:]:
                part.fleet_id = parts[0].fleet_id  # one fleet: its val/test split
            regions[r] = RegionData(*parts)
        hold = make_synthetic_frames(max(8, biggest // 5), 12, st.data_seed + 999, region="jp")
        pub = RegionData(
            make_synthetic_frames(biggest, 12, st.data_seed + 555, region="public"),
            make_synthetic_frames(max(8, biggest // 5), 12, st.data_seed + 556, region="public"),
            None,
        )
        return regions, hold, pub
    # Enough generated vehicles that the largest fleet finds `biggest` of them in train episodes:
    # 1.06× at three appearances (the first study's datasets), scaled by the train share.
    scale = train_share(3.0) / train_share(st.appearances)
    gen = st.generate_vehicles or int(math.ceil(biggest * 1.06 * scale))
    for r in st.regions:
        path = ensure_dataset(
            cache, r, gen, None, st.data_seed, fleet_scale=True, appearances=st.appearances
        )
        regions[r] = RegionData(
            load_region(path, "train"), load_region(path, "val"), load_region(path, "test")
        )
    hpath = ensure_dataset(
        cache, st.holdout, st.holdout_vehicles, None, st.data_seed, fleet_scale=True
    )
    hold = load_region(hpath, "test")
    ppath = ensure_dataset(
        cache, "public", st.public_vehicles, None, st.data_seed + 1, fleet_scale=True
    )
    pub = RegionData(load_region(ppath, "train"), load_region(ppath, "val"), None)
    return regions, hold, pub


# -- training --------------------------------------------------------------------------------------
def _request(st: Study, steps: int, lr: float, vps: int, sigma: float) -> Any:
    from fedfsd.config import TrainRequest

    return TrainRequest(
        local_steps=steps,
        lr=lr,
        noise_multiplier=sigma,
        clip_norm=st.clip_norm,
        vehicles_per_step=vps,
        frames_per_vehicle=st.frames_per_vehicle,
        model=st.model,
    )


def _policy(st: Study, frames: Any, eps: float | None, plan: Any | None, steps: int, vps: int):
    pol = make_policy(
        frames.region,
        n_vehicles=frames.n_vehicles,
        epsilon_budget=1e9 if eps is None else eps,
        noise_multiplier=plan.noise_multiplier if plan is not None else 1e-6,
        clip_norm=st.clip_norm,
        update_norm_bound=st.update_norm_bound,
        local_steps=steps,
        vehicles_per_step=vps,
        frames_per_vehicle=st.frames_per_vehicle,
    )
    return pol


def val_fde(st: Study, weights: dict[str, np.ndarray], vals: list[Any]) -> float:
    """Frame-weighted FDE@3 s over validation sets (the only score any choice looks at)."""
    from fedfsd.region.evaluation import evaluate_weights

    total = sum(v.n_frames for v in vals)
    return sum(evaluate_weights(v, weights, st.model)["fde"] * v.n_frames for v in vals) / total


def train_nonprivate(
    st: Study,
    train: Any,
    vals: list[Any],
    init: dict[str, np.ndarray],
    work: Path,
    tag: str,
    seed: int,
    *,
    max_steps: int,
    eval_every: int,
    lr: float,
    vps: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Non-private steps through run_local_round, early-stopped on validation FDE.

    Candidate 0 is `init` itself, so the result is never worse on validation than the start.
    """
    from fedfsd.privacy.local_round import run_local_round

    pol = _policy(st, train, None, None, eval_every, vps)
    req = _request(st, eval_every, lr, vps, 0.0)
    ledger = work / tag / "ledger.jsonl"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    best_w, best = init, val_fde(st, init, vals)
    curve = [(0, best)]
    w = init
    for rnd in range(1, max_steps // eval_every + 1):
        res = run_local_round(
            train,
            pol,
            ledger,
            w,
            req,
            tag,
            rnd,
            st.model,
            private=False,
            seed=_seed(tag, seed, rnd),
        )
        w = res.new_weights
        f = val_fde(st, w, vals)
        curve.append((rnd * eval_every, f))
        if f < best:
            best_w, best = w, f
    return best_w, {"val_curve": curve, "best_val_fde": best}


def federate(
    st: Study,
    trains: dict[str, Any],
    eps: float,
    plan: Any,
    init: dict[str, np.ndarray],
    work: Path,
    tag: str,
    seed: int,
    optimizer: str = "fedavg",
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Federated vehicle-level DP through fedfsd's code path (module doc)."""
    from fedfsd.aggregator.strategy import make_server_optimizer
    from fedfsd.aggregator.update_checks import Expectation, verify_update
    from fedfsd.privacy.ledger import Ledger
    from fedfsd.privacy.local_round import run_local_round
    from fedfsd.region.egress import guard_update, num_examples, release_manifest

    steps, vps = plan.steps_per_round, plan.vehicles_per_step
    req = _request(st, steps, plan.lr, vps, plan.noise_multiplier)
    pols = {r: _policy(st, f, eps, plan, steps, vps) for r, f in trains.items()}
    ledgers = {r: work / tag / r / "ledger.jsonl" for r in trains}
    for p in ledgers.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    strategy = make_server_optimizer(
        optimizer, server_lr=st.fedadam_lr if optimizer == "fedadam" else 1.0
    )
    w = init
    rejected: list[str] = []
    for rnd in range(1, plan.rounds + 1):
        exp = Expectation.from_weights(
            w, norm_bound=st.update_norm_bound, run_id=tag, round_idx=rnd
        )
        accepted = []
        for r, frames in trains.items():
            res = run_local_round(
                frames, pols[r], ledgers[r], w, req, tag, rnd, st.model,
                seed=_seed(tag, seed, r, rnd),
            )  # fmt: skip
            release = guard_update(w, res.new_weights, pols[r].update_norm_bound)
            manifest = release_manifest(
                ledgers[r],
                region=r,
                run_id=tag,
                round_idx=rnd,
                release=release,
                record=res.record,
                update_norm_bound=pols[r].update_norm_bound,
                epsilon=res.epsilon,
                epsilon_rdp=res.epsilon_rdp,
                epsilon_budget=res.budget,
                delta=pols[r].delta,
                steps=res.steps,
            )
            reason = verify_update(release.arrays, manifest, exp)
            if reason is not None:
                rejected.append(f"round {rnd} {r}: {reason}")
                continue
            accepted.append((release.arrays, float(num_examples("equal", frames.n_vehicles))))
        if accepted:
            w = strategy.step(w, accepted)
    spent = {r: Ledger(ledgers[r]).epsilon(pols[r].delta, "prv") for r in trains}
    return w, {"rejected": rejected, "epsilon_spent": spent}


def train_local_dp(
    st: Study, train: Any, eps: float, plan: Any, init: dict[str, np.ndarray], work: Path,
    tag: str, seed: int,
) -> tuple[dict[str, np.ndarray], float]:  # fmt: skip
    """One region alone with the same plan (rounds × steps) as the federation."""
    from fedfsd.privacy.ledger import Ledger
    from fedfsd.privacy.local_round import run_local_round

    steps, vps = plan.steps_per_round, plan.vehicles_per_step
    pol = _policy(st, train, eps, plan, steps, vps)
    req = _request(st, steps, plan.lr, vps, plan.noise_multiplier)
    ledger = work / tag / "ledger.jsonl"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    w = init
    for rnd in range(1, plan.rounds + 1):
        w = run_local_round(
            train, pol, ledger, w, req, tag, rnd, st.model, seed=_seed(tag, seed, rnd)
        ).new_weights
    return w, Ledger(ledger).epsilon(pol.delta, "prv")


# -- one (fleet size, seed) ------------------------------------------------------------------------
_DATA: dict[str, Any] = {}


def _init_worker(st: Study, cache: str) -> None:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    if _DATA:  # a forked worker inherits the parent's loaded fleets
        return
    regions, hold, pub = load_all(st, Path(cache))
    _DATA.update(regions=regions, hold=hold, pub=pub)


def plan_for(st: Study, n: int, eps: float) -> Any:
    from fedfsd.privacy.planner import plan_schedule

    return plan_schedule(
        n,
        eps,
        default_delta(n),
        st.rounds,
        frames_per_vehicle=st.frames_per_vehicle,
        clip_norm=st.clip_norm,
        max_vehicles_per_step=st.max_vehicles_per_step,
        max_total_steps=st.max_total_steps,
        **({} if st.noise_budget is None else {"noise_budget": st.noise_budget}),
    )


def run_cell(st: Study, n: int, seed: int, work: str, pretrained: dict[str, np.ndarray]) -> dict:
    """Every model of one fleet size and seed; returns test scores and what was chosen."""
    from fedfsd.models import build_model, get_weights, prior_only_weights

    t0 = time.monotonic()
    regions, hold = _DATA["regions"], _DATA["hold"]
    wdir = Path(work) / f"n{n}-s{seed}"
    trains, vals = {}, {}
    for r, d in regions.items():
        ids = fleet_ids(d.train, n, st.data_seed)
        trains[r] = subset_vehicles(d.train, ids, n)
        # Synthetic smoke fleets have separate validation vehicles (with reused names), and a
        # fleet whose vehicles drive in one episode each has none in val: keep them all.
        own = ids & set(d.val.vehicle_ids)
        whole = st.synthetic or not own
        vals[r] = subset_vehicles(d.val, set(d.val.vehicle_ids) if whole else own, n)
    tests = {**{r: d.test for r, d in regions.items()}, st.holdout: hold}
    any_train = next(iter(trains.values()))
    prior = prior_only_weights(
        get_weights(
            build_model(st.model, any_train.features.shape[1], any_train.labels.shape[1], seed=seed)
        )
    )
    models: dict[str, dict[str, np.ndarray]] = {PRIOR: prior}
    chosen: dict[str, Any] = {"vehicles": n, "seed": seed, "plans": {}, "epsilon_spent": {}}

    np_kw = dict(max_steps=st.np_max_steps, eval_every=st.np_eval_every, lr=st.np_lr)
    pooled = pool_frames(list(trains.values()))
    w, info = train_nonprivate(
        st, pooled, list(vals.values()), prior, wdir, "central", seed,
        vps=st.np_vehicles_per_step * len(trains), **np_kw,
    )  # fmt: skip
    models[CENTRAL] = w
    chosen[CENTRAL] = info
    for r in trains:
        w, info = train_nonprivate(
            st, trains[r], [vals[r]], prior, wdir, f"local-{r}", seed,
            vps=st.np_vehicles_per_step, **np_kw,
        )  # fmt: skip
        models[f"local-only (no DP) {r}"] = w
        chosen[f"local-only (no DP) {r}"] = info

    from fedfsd.privacy.planner import PlanError

    for eps in st.epsilons:
        e = f"ε={eps:g}"
        try:
            plan = plan_for(st, n, eps)
        except PlanError as err:  # e.g. ε = 1 on 300 vehicles: no step keeps the noise in bounds
            chosen["plans"][e] = {"refused": str(err)}
            console.print(f"[yellow]{n} vehicles, {e}: no DP plan ({err}); models skipped[/]")
            continue
        chosen["plans"][e] = plan.model_dump()
        variants = [("plain", prior, "fedavg")]
        if eps == st.lever_epsilon:
            variants += [
                ("public pretraining", pretrained, "fedavg"),
                ("FedAdam", prior, "fedadam"),
                ("public pretraining + FedAdam", pretrained, "fedadam"),
            ]
        val_scores = {}
        for label, init, opt in variants:
            name = f"federated DP {e}" + ("" if label == "plain" else f" + {label}")
            w, info = federate(
                st, trains, eps, plan, init, wdir, f"fed-{eps}-{label}", seed, optimizer=opt
            )
            models[name] = w
            chosen["epsilon_spent"][name] = info["epsilon_spent"]
            if info["rejected"]:
                console.print(f"[yellow]{name}: rejected {info['rejected']}[/]")
            val_scores[name] = val_fde(st, w, list(vals.values()))
        best = min(val_scores, key=val_scores.get)
        chosen[f"federated DP {e} val"] = val_scores
        chosen[f"federated DP {e} selected"] = best
        models[f"federated DP {e} (selected on val)"] = models[best]
        for r in trains:
            w, spent = train_local_dp(st, trains[r], eps, plan, prior, wdir, f"ldp-{eps}-{r}", seed)
            models[f"local-only (DP {e}) {r}"] = w
            chosen["epsilon_spent"][f"local-only (DP {e}) {r}"] = spent
        if eps == st.lever_epsilon:
            from fedfsd.region.finetune import finetune_model

            for r in trains:
                res = finetune_model(
                    trains[r],
                    vals[r],
                    models[best],
                    st.model,
                    max_steps=st.finetune_max_steps,
                    eval_every=st.finetune_eval_every,
                    lr=st.finetune_lr,
                    vehicles_per_step=st.np_vehicles_per_step,
                    seed=_seed("ft", r, seed, n),
                )
                models[f"personalised {r}"] = res.weights
                chosen[f"personalised {r}"] = {"steps": res.steps, "val_fde": res.val_fde_after}

    scores = {name: score(st, w, tests) for name, w in models.items()}
    return {"n": n, "seed": seed, "scores": scores, "chosen": chosen,
            "seconds": time.monotonic() - t0, "study_key": study_key(st)}  # fmt: skip


# Settings that say which cells a run computes, not how a cell is computed.
_CELL_SELECTION = ("sizes", "seeds", "max_seeds_large", "seeds_large_from", "workers")


def study_key(st: Study) -> str:
    """Digest of every setting that changes a cell's numbers (and of the planner's rule).

    Cells kept from an earlier run (`--keep-cells`) join a summary only when their key matches,
    so a table never mixes cells computed under different settings.
    """
    from fedfsd.privacy.planner import NOISE_BUDGET, RULE

    doc = {k: v for k, v in asdict(st).items() if k not in _CELL_SELECTION}
    doc["planner"] = [RULE, NOISE_BUDGET]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def kept_cells(st: Study, folder: Path) -> list[dict]:
    """Cells earlier runs wrote to `folder` under this study's key (they are not recomputed)."""
    key, out = study_key(st), []
    for path in sorted(folder.glob("cell-n*-s*.json")):
        cell = json.loads(path.read_text())
        if cell.get("study_key") == key:
            out.append(cell)
        elif cell.get("study_key") != key:
            console.print(f"[yellow]not kept: {path.name} (computed under other settings)")
    return out


def pretrain_public(st: Study, work: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The public-data start: non-private, on the `public` profile only, chosen on its val."""
    from fedfsd.modelhub.pretrain import pretrain_model

    pub = _DATA["pub"]
    return pretrain_model(
        [pub.train],
        [pub.val],
        st.model,
        steps=st.np_max_steps,
        lr=st.np_lr,
        vehicles_per_step=st.np_vehicles_per_step,
        seed=0,
    )


# -- summary ---------------------------------------------------------------------------------------
def summarise(st: Study, cells: list[dict]) -> dict[str, Any]:
    """Mean ± std over seeds per (N, model, test set) and the issue's targets."""
    table: dict[str, dict[str, dict[str, dict[str, list[float]]]]] = {}
    for n in st.sizes:
        per_seed = [c for c in cells if c["n"] == n]
        if not per_seed:
            continue
        table[str(n)] = {}
        for name in per_seed[0]["scores"]:
            table[str(n)][name] = {
                t: {m: list(mean_std([c["scores"][name][t][m] for c in per_seed])) for m in METRICS}
                for t in per_seed[0]["scores"][name]
            }
    e = f"ε={st.lever_epsilon:g}"
    fed = f"federated DP {e} (selected on val)"
    targets: dict[str, Any] = {}
    big = str(st.large)
    if big in table:
        t = table[big]
        f, c, p = (t[k]["pooled"]["fde"][0] for k in (fed, CENTRAL, PRIOR))
        targets[f"{big} vehicles, {e}: federated ≤ 1.15× centralised and ≤ 0.9× prior"] = {
            "federated": f, "centralised": c, "prior": p, "ratio_central": f / c,
            "ratio_prior": f / p, "met": f <= 1.15 * c and f <= 0.9 * p,
        }  # fmt: skip
    per_n = {}
    for n, t in table.items():
        if int(n) < 1000 or f"personalised {st.regions[0]}" not in t:
            continue
        rows = {
            r: {
                "personalised": t[f"personalised {r}"][r]["fde"][0],
                "local_no_dp": t[f"local-only (no DP) {r}"][r]["fde"][0],
            }
            for r in st.regions
        }
        per_n[n] = {"per_region": rows, "met": all(v["personalised"] < v["local_no_dp"]
                                                    for v in rows.values())}  # fmt: skip
    targets[f"every N ≥ 1000, {e}: personalised beats local-only (no DP) on its region"] = {
        "per_size": per_n,
        "met": bool(per_n) and all(v["met"] for v in per_n.values()),
    }
    hold = {}
    for n, t in table.items():
        if fed not in t:
            continue
        f = t[fed][st.holdout]["fde"][0]
        others = {k: v[st.holdout]["fde"][0] for k, v in t.items()
                  if k.startswith("local-only (no DP)") or k == PRIOR}  # fmt: skip
        hold[n] = {"federated": f, "others": others, "met": all(f < v for v in others.values())}
    targets[
        f"held-out {st.holdout}, {e}: federated beats every local-only (no DP) and the prior"
    ] = {
        "per_size": hold,
        "met": bool(hold) and all(v["met"] for v in hold.values()),
    }
    return {"table": table, "targets": targets}


def plot(st: Study, table: dict[str, Any], path: Path) -> Path:
    """Pooled test FDE vs fleet size, one panel per ε."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [n for n in st.sizes if str(n) in table]
    fig, axes = plt.subplots(
        1, len(st.epsilons), figsize=(5 * len(st.epsilons), 4.2), squeeze=False
    )
    for ax, eps in zip(axes[0], st.epsilons, strict=True):
        e = f"ε={eps:g}"

        def series(name: str, sizes: list[int] = sizes) -> tuple[list[float], list[float]]:
            vals = [
                table[str(n)].get(name, {}).get("pooled", {}).get("fde", [np.nan, 0]) for n in sizes
            ]
            return [v[0] for v in vals], [v[1] for v in vals]

        for name, style in (
            (PRIOR, dict(color="k", ls=":")),
            (CENTRAL, dict(color="k", ls="--")),
            (f"federated DP {e} (selected on val)", dict(color="tab:blue", marker="o")),
            (f"federated DP {e}", dict(color="tab:blue", ls="-.", alpha=0.6)),
        ):
            m, s = series(name)
            ax.errorbar(sizes, m, yerr=s, capsize=3, label=name, **style)
        for r, col in zip(st.regions, ("tab:orange", "tab:green", "tab:red"), strict=False):
            loc = [table[str(n)][f"local-only (no DP) {r}"][r]["fde"][0] for n in sizes]
            ax.plot(
                sizes,
                loc,
                color=col,
                ls="--",
                alpha=0.7,
                label=f"local-only (no DP) {r}, own region",
            )
            if eps == st.lever_epsilon:
                per = [table[str(n)].get(f"personalised {r}", {}).get(r, {}).get("fde", [np.nan])[0]
                       for n in sizes]  # fmt: skip
                ax.plot(sizes, per, color=col, marker="s", label=f"personalised {r}, own region")
        ax.set_xscale("log")
        ax.set_xlabel("vehicles per training region")
        ax.set_ylabel("FDE@3 s, test episodes (m)")
        ax.set_title(f"vehicle-level DP, {e} per region")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_tables(st: Study, doc: dict[str, Any]) -> None:
    for n, t in doc["table"].items():
        cols = [
            "model",
            "FDE pooled",
            *[f"FDE {r}" for r in st.regions],
            f"FDE {st.holdout} (held out)",
        ]
        rows = []
        for name, per in t.items():
            rows.append(
                [
                    name,
                    *[
                        f"{per[k]['fde'][0]:.3f} ± {per[k]['fde'][1]:.3f}"
                        for k in ("pooled", *st.regions, st.holdout)
                    ],
                ]  # fmt: skip
            )
        console.print(
            rich_table(f"{n} vehicles per region: test FDE@3 s (m), mean ± std", cols, rows)
        )
    for name, tgt in doc["targets"].items():
        console.print(f"target: {name}: " + ("[green]MET[/]" if tgt["met"] else "[red]MISSED[/]"))


SIZES: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": {
        "sizes": [300, 1000],
        "large": 1000,
        "seeds": [0],
        "np_max_steps": 1000,
        "finetune_max_steps": 600,
        "max_total_steps": 200,
        "holdout_vehicles": 500,
        "public_vehicles": 1000,
    },
    "tiny": {
        "synthetic": True,
        "sizes": [40, 80],
        "large": 80,
        "seeds": [0],
        "epsilons": [3.0, 8.0],
        "rounds": 2,
        "max_total_steps": 4,
        "max_vehicles_per_step": 16,
        "noise_budget": 10.0,  # tiny synthetic fleets: any noise level, it is a smoke run
        "np_max_steps": 20,
        "np_eval_every": 10,
        "np_vehicles_per_step": 8,
        "finetune_max_steps": 10,
        "finetune_eval_every": 5,
        "workers": 1,
    },
}


def main(
    quick: bool = typer.Option(False, help="minutes on 2 cores: 300 and 1,000 vehicles, one seed"),
    tiny: bool = typer.Option(False, help="seconds, synthetic fleets: a smoke test only"),
    out: str = typer.Option(None, help="output folder (default experiments/out/fleet_scale)"),
    data: str = typer.Option(str(DATA_CACHE), help="cache of generated fleet datasets"),
    sizes: str = typer.Option(None, help="comma-separated vehicles per region, e.g. 300,1000"),
    epsilons: str = typer.Option(None, help="comma-separated ε targets, e.g. 1,3,8"),
    seeds: int = typer.Option(None, help="seeds per size (sizes ≥ 3,000 get --max-seeds-large)"),
    appearances: float = typer.Option(
        None,
        help="episodes each training-region vehicle drives in (default 3; fewer episodes make "
        "the largest fleets affordable, with fewer frames per vehicle)",
    ),
    generate: int = typer.Option(
        None,
        help="vehicles generated per training region (default: enough that the largest size "
        "drives in train episodes, 1.06× it at 3 appearances, ≈ 1.47× at 1)",
    ),
    max_total_steps: int = typer.Option(
        None,
        help="cap on the DP schedule's steps over all rounds (default 300); the planner takes "
        "fewer when the noise allows no more",
    ),
    np_max_steps: int = typer.Option(
        None, help="cap on non-private training steps (centralised, local, pretraining)"
    ),
    finetune_max_steps: int = typer.Option(
        None, help="cap on each region's personalisation fine-tuning steps (default 1,200)"
    ),
    max_seeds_large: int = typer.Option(
        None, help="seeds for sizes ≥ 3,000 (default 1: a cell there takes 20-30 min here)"
    ),
    workers: int = typer.Option(None, help="parallel processes (one (size, seed) cell each)"),
    keep_cells: bool = typer.Option(
        False,
        help="also summarise the cells earlier runs wrote to the output folder with the same "
        "settings (to add sizes or seeds without recomputing the others)",
    ),
) -> None:
    """Run the study, print the tables, write fleet_scale.json and fleet_scale.png."""
    preset = sized_preset(SIZES, quick, tiny, workers=workers)
    for opt, key in ((sizes, "sizes"), (epsilons, "epsilons")):
        if opt:
            try:
                preset[key] = sorted(
                    {(int if key == "sizes" else float)(v) for v in opt.split(",")}
                )
            except ValueError:
                bad_option(f"--{key} must be numbers separated by commas, got {opt!r}")
            if any(v <= 0 for v in preset[key]):
                bad_option(f"--{key} must be > 0")
    if appearances is not None:
        if not 0 < appearances <= 100:
            bad_option("--appearances must be in (0, 100]")
        preset["appearances"] = appearances
    if generate is not None:
        if generate < max(preset["sizes"]):
            bad_option("--generate must be at least the largest of --sizes")
        preset["generate_vehicles"] = generate
    for opt, key in (
        (max_total_steps, "max_total_steps"),
        (np_max_steps, "np_max_steps"),
        (finetune_max_steps, "finetune_max_steps"),
        (max_seeds_large, "max_seeds_large"),
    ):
        if opt is not None:
            if opt < 1:
                bad_option(f"--{key.replace('_', '-')} must be ≥ 1")
            preset[key] = opt
    if seeds is not None:
        if seeds < 1:
            bad_option("--seeds must be ≥ 1")
        preset["seeds"] = list(range(seeds))
    st = Study(**preset)
    if st.lever_epsilon not in st.epsilons:
        st = replace(st, lever_epsilon=st.epsilons[len(st.epsilons) // 2])
    folder = out_dir("fleet_scale", out)
    work = folder / "work"
    if work.exists():
        import shutil

        shutil.rmtree(work)  # old ledgers would refuse (budget) or replay (cache)
    requested = list(st.sizes)
    kept = kept_cells(st, folder) if keep_cells else []
    if kept:  # the data (and its test split) is the one of the largest fleet summarised
        st = replace(st, sizes=sorted({*requested, *(c["n"] for c in kept)}))
    t0 = time.monotonic()
    _init_worker(st, data)  # generates (once, cached) and loads in this process
    load_s = time.monotonic() - t0
    pretrained, pre_info = pretrain_public(st, work)
    cells_todo = [
        (n, s)
        for n in requested
        for s in (st.seeds if n < st.seeds_large_from else st.seeds[: st.max_seeds_large])
    ]
    cells_todo = [c for c in cells_todo if c not in {(k["n"], k["seed"]) for k in kept}]
    # Largest cells first so the two workers finish together.
    cells_todo.sort(key=lambda c: -c[0])
    cells: list[dict] = []
    if st.workers <= 1:
        for n, s in cells_todo:
            cells.append(run_cell(st, n, s, str(work), pretrained))
            write_json(folder / f"cell-n{n}-s{s}.json", cells[-1])
            console.print(f"  {n} vehicles, seed {s}: {cells[-1]['seconds']:.0f} s")
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(
            st.workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
            initargs=(st, data),
        ) as pool:  # fmt: skip
            futs = [pool.submit(run_cell, st, n, s, str(work), pretrained) for n, s in cells_todo]
            for f in futs:
                cells.append(f.result())
                write_json(folder / f"cell-n{cells[-1]['n']}-s{cells[-1]['seed']}.json", cells[-1])
                console.print(f"  {cells[-1]['n']} vehicles, seed {cells[-1]['seed']}: "
                              f"{cells[-1]['seconds']:.0f} s")  # fmt: skip
    if kept:
        cells += kept
        console.print(f"kept {len(kept)} cell(s) of earlier runs with the same settings")
    doc = {
        "study": asdict(st),
        "machine": machine(),
        **summarise(st, cells),
        "pretraining": pre_info,
        "cells": cells,
        "seconds": {"load": load_s, "total": time.monotonic() - t0},
        "notes": [
            "choices on validation episodes only; test episodes only scored",
            "DP schedule per (N, ε) from fedfsd.privacy.planner.plan_schedule",
            "fleets of N vehicles are nested seeded subsets of one fleet-scale dataset per region; "
            "test episodes are the whole test split (same for every N)",
            "DP noise and sampling seeded here for reproducibility (production seeds from the OS)",
        ]
        + (["SYNTHETIC fleets (smoke run): numbers are not meaningful"] if st.synthetic else []),
    }
    write_json(folder / "fleet_scale.json", doc)
    plot(st, doc["table"], folder / "fleet_scale.png")
    print_tables(st, doc)
    console.print(f"wrote {folder / 'fleet_scale.json'} and {folder / 'fleet_scale.png'} "
                  f"({doc['seconds']['total']:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
