"""Validated dataset directory -> per-vehicle `VehicleFrames` for one episode-level split.

Streams file by file so that a 100,000-vehicle region loads in bounded memory: a first pass
validates every file and records its episodes (the split needs all of them), a second pass
featurises the wanted episodes. Files of small datasets are kept from the first pass instead of
being read twice. Nothing is returned unless every file validated.
"""

from __future__ import annotations

from dataclasses import dataclass
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
from fedfsd.data.splits import pick_test_episodes as pick_test_episodes
from fedfsd.data.validate import DatasetError, _read_checked, iter_validated, read_manifest
from fedfsd.data.vehicles import VehicleFrames

__all__ = ["SPLITS", "TEST_FRACTION", "load_frames", "load_with_split", "pick_test_episodes"]

# Track rows kept in memory between the two passes (~0.2 kB each); larger datasets re-read.
KEEP_ROWS = 2_000_000


def load_frames(root: Path, split: str = "train") -> VehicleFrames:
    """Validate `root` and featurise the episodes of one split."""
    return load_with_split(root, split)[0]


def load_with_split(root: Path, split: str = "all") -> tuple[VehicleFrames, EpisodeSplit]:
    """Frames of one split, plus which episodes make up every split of this dataset."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    manifest = read_manifest(root)
    file_eps: list[np.ndarray] = []
    kept: dict[int, dict[str, np.ndarray]] = {}
    rows = 0
    for i, (_, cols) in enumerate(iter_validated(root, manifest)):
        file_eps.append(np.unique(cols["episode"]).astype(np.int64))
        rows += len(cols["episode"])
        if rows <= KEEP_ROWS:
            kept[i] = cols
        else:
            kept.clear()
    all_eps = np.concatenate(file_eps)
    assignment = split_episodes(manifest, all_eps)
    try:
        wanted = assignment.episodes(split)
    except NoValidationSplit as err:
        raise DatasetError(f"{root}: {err}") from None
    if not len(wanted):
        raise DatasetError(
            f"{root}: split {split!r} has no episodes ({len(np.unique(all_eps))} episodes in "
            "the dataset; a 'val' split needs at least 3)"
        )
    wanted_set = set(wanted.tolist())
    with_bev = bool(manifest.get("with_bev", False))
    parts: list[_Part] = []
    codes: dict[str, int] = {}
    for i, entry in enumerate(manifest["files"]):
        if not np.isin(file_eps[i], wanted).any():
            continue
        cols = kept.pop(i) if i in kept else _read_checked(root, entry)
        for ep in file_eps[i]:
            if int(ep) not in wanted_set:
                continue
            sel = (
                cols
                if len(file_eps[i]) == 1
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
            parts.append(_Part.of(int(ep), ef, bev, codes))
    if not parts or sum(len(p.frames) for p in parts) == 0:
        raise DatasetError(f"{root}: split {split!r} has no usable frames")
    return _assemble(manifest, parts, codes), assignment


@dataclass
class _Part:
    """One featurised episode, reduced to what the assembly needs (vehicle ids as int codes)."""

    episode: int
    features: np.ndarray
    labels: np.ndarray
    frames: np.ndarray
    vcode: np.ndarray
    bev: np.ndarray | None

    @classmethod
    def of(cls, ep: int, ef, bev, codes: dict[str, int]) -> _Part:  # noqa: ANN001
        uniq, inv = np.unique(ef.vehicle_ids, return_inverse=True)
        local = np.array([codes.setdefault(str(u), len(codes)) for u in uniq], dtype=np.int64)
        vcode = local[inv] if len(inv) else np.zeros(0, dtype=np.int64)
        return cls(ep, ef.features, ef.labels, ef.frames, vcode, bev)


def _assemble(manifest: dict, parts: list[_Part], codes: dict[str, int]) -> VehicleFrames:
    """Concatenate per-episode frames and group them by vehicle (then episode, frame).

    Vehicle ids are coded as integers ranked like the id strings, so the grouping is the same
    as sorting the strings but costs one small string sort instead of one per frame. Each part
    is written straight to its sorted rows and released, so the peak is about one copy of the
    frames, not three.
    """
    names = list(codes)
    by_name = np.argsort(np.array(names, dtype=object), kind="stable")
    rank = np.empty(len(names), dtype=np.int64)
    rank[by_name] = np.arange(len(names))
    vr = rank[np.concatenate([p.vcode for p in parts])]
    eps = np.concatenate([np.full(len(p.frames), p.episode, dtype=np.int64) for p in parts])
    frames = np.concatenate([p.frames for p in parts])
    order = np.lexsort((frames, eps, vr))
    del frames
    dest = np.empty_like(order)
    dest[order] = np.arange(len(order))
    n = len(order)
    first = parts[0]
    feats = np.empty((n, first.features.shape[1]), dtype=np.float32)
    labels = np.empty((n, first.labels.shape[1]), dtype=np.float32)
    bev = np.empty((n, *first.bev.shape[1:]), first.bev.dtype) if first.bev is not None else None
    lo = 0
    parts.reverse()  # pop from the end = the original order
    while parts:
        p = parts.pop()
        rows = dest[lo : lo + len(p.frames)]
        feats[rows] = p.features
        labels[rows] = p.labels
        if bev is not None:
            bev[rows] = p.bev
        lo += len(p.frames)
    vr = vr[order]
    present, starts = np.unique(vr, return_index=True)
    return VehicleFrames(
        region=str(manifest["region"]),
        features=feats,
        labels=labels,
        offsets=np.append(starts, n).astype(np.int64),
        vehicle_ids=[names[by_name[r]] for r in present],
        episodes=eps[order],
        bev=bev,
        fleet_id=str(manifest["fleet_id"]),
        manifest=manifest,
    )
