"""Per-vehicle gradient norms and clipped gradient sums.

Opacus clips per *sample*; it has no notion of a unit (a vehicle) that owns many samples. Its
`grad_sample_mode="no_op"` / `DPOptimizer` let us hand it one gradient row per vehicle instead,
and `DPOptimizerFastGradientClipping` accepts an already clipped-and-summed gradient. This module
computes those, two ways:

* `ghost` (the object-list MLP and the BEV CNN): for a Linear layer the gradient of vehicle b
  is G_b = Σ_k g_bk a_bkᵀ (a = layer input, g = gradient at the layer output, k over the
  vehicle's frames), so ‖G_b‖² = Σ_{k,k'} (a_bk·a_bk')(g_bk·g_bk') — the Gram-matrix trick of
  ghost clipping, summed within a vehicle; a Conv2d is the same over its unfolded patches, with
  tokens = frames × output positions, and GroupNorm/LayerNorm get exact per-vehicle gradients
  (`fedfsd.privacy.ghost_conv` has the per-layer rules and picks the Gram or the direct form by
  flops). One backward to the layer outputs gives every norm; the clipped sum Σ_b c_b G_b is then
  one weighted sum per layer (no second backward through the network).
* `vmap` (any model; the reference the ghost path is tested against):
  `torch.func.vmap(grad(vehicle_loss))` materialises one full gradient per vehicle. General, but
  2-12× the non-private step.

Both use Opacus' clip factor, min(1, C / (‖g_b‖ + 1e-6)), so they agree to float precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedfsd.privacy.ghost_conv import Form

LossFn = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Opacus' per-sample clip factor (see `DPOptimizer.clip_and_accumulate`)."""
    return (clip_norm / (norms + 1e-6)).clamp(max=1.0)


def supports_ghost(model: nn.Module) -> bool:
    """True only for structures the per-vehicle ghost rules are proven for.

    Accepted: an nn.Sequential of distinct layers that each act on one frame alone (Linear,
    Conv2d, GroupNorm, LayerNorm, parameter-free activations/pooling/flatten, fedfsd's uint8
    scaling; see `ghost_conv.supports_layer_chain`), i.e. the object-list MLP's net and the BEV
    CNN, or fedfsd's PriorMLP wrapping one (its prior is a fixed buffer). Refused: any other
    parametrised module (BatchNorm mixes frames), shared parameters, a layer applied more than
    once, custom forwards.
    """
    from fedfsd.privacy.ghost_conv import supports_layer_chain

    net = model
    if type(model).__name__ == "PriorMLP" and type(model).__module__ == "fedfsd.models":
        children = dict(model.named_children())
        if set(children) != {"net"} or list(model.parameters(recurse=False)):
            return False
        net = children["net"]
    if not supports_layer_chain(net):
        return False
    return any(p.requires_grad for p in model.parameters())


def ghost_clipped_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    clip_norm: float,
    loss_fn: LossFn,
    form: Form = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write Σ_b clip(∇L_b) into each trainable `p.grad`; return (per-vehicle losses, norms) [B].

    `x` is [B, K, *frame]; the model must be per-frame and satisfy `supports_ghost`. One
    forward, one backward to the outputs of the parametrised layers, then each layer's rule
    (`fedfsd.privacy.ghost_conv`) gives the vehicles' squared norms and, after clipping, the
    layer's clipped sum. `form` forces the Gram or direct form everywhere (tests); "auto" picks
    the cheaper one per layer.
    """
    import torch
    from torch import nn

    from fedfsd.privacy.ghost_conv import Layout, rule_for

    b, k = x.shape[:2]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if b == 0:  # empty Poisson batch: the clipped sum is zero, the step adds noise only
        for p in trainable:
            p.grad = torch.zeros_like(p)
        empty = torch.zeros(0, device=x.device)
        return empty, empty
    layers = [
        m
        for m in model.modules()
        if rule_for(m) is not None and any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if mod in seen:
            raise RuntimeError("ghost clipping needs each layer to be applied once per frame")
        seen[mod] = (inp[0].detach(), out)

    # Convs run frame-major (row k·B + b), which makes their per-vehicle layout a free view.
    lay = Layout(b, k, frame_major=any(isinstance(m, nn.Conv2d) for m in layers))
    frames = x.transpose(0, 1) if lay.frame_major else x  # [K, B, ...] or [B, K, ...]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        out = model(frames.reshape(b * k, *x.shape[2:]))
    finally:
        for h in handles:
            h.remove()
    losses = loss_fn(lay.by_vehicle(out.reshape(b * k, -1)), y, mask)
    used = [m for m in layers if m in seen]
    outs = [seen[m][1] for m in used]
    gs = torch.autograd.grad(losses.sum(), outs, allow_unused=True, materialize_grads=True)

    sq = torch.zeros(b, dtype=out.dtype, device=out.device)
    parts = []
    for m, g in zip(used, gs, strict=True):
        rule = rule_for(m)
        assert rule is not None
        for part in rule(m, seen[m][0], g, lay, form):
            sq = sq + part.sq
            parts.append(part)
    norms = sq.clamp_min(0).sqrt()
    c = clip_factors(norms, clip_norm)
    for part in parts:
        part.param.grad = part.clipped(c)
    done = {id(part.param) for part in parts}
    for p in trainable:
        if id(p) not in done:  # unused layer: contributes nothing, but Opacus needs a grad
            p.grad = torch.zeros_like(p)
    return losses.detach(), norms.detach()


def vmap_grads(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    loss_fn: LossFn,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-vehicle gradients {name: [B, *p.shape]} and per-vehicle losses [B], via vmap."""
    import torch
    from torch.func import functional_call, grad_and_value, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}
    b = x.shape[0]
    if b == 0:
        empty = {
            n: torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device) for n, p in params.items()
        }
        return empty, torch.zeros(0, device=x.device)

    def vehicle_loss(
        prm: dict[str, torch.Tensor], xv: torch.Tensor, yv: torch.Tensor, mv: torch.Tensor
    ) -> torch.Tensor:
        out = functional_call(model, (prm, buffers), (xv,))  # [K, L]
        return loss_fn(out[None], yv[None], mv[None])[0]

    grads, losses = vmap(grad_and_value(vehicle_loss), in_dims=(None, 0, 0, 0))(params, x, y, mask)
    return grads, losses


def vmap_clipped_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    clip_norm: float,
    loss_fn: LossFn,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Reference clipped sum {name: Σ_b c_b g_b}, per-vehicle losses and norms (for checks)."""
    import torch

    grads, losses = vmap_grads(model, x, y, mask, loss_fn)
    b = x.shape[0]
    flat = [g.reshape(b, -1) for g in grads.values()]
    norms = torch.cat(flat, dim=1).norm(dim=1) if b else torch.zeros(0)
    c = clip_factors(norms, clip_norm)
    summed = {n: torch.einsum("b,b...->...", c, g) for n, g in grads.items()}
    return summed, losses, norms
