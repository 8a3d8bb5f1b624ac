"""Benchmark: vehicle-level DP-SGD step vs the non-private step of the same model and batch.

Prints a table (time per step, peak extra memory, ratio to non-private) for the object-list MLP
(ghost-norm path, and the vmap fallback for comparison) and the BEV CNN (vmap path), on CPU and
on CUDA when present. Every configuration runs in its own subprocess so that peak memory
(VmHWM on CPU, max_memory_allocated on CUDA) belongs to that configuration alone.

    .venv/bin/python experiments/bench_dp_step.py [--quick] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = [  # (model, mode, method)
    ("mlp", "non-private", "auto"),
    ("mlp", "dp", "ghost"),
    ("mlp", "dp", "vmap"),
    ("bev_cnn", "non-private", "auto"),
    ("bev_cnn", "dp", "vmap"),
]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def run_one(
    model_name: str, mode: str, method: str, device: str, b: int, k: int, steps: int
) -> dict:
    """Time `steps` steps of one configuration (in this process) after a warm-up."""
    import numpy as np
    import torch

    from fedfsd.config import DPParams
    from fedfsd.data.testing import make_synthetic_frames
    from fedfsd.models import build_model
    from fedfsd.privacy.dpsgd import VehicleDPSGD

    bev = model_name == "bev_cnn"
    frames = make_synthetic_frames(4 * b, 2 * k, seed=0, with_bev=bev)
    kw = {"in_channels": frames.bev.shape[1]} if bev else {}
    model = build_model(model_name, frames.features.shape[1], frames.labels.shape[1], **kw)
    params = DPParams(
        noise_multiplier=1.0,
        clip_norm=1.0,
        steps=steps,
        vehicles_per_step=b,
        frames_per_vehicle=k,
        lr=0.01,
        update_norm_bound=10.0,
    )
    trainer = VehicleDPSGD(
        model,
        params,
        frames.n_vehicles,
        private=mode == "dp",
        method=method,
        modality="bev" if bev else "objects",
        seed=0,
        device=device,
    )
    idx = np.arange(b)  # the same fixed batch for every variant
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        trainer.step(frames, idx)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(frames, idx)
    sync()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() - base if cuda else _rss_kib("VmHWM") * 1024 - base
    return {"ms": dt * 1e3, "peak_mib": max(peak, 0) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and batch sizes")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        cfg = json.loads(a.child)
        print(json.dumps(run_one(**cfg)))
        return

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    batches = [64] if a.quick else [64, 256]
    k = 8
    rows = []
    for device in devices:
        for b in batches:
            for model_name, mode, method in VARIANTS:
                steps = (10 if a.quick else 30) if model_name == "mlp" else (3 if a.quick else 10)
                if device == "cuda":
                    steps *= 5
                cfg = dict(
                    model_name=model_name,
                    mode=mode,
                    method=method,
                    device=device,
                    b=b,
                    k=k,
                    steps=steps,
                )
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        json.dumps(cfg),
                        "--threads",
                        str(a.threads),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ, "OMP_NUM_THREADS": str(a.threads)},
                )
                res = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({**cfg, **res})
    base = {
        (r["device"], r["b"], r["model_name"]): r["ms"] for r in rows if r["mode"] == "non-private"
    }
    print(
        f"vehicle-level DP-SGD step vs non-private (K = {k} frames/vehicle, "
        f"{a.threads} CPU thread(s), torch {torch.__version__})"
    )
    print("| device | model | vehicles/step | mode | method | ms/step | peak extra MiB | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["ms"] / base[(r["device"], r["b"], r["model_name"])]
        r["ratio"] = ratio
        method = r["method"] if r["mode"] == "dp" else "-"
        print(
            f"| {r['device']} | {r['model_name']} | {r['b']} | {r['mode']} | {method} | "
            f"{r['ms']:.2f} | {r['peak_mib']:.1f} | {ratio:.2f}× |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
