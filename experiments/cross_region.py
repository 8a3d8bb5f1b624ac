"""Do regions really differ? Train a small non-private MLP per region, test it on every region.

    .venv/bin/python experiments/cross_region.py --quick
    .venv/bin/python experiments/cross_region.py --data .fedfsd/xregion   # reuses datasets

Each model is a 2×128 MLP (AdamW, no privacy) that learns the residual over constant-velocity
extrapolation. Prints the matrix of final displacement error at 3 s (metres; test split =
held-out episodes) for train region × test region, and each entry's ratio to the test region's
own model. A model pooled over all regions and a constant-velocity baseline are extra rows.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table


def fde3(pred: np.ndarray, y: np.ndarray) -> float:
    from fedfsd.data.feature_spec import LABEL_NAMES

    i, j = LABEL_NAMES.index("dx_3s"), LABEL_NAMES.index("dy_3s")
    return float(np.mean(np.hypot(pred[:, i] - y[:, i], pred[:, j] - y[:, j])))


def train_mlp(x: np.ndarray, y: np.ndarray, steps: int, seed: int):
    """Plain Adam MLP on fixed-scale targets, learning the residual over constant velocity
    (so it starts from a sane physical prior); returns predict(x) -> labels in physical units."""
    import torch

    from fedfsd.data.feature_spec import LABEL_SCALES

    torch.manual_seed(seed)
    scale = torch.tensor(LABEL_SCALES, dtype=torch.float32)
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, y.shape[1]),
    )
    torch.nn.init.zeros_(net[-1].weight)  # start exactly at constant velocity
    torch.nn.init.zeros_(net[-1].bias)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-3)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y - constant_velocity(x)) / scale
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (256,), generator=gen)
        loss = torch.nn.functional.mse_loss(net(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def predict(xe: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (net(torch.from_numpy(xe)) * scale).numpy() + constant_velocity(xe)

    return predict


def constant_velocity(x: np.ndarray) -> np.ndarray:
    from fedfsd.data.feature_spec import constant_velocity_labels

    return constant_velocity_labels(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="60 vehicles, 6 episodes, 2000 steps")
    ap.add_argument("--regions", nargs="+", default=["cn", "eu", "us", "jp"])
    ap.add_argument("--vehicles", type=int, default=None)
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--data", type=Path, default=None, help="cache dir (reused if present)")
    a = ap.parse_args()
    vehicles = a.vehicles or (60 if a.quick else 200)
    episodes = a.episodes or (6 if a.quick else 20)
    steps = a.steps or (2000 if a.quick else 4000)

    import torch

    from fedfsd.data.generate import generate_dataset
    from fedfsd.data.vehicles import load_vehicle_frames

    torch.set_num_threads(1)
    root = a.data or Path(tempfile.mkdtemp(prefix="fedfsd-xregion-"))
    con = Console(width=150)
    data = {}
    for k, r in enumerate(a.regions):
        path = root / r
        if not (path / "manifest.json").exists():
            generate_dataset(r, vehicles, episodes, a.seed + k, path, workers=a.workers)
        tr, te = load_vehicle_frames(path, "train"), load_vehicle_frames(path, "test")
        data[r] = (tr.all_frames(), te.all_frames())
        con.print(
            f"{r}: train {tr.n_frames} frames / {tr.n_vehicles} vehicles, "
            f"test {te.n_frames} frames",
            highlight=False,
        )
    models = {r: train_mlp(*data[r][0], steps, a.seed) for r in a.regions}
    pooled_x = np.concatenate([data[r][0][0] for r in a.regions])
    pooled_y = np.concatenate([data[r][0][1] for r in a.regions])
    models["pooled"] = train_mlp(pooled_x, pooled_y, steps, a.seed)
    err = {(m, r): fde3(models[m](data[r][1][0]), data[r][1][1]) for m in models for r in a.regions}
    for r in a.regions:
        err[("const-vel", r)] = fde3(constant_velocity(data[r][1][0]), data[r][1][1])
    t = Table(
        "train \\ test",
        *a.regions,
        title="FDE at 3 s, metres (× own-region model), test = held-out episodes",
    )
    for m in [*a.regions, "pooled", "const-vel"]:
        t.add_row(m, *[f"{err[(m, r)]:.2f} (×{err[(m, r)] / err[(r, r)]:.1f})" for r in a.regions])
    con.print(t)
    off = [err[(m, r)] / err[(r, r)] for m in a.regions for r in a.regions if m != r]
    con.print(
        f"other-region model vs own: median ×{np.median(off):.1f}, "
        f"range ×{min(off):.1f}–×{max(off):.1f}",
        highlight=False,
    )


if __name__ == "__main__":
    main()
