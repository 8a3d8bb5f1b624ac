"""Per-vehicle frame sets: the vehicle, not the frame, is the unit of privacy.

Rows are grouped by vehicle (`offsets`), so a DP trainer can Poisson-sample vehicles and draw at
most K frames from each one (`sample`), bounding every vehicle's contribution to a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODALITIES = ("objects", "bev")


@dataclass
class VehicleFrames:
    """All frames of one region's fleet, grouped by vehicle (see docs/contracts.md)."""

    region: str
    features: np.ndarray  # [N, F] float32
    labels: np.ndarray  # [N, L] float32
    offsets: np.ndarray  # [V+1] int64
    vehicle_ids: list[str]
    episodes: np.ndarray  # [N] int64
    bev: np.ndarray | None = None  # [N, C, H, W] uint8
    fleet_id: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = np.ascontiguousarray(self.features, dtype=np.float32)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.float32)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.episodes = np.asarray(self.episodes, dtype=np.int64)
        n = self.features.shape[0]
        if self.features.ndim != 2 or self.labels.ndim != 2 or self.labels.shape[0] != n:
            raise ValueError("features [N, F] and labels [N, L] must have the same N")
        if self.episodes.shape != (n,):
            raise ValueError("episodes must be [N]")
        if self.offsets.ndim != 1 or len(self.offsets) != len(self.vehicle_ids) + 1:
            raise ValueError("offsets must be [V+1] for V vehicle_ids")
        if self.offsets[0] != 0 or self.offsets[-1] != n or np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must start at 0, end at N and be non-decreasing")
        if self.bev is not None and self.bev.shape[0] != n:
            raise ValueError("bev must be [N, C, H, W]")

    @property
    def n_vehicles(self) -> int:
        return len(self.vehicle_ids)

    @property
    def n_frames(self) -> int:
        return int(self.features.shape[0])

    def frames_per_vehicle(self) -> np.ndarray:
        """[V] number of frames each vehicle owns."""
        return np.diff(self.offsets)

    def select_episodes(self, episodes: np.ndarray | list[int]) -> VehicleFrames:
        """The frames of the listed episodes only (vehicles without any such frame dropped)."""
        keep = np.isin(self.episodes, np.asarray(episodes, dtype=np.int64))
        cum = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        counts = cum[self.offsets[1:]] - cum[self.offsets[:-1]]
        has = counts > 0
        return VehicleFrames(
            region=self.region,
            features=self.features[keep],
            labels=self.labels[keep],
            offsets=np.concatenate([[0], np.cumsum(counts[has])]),
            vehicle_ids=[v for v, h in zip(self.vehicle_ids, has, strict=True) if h],
            episodes=self.episodes[keep],
            bev=self.bev[keep] if self.bev is not None else None,
            fleet_id=self.fleet_id,
            manifest=self.manifest,
        )

    def _inputs(self, modality: str) -> np.ndarray:
        if modality == "objects":
            return self.features
        if modality == "bev":
            if self.bev is None:
                raise ValueError("this dataset has no BEV rasters (generate it --with-bev)")
            return self.bev
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")

    def sample(
        self,
        vehicle_idx: np.ndarray,
        k: int,
        rng: np.random.Generator,
        modality: str = "objects",
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw ≤ k frames (without replacement) from each listed vehicle.

        Returns x [B, K, F] (or [B, K, C, H, W] float32 in [0, 1] for "bev"), y [B, K, L] and a
        mask [B, K] that is True on real frames; padding rows are zero.
        """
        return self.gather_rows(self.sample_rows(vehicle_idx, k, rng), modality)

    def sample_rows(self, vehicle_idx: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """The frame rows `sample` would read: [B, K] int64, -1 where a vehicle has < k frames.

        Split from `sample` so that one process can draw the rows (from the offsets alone) and
        other processes read only the rows of their own vehicles (fedfsd.privacy.distributed).
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        idx = np.asarray(vehicle_idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_vehicles):
            raise IndexError("vehicle index out of range")
        rows = np.full((idx.size, k), -1, dtype=np.int64)
        for row, v in enumerate(idx):
            lo, hi = int(self.offsets[v]), int(self.offsets[v + 1])
            n = hi - lo
            if n == 0:
                continue
            take = min(k, n)
            rows[row, :take] = lo + (
                rng.choice(n, size=take, replace=False) if n > take else np.arange(n)
            )
        return rows

    def gather_rows(
        self, rows: np.ndarray, modality: str = "objects"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y, mask for frame rows [B, K] (-1 = padding), as `sample` returns them."""
        src = self._inputs(modality)
        rows = np.asarray(rows, dtype=np.int64)
        b, k = rows.shape
        x = np.zeros((b, k, *src.shape[1:]), dtype=np.float32)
        y = np.zeros((b, k, self.labels.shape[1]), dtype=np.float32)
        mask = rows >= 0
        if mask.any():
            x[mask] = src[rows[mask]]
            y[mask] = self.labels[rows[mask]]
        if modality == "bev":
            x /= 255.0
        return x, y, mask

    def all_frames(self, modality: str = "objects") -> tuple[np.ndarray, np.ndarray]:
        """Every frame for evaluation: x [N, F] (or [N, C, H, W] float32 in [0, 1]), y [N, L]."""
        src = self._inputs(modality)
        if modality == "bev":
            return src.astype(np.float32) / 255.0, self.labels
        return src, self.labels


def load_vehicle_frames(path: str | Path, split: str = "train") -> VehicleFrames:
    """Validate a dataset directory, then build its per-vehicle frames for one split.

    `split` is "train", "val", "test" or "all"; the split is by episode (seeded from the
    manifest), never by frame, and "train" excludes val and test. A dataset generated before
    validation splits keeps its old train/test episodes and refuses "val" with a DatasetError.
    Validation runs first and raises `DatasetError`, so a bad dataset is never half-loaded.
    """
    from fedfsd.data.loader import load_frames

    return load_frames(Path(path), split=split)
