"""Choose the demo's DP step cap on validation episodes of the demo's own fleets.

Why: `fedfsd demo` must finish in about five minutes on 2 cores and its federated model must beat
the constant-velocity prior. The planner's largest schedule for 1,000-vehicle regions (300 steps,
σ/m ≈ 0.012) came out worse than the prior on test episodes; fewer, less noisy steps at the same ε
may do better and cost less. This script runs the federation in-process through fedfsd's own
region and aggregator code (fleet_scale.federate: DP-SGD over vehicles, ledger, egress guard,
update verification, FedAvg) for each cap and scores the pooled *validation* episodes only; the
demo's reported numbers come from its test episodes, which no choice here has seen.

    .venv/bin/python experiments/demo_schedule.py                 # 1,000 vehicles, caps 50,100,300
    .venv/bin/python experiments/demo_schedule.py --vehicles 300 --caps 25,50
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import typer
from common import bad_option, console, out_dir, write_json
from rich.table import Table


def main(
    vehicles: int = typer.Option(1000, help="fleet vehicles per region (the demo's --vehicles)"),
    caps: str = typer.Option("50,100,300", help="comma-separated caps on total DP steps"),
    data_cache: str = typer.Option(".fedfsd/demo-data", help="the demo's data cache"),
    out: str = typer.Option(None, help="output folder (default experiments/out/demo_schedule)"),
) -> None:
    """Federate once per step cap with the demo's settings; print val FDE vs the prior."""
    import fleet_scale as fs

    from fedfsd.data.vehicles import load_vehicle_frames
    from fedfsd.demo import DemoConfig, _prior_weights, ensure_data, public_fleet_size

    try:
        cap_list = sorted({int(c) for c in caps.split(",")})
    except ValueError:
        bad_option(f"--caps must be integers separated by commas, got {caps!r}")
    if vehicles < 20 or any(c < 1 for c in cap_list):
        bad_option("--vehicles must be ≥ 20 and every cap ≥ 1")
    cfg = replace(DemoConfig(), vehicles=vehicles)
    data = ensure_data(cfg, Path(data_cache).resolve())
    trains = {r: load_vehicle_frames(d, split="train") for r, d in data.items()}
    vals = [load_vehicle_frames(d, split="val") for d in data.values()]
    declared = min(public_fleet_size(f.n_vehicles) for f in trains.values())
    rows = []
    for cap in cap_list:
        t0 = time.monotonic()
        plan = replace(cfg, max_total_steps=cap).plan(declared)
        prior = _prior_weights(cfg, plan)
        st = fs.Study(
            rounds=cfg.rounds,
            frames_per_vehicle=cfg.frames_per_vehicle,
            clip_norm=cfg.clip_norm,
            max_vehicles_per_step=cfg.max_vehicles_per_step,
            max_total_steps=cap,
            update_norm_bound=cfg.update_norm_bound,
            model=cfg.model,
        )
        with tempfile.TemporaryDirectory() as work:
            weights, info = fs.federate(
                st, trains, cfg.epsilon_budget, plan, prior, Path(work), f"cap{cap}", 0
            )
        fed, pri = fs.val_fde(st, weights, vals), fs.val_fde(st, prior, vals)
        rows.append(
            {
                "cap": cap,
                "vehicles_per_step": plan.vehicles_per_step,
                "noise_multiplier": plan.noise_multiplier,
                "total_steps": plan.total_steps,
                "noise_ratio": plan.noise_ratio,
                "lr": plan.lr,
                "val_fde_federated": fed,
                "val_fde_prior": pri,
                "federated_vs_prior": fed / pri,
                "epsilon_spent": info["epsilon_spent"],
                "seconds": round(time.monotonic() - t0, 1),
            }
        )
        console.print(json.dumps(rows[-1]))
    table = Table(title=f"demo schedule, {declared} declared vehicles per region (validation)")
    for col in ("cap", "m", "σ", "steps", "σ/m", "val FDE fed", "val FDE prior", "fed/prior", "s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["cap"]), str(r["vehicles_per_step"]), f"{r['noise_multiplier']:.2f}",
            str(r["total_steps"]), f"{r['noise_ratio']:.4f}", f"{r['val_fde_federated']:.3f}",
            f"{r['val_fde_prior']:.3f}", f"{r['federated_vs_prior']:.3f}", f"{r['seconds']:.0f}",
        )  # fmt: skip
    console.print(table)
    best = min(rows, key=lambda r: (round(r["federated_vs_prior"], 2), r["total_steps"]))
    console.print(f"chosen on validation (lowest ratio at two decimals, then fewest steps): "
                  f"cap {best['cap']}")  # fmt: skip
    doc = {"vehicles": vehicles, "declared": declared, "rows": rows, "chosen": best["cap"]}
    write_json(out_dir("demo_schedule", out) / "demo_schedule.json", doc)


if __name__ == "__main__":
    typer.run(main)
