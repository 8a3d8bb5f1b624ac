"""Which DP schedule? Federated vs local-only vehicle-level DP at one ε, per schedule.

    .venv/bin/python experiments/dp_schedule_sweep.py                 # 300 × 40 fleets, 2 seeds
    .venv/bin/python experiments/dp_schedule_sweep.py --tiny          # synthetic smoke run (tests)

Why it exists: at a fixed ε, a schedule trades steps against noise. More steps or a higher
sampling rate q need a larger σ, but the noise of each step is divided by the expected vehicles
per step. This sweep shows, on held-out episodes, how the federated model and each region's
local-only DP model (same ε, same schedule) fare for each schedule, next to the non-private
centralised limit and the untrained model (the constant-velocity prior alone). The
privacy–utility study's DP schedule was chosen from it.

Each schedule is `ROUNDSxSTEPSxVEHICLES@LR`: rounds of local DP-SGD steps, expected vehicles per
step, local learning rate. Training goes through the same in-process path as
privacy_utility.py (`federate` and `train_alone` there).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import typer
from common import (
    DATA_CACHE,
    bad_option,
    console,
    machine,
    mean_std,
    out_dir,
    rich_table,
    write_json,
)
from privacy_utility import Study, federate, initial, load_data, pool_frames, score, train_alone

DEFAULT_SCHEDULES = (
    "50x10x16@0.1,10x10x16@0.1,10x10x64@0.1,10x5x64@0.1,10x3x128@0.2,20x3x128@0.2,"
    "10x10x128@0.1,10x5x192@0.2"
)
SCHEDULE_RE = re.compile(r"^(\d+)x(\d+)x(\d+)@([0-9.]+)$")


def parse_schedules(text: str) -> list[tuple[int, int, int, float]]:
    """'10x3x128@0.2,…' → [(rounds, steps, vehicles per step, lr), …]."""
    out = []
    for part in text.split(","):
        m = SCHEDULE_RE.match(part.strip())
        if not m or int(m[1]) < 1 or int(m[2]) < 1 or int(m[3]) < 1 or float(m[4]) <= 0:
            bad_option(f"--schedules: {part!r} is not ROUNDSxSTEPSxVEHICLES@LR (all > 0)")
        out.append((int(m[1]), int(m[2]), int(m[3]), float(m[4])))
    return out


def label(s: tuple[int, int, int, float]) -> str:
    return f"{s[0]}×{s[1]} steps, {s[2]}/step, lr {s[3]:g}"


def central_name(base: Study, steps: int) -> str:
    return f"centralised (no DP, {base.np_rounds * steps} steps)"


def run_sweep(
    base: Study,
    schedules: list[tuple[int, int, int, float]],
    eps: float,
    work: Path,
    central_steps: list[int],
) -> dict[str, Any]:
    """FDE@3 s per schedule and seed: federated (per region and pooled) and local-only DP.

    References: the untrained model, and centralised non-private training for each of
    `central_steps` local steps per round (how far the non-private limit moves with steps).
    """
    trains, tests = load_data(base, DATA_CACHE if not base.synthetic else work)
    pooled_train = pool_frames([trains[r] for r in base.regions])
    rows: list[dict[str, Any]] = []
    refs: dict[str, list[float]] = {"untrained (prior only)": []}
    for seed in base.seeds:
        init = initial(base, pooled_train, seed)
        refs["untrained (prior only)"].append(score(base, init, tests)["pooled"]["fde"])
        for steps in central_steps:
            st = replace(base, np_local_steps=steps)
            n = len(base.regions)
            w, _ = train_alone(st, pooled_train, None, init, work, f"central{steps}", seed, n)
            refs.setdefault(central_name(base, steps), []).append(
                score(base, w, tests)["pooled"]["fde"]
            )
    for sched in schedules:
        st = replace(
            base, rounds=sched[0], local_steps=sched[1], vehicles_per_step=sched[2], lr=sched[3]
        )
        t = time.monotonic()
        per_seed: list[dict[str, Any]] = []
        for seed in st.seeds:
            init = initial(st, pooled_train, seed)
            tag = f"{sched[0]}x{sched[1]}x{sched[2]}@{sched[3]:g}"
            w, info = federate(st, trains, eps, init, work, f"fed-{tag}", seed)
            fed = score(st, w, tests)
            local = {}
            for r in st.regions:
                lw, _ = train_alone(st, trains[r], eps, init, work, f"local-{r}-{tag}", seed)
                local[r] = score(st, lw, tests)[r]["fde"]
            per_seed.append(
                {
                    "fed": {k: fed[k]["fde"] for k in [*st.regions, "pooled", st.holdout]},
                    "local": local,
                    "sigma": {r: v["sigma"] for r, v in info["regions"].items()},
                }
            )
        row: dict[str, Any] = {"schedule": label(sched), "rounds": sched[0], "steps": sched[1]}
        row.update(vehicles_per_step=sched[2], lr=sched[3], seconds=time.monotonic() - t)
        row["sigma"] = per_seed[0]["sigma"]
        row["fed_pooled"] = mean_std([p["fed"]["pooled"] for p in per_seed])
        row["fed_holdout"] = mean_std([p["fed"][st.holdout] for p in per_seed])
        for r in st.regions:
            row[f"fed_{r}"] = mean_std([p["fed"][r] for p in per_seed])
            row[f"local_{r}"] = mean_std([p["local"][r] for p in per_seed])
        row["fed_beats_local_on_own_region"] = {
            r: row[f"fed_{r}"][0] < row[f"local_{r}"][0] for r in st.regions
        }
        rows.append(row)
        console.print(f"{label(sched)}: federated pooled FDE {row['fed_pooled'][0]:.2f} m")
    return {"rows": rows, "references": {k: mean_std(v) for k, v in refs.items()}}


def plot(doc: dict[str, Any], regions: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(rows)), 4.8))
    x = np.arange(len(rows))
    width = 0.8 / (1 + 2 * len(regions))
    ax.bar(x, [r["fed_pooled"][0] for r in rows], width, yerr=[r["fed_pooled"][1] for r in rows],
           color="k", alpha=0.6, label="federated, pooled test")  # fmt: skip
    for i, reg in enumerate(regions):
        c = f"C{i}"
        for j, (key, name, hatch) in enumerate(
            (
                (f"fed_{reg}", f"federated on {reg}", None),
                (f"local_{reg}", f"local-only {reg}", "//"),
            )
        ):
            ax.bar(x + (1 + 2 * i + j) * width, [r[key][0] for r in rows], width,
                   yerr=[r[key][1] for r in rows], color=c, hatch=hatch,
                   alpha=0.9 if hatch is None else 0.45, label=name)  # fmt: skip
    for name, (m, _) in doc["references"].items():
        ax.axhline(m, ls="--" if "central" in name else ":", color="k", lw=1)  # one per reference
        ax.text(len(rows) - 0.5, m, name, ha="right", va="bottom", fontsize=8)
    ax.set_xticks(x + width * len(regions), [r["schedule"] for r in rows], rotation=30,
                  ha="right", fontsize=8)  # fmt: skip
    ax.set_ylabel("FDE@3s (m), held-out episodes")
    ax.set_title(f"DP schedules at ε = {doc['epsilon']:g} per region (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(
    tiny: bool = typer.Option(False, help="seconds, synthetic fleets: a smoke test only"),
    out: str = typer.Option(None, help="output folder (default experiments/out/dp_schedule_sweep)"),
    schedules: str = typer.Option(DEFAULT_SCHEDULES, help="ROUNDSxSTEPSxVEHICLES@LR,…"),
    epsilon: float = typer.Option(8.0, help="ε per region"),
    seeds: int = typer.Option(2, help="seeds per schedule"),
    central_steps: str = typer.Option(
        "200", help="local steps per round of the centralised references (10 rounds), e.g. 50,200"
    ),
    vehicles: int = typer.Option(300, help="fleet size per region (generated data)"),
    episodes: int = typer.Option(40, help="episodes per region (generated data)"),
) -> None:
    """Run every schedule, print the table, write dp_schedule_sweep.json and .png."""
    if epsilon <= 0 or seeds < 1 or vehicles < 1 or episodes < 1:
        bad_option("--epsilon, --seeds, --vehicles and --episodes must be > 0")
    sched = parse_schedules("2x2x8@0.2,1x3x8@0.1" if tiny else schedules)
    try:
        csteps = [int(x) for x in central_steps.split(",")]
    except ValueError:
        bad_option(f"--central-steps must be integers separated by commas, got {central_steps!r}")
    if any(n < 1 for n in csteps):
        bad_option("--central-steps must be ≥ 1")
    if tiny:
        csteps = [3]
    base = Study(vehicles=vehicles, episodes=episodes, seeds=list(range(seeds)))
    if tiny:
        base = replace(base, synthetic=True, vehicles=40, episodes=10, np_rounds=2,
                       np_local_steps=3, np_vehicles_per_step=8)  # fmt: skip
    folder = out_dir("dp_schedule_sweep", out)
    work = folder / "work"
    if work.exists():
        import shutil

        shutil.rmtree(work)  # old ledgers would refuse (budget) or replay (cache)
    res = run_sweep(base, sched, epsilon, work, csteps)
    doc = {"epsilon": epsilon, "study": asdict(base), "machine": machine(), **res}
    write_json(folder / "dp_schedule_sweep.json", doc)
    plot(doc, base.regions, folder / "dp_schedule_sweep.png")
    cols = ["schedule", "σ (cn)", "fed pooled", *[f"fed / local {r}" for r in base.regions]]
    table = [
        [
            r["schedule"],
            f"{r['sigma'][base.regions[0]]:.2f}",
            f"{r['fed_pooled'][0]:.2f} ± {r['fed_pooled'][1]:.2f}",
            *[f"{r[f'fed_{g}'][0]:.2f} / {r[f'local_{g}'][0]:.2f}" for g in base.regions],
        ]
        for r in res["rows"]
    ]
    console.print(rich_table(f"FDE@3s (m) at ε = {epsilon:g}, held-out episodes", cols, table))
    for name, (m, s) in res["references"].items():
        console.print(f"{name}: pooled FDE {m:.2f} ± {s:.2f} m")
    console.print(
        f"wrote {folder / 'dp_schedule_sweep.json'} and {folder / 'dp_schedule_sweep.png'}"
    )


if __name__ == "__main__":
    typer.run(main)
