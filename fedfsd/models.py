"""Model registry: the object-list MLP (default) and the bird's-eye-view CNN.

Both avoid BatchNorm (it mixes samples, which breaks per-vehicle clipping and Opacus). The MLP
is built from Linear layers and element-wise activations only, so the vehicle-level DP step can
use the fast Gram-matrix norm path (`fedfsd.privacy.dpsgd`); the CNN uses GroupNorm and the
per-vehicle ghost path for convolutions (`fedfsd.privacy.ghost_conv`).
Weights cross process and network borders as `dict[str, np.ndarray]`
float32 keyed by `state_dict` names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

MODEL_NAMES: tuple[str, ...] = ("mlp", "bev_cnn")


def _mlp(
    n_features: int,
    n_labels: int,
    hidden: int = 256,
    depth: int = 2,
    prior: np.ndarray | None = None,
) -> nn.Module:
    """F → hidden × depth → L with GELU, plus a fixed linear physics prior (see `PriorMLP`).

    The residual starts at exactly zero: the output Linear's weight and bias are zero, so a fresh
    model predicts `x @ prior` (the constant-velocity prior alone). Why: a random output layer
    adds ~2 m of FDE@3s that DP training must then remove through the noise (issue 18). Training
    still works: the first step moves the output layer (its gradient is g·hᵀ with the non-zero
    hidden activations h); hidden layers receive gradient through the output weights from the
    second step on.
    """
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    width = n_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.GELU()]
        width = hidden
    out = nn.Linear(width, n_labels)
    with torch.no_grad():
        out.weight.zero_()
        out.bias.zero_()
    layers.append(out)
    return _prior_mlp_class()(nn.Sequential(*layers), n_features, n_labels, prior)


def residual_output_names(weights: Mapping[str, np.ndarray]) -> tuple[str, str]:
    """`state_dict` names of the MLP residual's output Linear (weight, bias): the last `net.*`."""
    idx = sorted(
        {int(k.split(".")[1]) for k in weights if k.startswith("net.") and k.count(".") == 2}
    )
    if not idx or f"net.{idx[-1]}.weight" not in weights or f"net.{idx[-1]}.bias" not in weights:
        raise ValueError("weights are not an object-list MLP (no net.<i>.weight/bias layers)")
    return f"net.{idx[-1]}.weight", f"net.{idx[-1]}.bias"


def prior_only_weights(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A copy of MLP weights with the residual's output layer zeroed: the prior alone.

    With these weights `PriorMLP` predicts exactly `x @ prior` whatever the hidden layers hold,
    i.e. "the constant-velocity prior alone" (no learned parameter has any effect).
    """
    out = {k: np.array(v, dtype=np.float32, copy=True) for k, v in weights.items()}
    for name in residual_output_names(out):
        out[name][...] = 0.0
    return out


def _prior_mlp_class() -> type:
    import torch
    from torch import nn

    class PriorMLP(nn.Module):
        """`net(x) + x @ prior`: the MLP learns the residual over a fixed linear prior.

        Why: trajectory models predict far better as a correction to constant-velocity
        extrapolation, and under DP noise every step saved matters. The prior is a
        non-persistent buffer: it is not trained, not in the `state_dict`, never crosses the
        border, and the aggregator (which never sees the data schema) builds the same weights
        with a zero prior. Its only trainable layers are Linear, so the Gram-norm DP path holds.
        """

        def __init__(
            self, net: nn.Module, n_features: int, n_labels: int, prior: np.ndarray | None
        ) -> None:
            super().__init__()
            self.net = net
            p = torch.zeros(n_features, n_labels)
            if prior is not None:
                p = torch.as_tensor(np.asarray(prior, dtype=np.float32))
                if tuple(p.shape) != (n_features, n_labels):
                    raise ValueError(
                        f"prior has shape {tuple(p.shape)}, expected {(n_features, n_labels)}"
                    )
            self.prior: torch.Tensor
            self.register_buffer("prior", p, persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) + x @ self.prior

    return PriorMLP


def _bev_cnn(
    n_features: int, n_labels: int, in_channels: int = 3, width: int = 16, groups: int = 4
) -> nn.Module:
    """Small conv net over [C, H, W] BEV stacks; uint8 input is scaled to [0, 1]."""
    import torch
    from torch import nn

    class ScaleUint8(nn.Module):
        """Accept raw uint8 BEV stacks or floats already in [0, 1]."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float() / 255.0 if x.dtype == torch.uint8 else x

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, stride=2, padding=1),
            nn.GroupNorm(groups, cout),
            nn.GELU(),
        ]

    return nn.Sequential(
        ScaleUint8(),
        *block(in_channels, width),
        *block(width, 2 * width),
        *block(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 64),
        nn.GELU(),
        nn.Linear(64, n_labels),
    )


_REGISTRY: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "bev_cnn": _bev_cnn}


def build_model(name: str, n_features: int, n_labels: int, **kw: Any) -> nn.Module:
    """Build a registered model. `n_features` is ignored by `bev_cnn` (pass `in_channels`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    import torch

    seed = int(kw.pop("seed", 0))  # same init in every region and the aggregator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _REGISTRY[name](n_features, n_labels, **kw)


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's `state_dict` as float32 numpy arrays (copies)."""
    return {
        k: v.detach().cpu().numpy().astype(np.float32, copy=True)
        for k, v in model.state_dict().items()
    }


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load float32 arrays into the model; names and shapes must match exactly."""
    import torch

    sd = model.state_dict()
    missing, extra = sorted(set(sd) - set(weights)), sorted(set(weights) - set(sd))
    if missing or extra:
        raise ValueError(f"weights do not match the model: missing {missing}, unexpected {extra}")
    for k, v in sd.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: shape {tuple(weights[k].shape)} != {tuple(v.shape)}")
    model.load_state_dict(
        {k: torch.as_tensor(np.asarray(weights[k]), dtype=sd[k].dtype) for k in sd}
    )
