"""Validated dataset directory -> per-vehicle `VehicleFrames` for one episode-level split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedfsd.data.featurize import featurize_episode
from fedfsd.data.validate import DatasetError, read_validated
from fedfsd.data.vehicles import VehicleFrames

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2


def test_episodes(episodes: np.ndarray, seed: int, fraction: float = TEST_FRACTION) -> np.ndarray:
    """The episodes held out for testing: a seeded choice of whole episodes (never frames)."""
    eps = np.unique(episodes)
    if len(eps) < 2:
        return np.array([], dtype=np.int64)
    n_test = max(1, int(round(fraction * len(eps))))
    rng = np.random.default_rng([int(seed), 4])
    return np.sort(rng.choice(eps, size=n_test, replace=False))


def load_frames(root: Path, split: str = "train") -> VehicleFrames:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest, tables = read_validated(root)
    split_cfg = manifest.get("split", {})
    seed = int(split_cfg.get("seed", manifest["seed"]))
    frac = float(split_cfg.get("test_fraction", TEST_FRACTION))
    all_eps = np.concatenate([np.unique(t["episode"]) for t in tables])
    held_out = test_episodes(all_eps, seed, frac)
    with_bev = bool(manifest.get("with_bev", False))
    parts = []
    for cols in tables:
        for ep in np.unique(cols["episode"]):
            in_test = ep in held_out
            if (split == "train" and in_test) or (split == "test" and not in_test):
                continue
            sel = (
                cols
                if len(np.unique(cols["episode"])) == 1
                else {k: v[cols["episode"] == ep] for k, v in cols.items()}
            )
            ef = featurize_episode(
                sel,
                manifest["log_hz"],
                float(manifest["warmup_s"]),
                int(manifest["seed"]),
                manifest.get("profile"),
            )
            bev = None
            if with_bev:
                from fedfsd.data.bev import render_bev

                bev = render_bev(sel, ef.ego_rows, ef.past_rows, manifest["log_hz"])
            parts.append((int(ep), ef, bev))
    if not parts or sum(len(p[1].frames) for p in parts) == 0:
        raise DatasetError(f"{root}: split {split!r} has no usable frames")
    feats = np.concatenate([p[1].features for p in parts])
    labels = np.concatenate([p[1].labels for p in parts])
    vids = np.concatenate([p[1].vehicle_ids for p in parts])
    eps = np.concatenate([np.full(len(p[1].frames), p[0], dtype=np.int64) for p in parts])
    frames = np.concatenate([p[1].frames for p in parts])
    bev = np.concatenate([p[2] for p in parts]) if with_bev else None
    # Group rows by vehicle (then episode, frame) so offsets delimit each vehicle's frames.
    order = np.lexsort((frames, eps, vids))
    vids = vids[order]
    uniq, starts = np.unique(vids, return_index=True)
    offsets = np.append(starts, len(vids)).astype(np.int64)
    return VehicleFrames(
        region=str(manifest["region"]),
        features=feats[order],
        labels=labels[order],
        offsets=offsets,
        vehicle_ids=[str(u) for u in uniq],
        episodes=eps[order],
        bev=bev[order] if bev is not None else None,
        fleet_id=str(manifest["fleet_id"]),
        manifest=manifest,
    )
