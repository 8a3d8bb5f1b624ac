"""Benchmark: vehicle-level DP-SGD step vs the non-private step of the same model and batch.

Prints a table (time per step, CPU time per step, peak extra memory, ratio to non-private) for
the object-list MLP and the BEV CNN, each with the per-vehicle ghost path (Gram/direct norms per
layer, `fedfsd.privacy.ghost_conv`) and the vmap reference, on CPU and on CUDA when present.

Timing: all variants of one (device, model, batch) are built in one process and timed in
interleaved blocks; each variant's time is the minimum block mean, so variants see the same
machine load (these boxes are shared) and the ratio is fair. CPU time (process time of this
one-threaded process) is reported beside wall time: it does not count time the process spent
waiting for a core, so its ratio is the steadier one on a loaded machine. Memory: each variant
runs in its own subprocess, so peak memory (VmHWM on CPU, max_memory_allocated on CUDA) is its
own.

    .venv/bin/python experiments/bench_dp_step.py [--quick] [--threads 1] [--models bev_cnn]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPEATS = 5
K = 8
VARIANTS = {  # model -> [(mode, method)]
    "mlp": [("non-private", "auto"), ("dp", "ghost"), ("dp", "vmap")],
    "bev_cnn": [("non-private", "auto"), ("dp", "ghost"), ("dp", "vmap")],
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _setup(
    model_name: str, mode: str, method: str, device: str, b: int, bev_repeat: int = 1
) -> tuple[Any, ...]:
    """A trainer for one variant, its fleet and the fixed batch of vehicles it steps on.

    `bev_repeat` r blows the 16 × 32 test rasters up to 16r × 32r (pixel repetition), e.g. 3 for
    48 × 96, close to the 48 × 128 rasters of real fleet logs.
    """
    import numpy as np

    from fedfsd.config import DPParams
    from fedfsd.data.testing import make_synthetic_frames
    from fedfsd.models import build_model
    from fedfsd.privacy.dpsgd import VehicleDPSGD

    bev = model_name == "bev_cnn"
    frames = make_synthetic_frames(4 * b, 2 * K, seed=0, with_bev=bev)
    if bev and bev_repeat > 1:
        frames.bev = frames.bev.repeat(bev_repeat, axis=2).repeat(bev_repeat, axis=3)
    kw = {"in_channels": frames.bev.shape[1]} if bev else {}
    model = build_model(model_name, frames.features.shape[1], frames.labels.shape[1], **kw)
    params = DPParams(
        noise_multiplier=1.0, clip_norm=1.0, steps=1, vehicles_per_step=b,
        frames_per_vehicle=K, lr=0.01, update_norm_bound=10.0,
    )  # fmt: skip
    trainer = VehicleDPSGD(
        model, params, frames.n_vehicles, private=mode == "dp", method=method,  # type: ignore[arg-type]
        modality="bev" if bev else "objects", seed=0, device=device,
    )  # fmt: skip
    return trainer, frames, np.arange(b)  # the same fixed batch for every variant


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_group(
    model_name: str, device: str, b: int, steps: int, bev_repeat: int = 1
) -> dict[str, dict[str, float]]:
    """Wall and CPU ms/step of every variant of one model, timed in interleaved blocks (each the
    minimum block mean)."""
    setups = {
        f"{m}/{meth}": _setup(model_name, m, meth, device, b, bev_repeat)
        for m, meth in VARIANTS[model_name]
    }
    for tr, fr, idx in setups.values():  # warm-up
        for _ in range(2):
            tr.step_fixed_batch(fr, idx)
    best = {name: {"ms": math.inf, "cpu_ms": math.inf} for name in setups}
    for _ in range(REPEATS):
        for name, (tr, fr, idx) in setups.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                tr.step_fixed_batch(fr, idx)
            _sync(device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[name]["ms"] = min(best[name]["ms"], wall / steps * 1e3)
            best[name]["cpu_ms"] = min(best[name]["cpu_ms"], cpu / steps * 1e3)
    return best


def peak_memory(
    model_name: str, mode: str, method: str, device: str, b: int, bev_repeat: int = 1
) -> float:
    """Peak extra MiB of a few steps of one variant (run alone in this process)."""
    import torch

    tr, fr, idx = _setup(model_name, mode, method, device, b, bev_repeat)
    tr.step_fixed_batch(fr, idx)
    _sync(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
    for _ in range(3):
        tr.step_fixed_batch(fr, idx)
    _sync(device)
    peak = torch.cuda.max_memory_allocated() - base if cuda else _rss_kib("VmHWM") * 1024 - base
    return max(peak, 0) / 2**20


def _child(kind: str, cfg: dict, threads: int) -> Any:
    out = subprocess.run(
        [sys.executable, __file__, f"--child-{kind}", json.dumps(cfg), "--threads", str(threads)],
        capture_output=True, text=True, check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and batch sizes")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument(
        "--out",
        default="experiments/out/bench_dp_step",
        help="directory for dp_step.json (the table) and dp_step.png (the ratio plot)",
    )
    ap.add_argument("--json", help="also write the rows as JSON at this exact path")
    ap.add_argument(
        "--models",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {', '.join(VARIANTS)}",
    )
    ap.add_argument(
        "--bev-repeat",
        type=int,
        default=1,
        help="BEV rasters 16r × 32r instead of 16 × 32 (3: 48 × 96, near real 48 × 128)",
    )
    ap.add_argument("--batches", help="comma-separated vehicles per step (default 64,256)")
    ap.add_argument("--child-time", help=argparse.SUPPRESS)
    ap.add_argument("--child-mem", help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    if a.child_time:
        print(json.dumps(time_group(**json.loads(a.child_time))))
        return
    if a.child_mem:
        print(json.dumps(peak_memory(**json.loads(a.child_mem))))
        return

    models = [m for m in a.models.split(",") if m]
    if unknown := sorted(set(models) - set(VARIANTS)):
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(VARIANTS)}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    batches = [64] if a.quick else [64, 256]
    if a.batches:
        batches = [int(v) for v in a.batches.split(",")]
    rep = max(1, a.bev_repeat)
    rows = []
    for device in devices:
        for b in batches:
            for model_name in models:
                variants = VARIANTS[model_name]
                steps = (4 if a.quick else 10) if model_name == "mlp" else (1 if a.quick else 3)
                steps *= 5 if device == "cuda" else 1
                ms = _child(
                    "time",
                    dict(model_name=model_name, device=device, b=b, steps=steps, bev_repeat=rep),
                    a.threads,
                )
                for mode, method in variants:
                    cfg = dict(model_name=model_name, mode=mode, method=method, device=device, b=b,
                               bev_repeat=rep)  # fmt: skip
                    mem = _child("mem", cfg, a.threads)
                    t, base = ms[f"{mode}/{method}"], ms[f"non-private/{variants[0][1]}"]
                    rows.append(dict(device=device, model=model_name, b=b, mode=mode,
                                     method=method if mode == "dp" else "-", ms=t["ms"],
                                     cpu_ms=t["cpu_ms"], peak_mib=mem,
                                     ratio=t["ms"] / base["ms"],
                                     cpu_ratio=t["cpu_ms"] / base["cpu_ms"]))  # fmt: skip
    print(
        f"vehicle-level DP-SGD step vs non-private (K = {K} frames/vehicle, "
        f"{a.threads} CPU thread(s), BEV {16 * rep} × {32 * rep}, torch {torch.__version__})"
    )
    print(
        "| device | model | vehicles/step | mode | method | ms/step | CPU ms/step | "
        "peak extra MiB | ratio | CPU ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['device']} | {r['model']} | {r['b']} | {r['mode']} | {r['method']} | "
            f"{r['ms']:.2f} | {r['cpu_ms']:.2f} | {r['peak_mib']:.1f} | {r['ratio']:.2f}× | "
            f"{r['cpu_ratio']:.2f}× |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dp_step.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, out / "dp_step.png")
    print(f"wrote {out / 'dp_step.json'} and {out / 'dp_step.png'}")


def _plot(rows: list[dict], path: Path) -> None:
    """Bar chart of DP ÷ non-private step time per model, method and batch (1.5× target line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [r for r in rows if r["mode"] == "dp"]
    labels = [f"{r['device']} {r['model']}\n{r['method']} B={r['b']}" for r in dp]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(dp)), 4))
    ax.bar(range(len(dp)), [r["ratio"] for r in dp], color="tab:blue")
    ax.axhline(1.5, color="tab:red", linestyle="--", label="target 1.5×")
    ax.set_xticks(range(len(dp)), labels, fontsize=7)
    ax.set_ylabel("DP step ÷ non-private step")
    ax.set_title("vehicle-level DP-SGD step cost")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
