"""Validated dataset directory -> per-vehicle `VehicleFrames` for one episode-level split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedfsd.data.featurize import featurize_episode
from fedfsd.data.splits import (
    SPLITS,
    TEST_FRACTION,
    EpisodeSplit,
    NoValidationSplit,
    split_episodes,
)
from fedfsd.data.splits import test_episodes as test_episodes
from fedfsd.data.validate import DatasetError, read_validated
from fedfsd.data.vehicles import VehicleFrames

__all__ = ["SPLITS", "TEST_FRACTION", "load_frames", "load_with_split", "test_episodes"]


def load_frames(root: Path, split: str = "train") -> VehicleFrames:
    """Validate `root` and featurise the episodes of one split."""
    return load_with_split(root, split)[0]


def load_with_split(root: Path, split: str = "all") -> tuple[VehicleFrames, EpisodeSplit]:
    """Frames of one split, plus which episodes make up every split of this dataset."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest, tables = read_validated(root)
    all_eps = np.concatenate([np.unique(t["episode"]) for t in tables])
    assignment = split_episodes(manifest, all_eps)
    try:
        wanted = set(assignment.episodes(split).tolist())
    except NoValidationSplit as err:
        raise DatasetError(f"{root}: {err}") from None
    if not wanted:
        raise DatasetError(
            f"{root}: split {split!r} has no episodes ({len(np.unique(all_eps))} episodes in "
            "the dataset; a 'val' split needs at least 3)"
        )
    with_bev = bool(manifest.get("with_bev", False))
    parts = []
    for cols in tables:
        for ep in np.unique(cols["episode"]):
            if int(ep) not in wanted:
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
    out = VehicleFrames(
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
    return out, assignment
