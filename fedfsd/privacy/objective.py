"""The training objective: one loss per vehicle, over at most K of its frames.

Models predict labels divided by the fixed `LABEL_SCALES` (so every target is O(1) in every
region); `predict_physical` turns outputs back into metres and m/s^2 for metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedfsd.data.frames import VehicleFramesLike


def label_scales(device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed per-label scales from `fedfsd.data.feature_spec`, as a tensor."""
    import torch

    from fedfsd.data.feature_spec import LABEL_SCALES

    return torch.tensor(LABEL_SCALES, dtype=torch.float32, device=device)


def forward_frames(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a per-frame model to [B, K, *frame] input, giving [B, K, L]."""
    b, k = x.shape[:2]
    return model(x.reshape(b * k, *x.shape[2:])).reshape(b, k, -1)


def per_vehicle_loss(
    pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """[B] masked mean over a vehicle's frames of the scaled squared error.

    A vehicle's loss is a mean over its own (≤ K) frames, so its gradient does not grow with
    the number of frames it has; clipping then bounds it to C regardless.
    """
    err = ((pred - y / scales) ** 2).mean(-1)  # [B, K]
    m = mask.to(err.dtype)
    return (err * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def predict_physical(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Model outputs for [N, *frame] input in physical units (metres, m/s^2)."""
    out = model(x)
    return out * label_scales(out.device)


def model_kwargs(frames: VehicleFramesLike, model_name: str) -> dict[str, object]:
    """Region-side build arguments that depend on the data: BEV channels, or the MLP's prior.

    The object-list MLP starts from constant-velocity extrapolation of the ego
    (`fedfsd.data.feature_spec.constant_velocity_labels`, linear in the features), expressed in the
    model's output units (labels / LABEL_SCALES).
    """
    import numpy as np

    if model_name == "bev_cnn":
        bev = getattr(frames, "bev", None)
        return {"in_channels": int(bev.shape[1])} if bev is not None else {}
    if model_name != "mlp":
        return {}
    from fedfsd.data.feature_spec import FEATURE_NAMES, LABEL_SCALES, constant_velocity_labels

    n_features = int(frames.features.shape[1])
    if n_features != len(FEATURE_NAMES):
        return {}  # not the object-list schema (synthetic test data): no physical prior
    eye = np.eye(n_features, dtype=np.float32)
    prior = constant_velocity_labels(eye) / np.asarray(LABEL_SCALES, dtype=np.float32)
    return {"prior": prior.astype(np.float32)}
