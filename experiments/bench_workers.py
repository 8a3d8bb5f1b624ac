"""Benchmark: DP-SGD steps per second of one region with 1 and N worker processes.

Runs the real trainers: one worker is today's in-process path (`VehicleDPSGD.step`, the loop of
`run_local_round`); N workers are `fedfsd.privacy.distributed.train_distributed` (forked
processes, gloo on loopback, one thread each). Rows: the object-list MLP (ghost per-vehicle
clipping) and, unless --mlp-only, the BEV CNN (vmap), at 256 and 1024 expected vehicles per
step, K = 8 frames per vehicle, a fleet of 4 × that many vehicles.

steps/s is the training loop alone (rank 0's clock, after the workers joined); "wall" adds the
start of the processes and their rendezvous, once per round. CPU seconds count this process and
its children. The load average is printed with the table: on a shared machine the speed-up is
bounded by the cores actually free, so read it next to the load. "CPU-bound speed-up" is one
worker's loop CPU seconds over the busiest of N workers' (a worker waiting in a collective uses
no CPU): the speed-up a free core per worker would give, an estimate beside the measurement.

    .venv/bin/python experiments/bench_workers.py [--workers 2] [--steps 20] [--mlp-only]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

K = 8


def _cpu_seconds() -> float:
    """User + system CPU of this process and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _setup(model_name: str, b: int, steps: int) -> tuple[Any, Any, dict, int]:
    from fedfsd.config import DPParams
    from fedfsd.data.testing import make_synthetic_frames
    from fedfsd.models import build_model, get_weights
    from fedfsd.privacy.objective import model_kwargs

    frames = make_synthetic_frames(4 * b, 2 * K, seed=0, with_bev=model_name == "bev_cnn")
    model = build_model(
        model_name,
        frames.features.shape[1],
        frames.labels.shape[1],
        **model_kwargs(frames, model_name),
    )
    params = DPParams(
        noise_multiplier=1.0, clip_norm=1.0, steps=steps, vehicles_per_step=b,
        frames_per_vehicle=K, lr=0.01, update_norm_bound=10.0,
    )  # fmt: skip
    return frames, params, get_weights(model), frames.n_vehicles


def run_one(model_name: str, b: int, steps: int, workers: int) -> dict[str, float]:
    """One round of `steps` private steps; returns steps/s, wall and CPU seconds."""
    import torch

    frames, params, weights, n = _setup(model_name, b, steps)
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    if workers == 1:
        from fedfsd.models import build_model, set_weights
        from fedfsd.privacy.dpsgd import VehicleDPSGD
        from fedfsd.privacy.objective import model_kwargs

        torch.set_num_threads(1)
        kw = model_kwargs(frames, model_name)
        model = build_model(model_name, frames.features.shape[1], frames.labels.shape[1], **kw)
        set_weights(model, weights)
        trainer = VehicleDPSGD(
            model, params, n, modality="bev" if model_name == "bev_cnn" else "objects", seed=0
        )
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            trainer.step(frames)
        loop = time.perf_counter() - t0
        critical = time.process_time() - c0
    else:
        from fedfsd.privacy.distributed import train_distributed

        out = train_distributed(frames, model_name, weights, params, [], n, workers=workers, seed=0)
        loop = out.seconds
        critical = max(out.worker_cpu_s)  # the busiest worker's CPU seconds
    wall = time.perf_counter() - wall0
    return {
        "steps_per_s": steps / loop,
        "loop_s": loop,
        "wall_s": wall,
        "cpu_s": _cpu_seconds() - cpu0,
        "critical_cpu_s": critical,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="the N compared with 1 worker")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per cell; the best is kept")
    ap.add_argument("--batches", default="256,1024", help="expected vehicles per step")
    ap.add_argument("--mlp-only", action="store_true", help="skip the BEV CNN rows")
    ap.add_argument("--out", default="experiments/out/bench_workers", help="writes workers.json")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from rich.console import Console
    from rich.table import Table

    models = ["mlp"] + ([] if a.mlp_only else ["bev_cnn"])
    load_before = os.getloadavg()
    rows = []
    for model in models:
        for b in (int(x) for x in a.batches.split(",")):
            steps = a.steps if model == "mlp" else max(2, a.steps // 4)
            cells: dict[int, dict[str, float]] = {}
            for w in (1, a.workers):  # warm-up: imports, first allocations
                run_one(model, b, 2, w)
            for _ in range(a.repeats):  # interleaved, so both see the same load
                for w in (1, a.workers):
                    r = run_one(model, b, steps, w)
                    if w not in cells or r["steps_per_s"] > cells[w]["steps_per_s"]:
                        cells[w] = r
            rows.append({"model": model, "vehicles_per_step": b, "steps": steps, **{
                f"{k}_{w}": round(v, 4) for w, c in cells.items() for k, v in c.items()
            }})  # fmt: skip
            rows[-1]["speedup"] = round(
                cells[a.workers]["steps_per_s"] / cells[1]["steps_per_s"], 3
            )
            # What the speed-up would be with a free core per worker: one worker's loop CPU over
            # the busiest worker's (waiting in a collective costs no CPU). An estimate, not a
            # measurement; the measured one above is bounded by the cores the machine has free.
            rows[-1]["cpu_bound_speedup"] = round(
                cells[1]["critical_cpu_s"] / cells[a.workers]["critical_cpu_s"], 3
            )
    load_after = os.getloadavg()
    table = Table(title=f"DP-SGD steps/s, 1 vs {a.workers} workers (one thread each)")
    for col in ("model", "B", "steps/s 1", f"steps/s {a.workers}", "speed-up",
                "wall s 1", f"wall s {a.workers}", "CPU s 1", f"CPU s {a.workers}",
                "busiest worker CPU s 1 / 2", "CPU-bound speed-up"):  # fmt: skip
        table.add_column(col, justify="right")
    n = a.workers
    for r in rows:
        table.add_row(
            r["model"], str(r["vehicles_per_step"]),
            f"{r['steps_per_s_1']:.2f}", f"{r[f'steps_per_s_{n}']:.2f}", f"{r['speedup']:.2f}×",
            f"{r['wall_s_1']:.2f}", f"{r[f'wall_s_{n}']:.2f}",
            f"{r['cpu_s_1']:.2f}", f"{r[f'cpu_s_{n}']:.2f}",
            f"{r['critical_cpu_s_1']:.2f} / {r[f'critical_cpu_s_{n}']:.2f}",
            f"{r['cpu_bound_speedup']:.2f}×",
        )  # fmt: skip
    con = Console(width=170)
    con.print(table)
    con.print(
        f"cores {os.cpu_count()}; load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.2f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.2f}' for x in load_after)}"
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "workers.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "workers": n,
                "cores": os.cpu_count(),
                "load_before": load_before,
                "load_after": load_after,
            },
            indent=2,
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
