"""Scores a model on a region's held-out episodes, inside the region.

Only aggregate numbers come out. `evaluate_weights` gives exact frame means, for use INSIDE the
region (local baselines, experiments); what leaves goes through `per_vehicle_scores` and
`fedfsd.privacy.metrics` (each vehicle's mean clipped, noise added, ledgered). The metrics:
- loss: the training objective, mean squared error of scaled labels (fedfsd.privacy.objective);
- ade: mean over the 1/2/3 s horizons of the Euclidean (dx, dy) error, metres;
- fde: the Euclidean error at the last horizon (3 s), metres;
- accel_mae: mean absolute acceleration error, m/s².
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedfsd.data.frames import VehicleFramesLike

BATCH = 8192


def _label_layout(n_labels: int) -> tuple[list[tuple[int, int]], int]:
    """(dx, dy) column pairs per horizon and the accel column, from fedfsd.data.feature_spec."""
    from fedfsd.data.feature_spec import HORIZONS_S, LABEL_NAMES

    if n_labels != len(LABEL_NAMES):
        raise ValueError(f"dataset has {n_labels} labels, expected {len(LABEL_NAMES)}")
    col = {name: i for i, name in enumerate(LABEL_NAMES)}
    pairs = [(col[f"dx_{h}s"], col[f"dy_{h}s"]) for h in HORIZONS_S]
    return pairs, col["accel"]


def frame_errors(pred: np.ndarray, y: np.ndarray, scales: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame errors [N] of every metric (their frame means are `score_predictions`)."""
    pairs, acc = _label_layout(y.shape[1])
    pred64, y64 = pred.astype(np.float64), y.astype(np.float64)
    dists = np.stack(
        [np.hypot(pred64[:, i] - y64[:, i], pred64[:, j] - y64[:, j]) for i, j in pairs], axis=1
    ).reshape(len(y), len(pairs))
    return {
        "loss": np.mean(((pred64 - y64) / scales) ** 2, axis=1),
        "ade": dists.mean(axis=1),
        "fde": dists[:, -1],
        "accel_mae": np.abs(pred64[:, acc] - y64[:, acc]),
    }


def score_predictions(pred: np.ndarray, y: np.ndarray, scales: np.ndarray) -> dict[str, float]:
    """Metrics from physical-unit predictions and labels, both [N, L]."""
    pairs, acc = _label_layout(y.shape[1])
    pred64, y64 = pred.astype(np.float64), y.astype(np.float64)
    loss = float(np.mean(((pred64 - y64) / scales) ** 2)) if len(y) else float("nan")
    dists = np.stack(
        [np.hypot(pred64[:, i] - y64[:, i], pred64[:, j] - y64[:, j]) for i, j in pairs], axis=1
    )
    return {
        "loss": loss,
        "ade": float(dists.mean()) if len(y) else float("nan"),
        "fde": float(dists[:, -1].mean()) if len(y) else float("nan"),
        "accel_mae": float(np.abs(pred64[:, acc] - y64[:, acc]).mean()) if len(y) else float("nan"),
    }


def evaluate_weights(
    frames: VehicleFramesLike, weights: Mapping[str, np.ndarray], model_name: str
) -> dict[str, float]:
    """Load `weights` into a fresh `model_name` model and score it on every frame of `frames`."""
    from fedfsd.data.feature_spec import LABEL_SCALES

    pred, y = predict_frames(frames, weights, model_name)
    return score_predictions(pred, y, np.asarray(LABEL_SCALES, dtype=np.float64))


def per_vehicle_scores(
    frames: VehicleFramesLike, weights: Mapping[str, np.ndarray], model_name: str
) -> dict[str, np.ndarray]:
    """Each vehicle's mean error over its own frames, per metric: {metric: [V]}.

    The vehicle, not the frame, is the unit of privacy: a vehicle's contribution to a released
    metric is one number per metric, whatever its number of frames (vehicles without frames: 0).
    """
    from fedfsd.data.feature_spec import LABEL_SCALES

    pred, y = predict_frames(frames, weights, model_name)
    errs = frame_errors(pred, y, np.asarray(LABEL_SCALES, dtype=np.float64))
    counts = np.diff(frames.offsets)
    owner = np.repeat(np.arange(len(counts)), counts)
    out = {}
    for k, e in errs.items():
        sums = np.bincount(owner, weights=e, minlength=len(counts))
        out[k] = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return out


def predict_frames(
    frames: VehicleFramesLike, weights: Mapping[str, np.ndarray], model_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Physical-unit predictions and labels, both [N, L], for every frame of `frames`."""
    import torch

    from fedfsd.models import build_model, set_weights
    from fedfsd.privacy.objective import model_kwargs, predict_physical

    bev = model_name == "bev_cnn"
    kw = model_kwargs(frames, model_name)
    model = build_model(model_name, frames.features.shape[1], frames.labels.shape[1], **kw)
    set_weights(model, dict(weights))
    model.eval()
    x, y = frames.all_frames("bev" if bev else "objects")
    preds = []
    with torch.no_grad():
        for i in range(0, len(x), BATCH):
            preds.append(predict_physical(model, torch.from_numpy(np.asarray(x[i : i + BATCH]))))
    pred = torch.cat(preds).numpy() if preds else np.zeros_like(y)
    return pred, np.asarray(y)
