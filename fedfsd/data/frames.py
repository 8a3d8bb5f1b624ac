"""What the training side reads from a fleet's frames, as a type the checker can hold it to.

Why: the DP trainer, evaluation, fine-tuning and model selection take a region's frames from
the loader (`fedfsd.data.vehicles.load_vehicle_frames`) or the synthetic fleet
(`fedfsd.data.testing.make_synthetic_frames`); both return `VehicleFrames`. The core code is
typed against this protocol (the attributes and methods it uses), not against `Any`, so mypy
checks every call site and the dataclass is held to the same contract (docs/contracts.md).
The name `VehicleFrames` is the dataclass's; the protocol is `VehicleFramesLike`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from fedfsd.data.vehicles import VehicleFrames


class VehicleFramesLike(Protocol):
    """One region's frames grouped by vehicle: rows ``offsets[v]:offsets[v+1]`` are vehicle v's."""

    region: str
    fleet_id: str
    features: np.ndarray  # [N, F] float32
    labels: np.ndarray  # [N, L] float32
    offsets: np.ndarray  # [V+1] int64
    vehicle_ids: list[str]  # [V]
    manifest: dict[str, Any]  # the dataset's manifest.json ({} for a synthetic fleet)

    @property
    def n_vehicles(self) -> int: ...

    @property
    def n_frames(self) -> int: ...

    def frames_per_vehicle(self) -> np.ndarray: ...

    def sample(
        self,
        vehicle_idx: np.ndarray,
        k: int,
        rng: np.random.Generator,
        modality: str = "objects",
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x [B, K, ...], y [B, K, L], mask [B, K]: at most k frames of each listed vehicle."""
        ...

    def sample_rows(self, vehicle_idx: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """The frame rows `sample` reads: [B, K] int64, -1 for padding (same draws from rng)."""
        ...

    def gather_rows(
        self, rows: np.ndarray, modality: str = "objects"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y, mask for frame rows [B, K] as `sample` returns them."""
        ...

    def all_frames(self, modality: str = "objects") -> tuple[np.ndarray, np.ndarray]:
        """Every frame for evaluation: x [N, ...], y [N, L]."""
        ...


if TYPE_CHECKING:

    def _the_dataclass_conforms(frames: VehicleFrames) -> VehicleFramesLike:
        return frames  # mypy fails here if VehicleFrames drifts from the protocol
