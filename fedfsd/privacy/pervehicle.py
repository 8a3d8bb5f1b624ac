"""Per-vehicle gradient norms and clipped gradient sums.

Opacus clips per *sample*; it has no notion of a unit (a vehicle) that owns many samples. Its
`grad_sample_mode="no_op"` / `DPOptimizer` let us hand it one gradient row per vehicle instead,
and `DPOptimizerFastGradientClipping` accepts an already clipped-and-summed gradient. This module
computes those, two ways:

* `ghost` (Linear + element-wise models, i.e. the object-list MLP): for a Linear layer the
  gradient of vehicle b is G_b = Σ_k g_bk a_bkᵀ (a = layer input, g = gradient at the layer
  output, k over the vehicle's frames), so ‖G_b‖² = Σ_{k,k'} (a_bk·a_bk')(g_bk·g_bk') — the
  Gram-matrix trick of ghost clipping, summed within a vehicle. One backward to the layer
  outputs gives every norm; the clipped sum Σ_b c_b G_b is then one matmul per layer with g
  re-weighted by the clip factors c_b (no second backward through the network).
* `vmap` (any model, e.g. the BEV CNN): `torch.func.vmap(grad(vehicle_loss))` materialises
  one full gradient per vehicle. General, but 3-12× the non-private step on the MLP.

Both use Opacus' clip factor, min(1, C / (‖g_b‖ + 1e-6)), so they agree to float precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

LossFn = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Opacus' per-sample clip factor (see `DPOptimizer.clip_and_accumulate`)."""
    return (clip_norm / (norms + 1e-6)).clamp(max=1.0)


# Parameter-free element-wise layers: the Gram trick needs every parametrised layer to be a
# Linear applied once per frame, with nothing between them that mixes frames or features.
ELEMENTWISE = ("GELU", "ReLU", "Tanh", "Sigmoid", "SiLU", "LeakyReLU", "ELU", "Identity")


def _linear_chain(seq: nn.Module) -> bool:
    """An nn.Sequential of distinct Linear layers and parameter-free element-wise layers."""
    from torch import nn

    if type(seq) is not nn.Sequential:
        return False
    children = list(seq._modules.values())  # children() would hide a repeated layer
    if len({id(c) for c in children}) != len(children):  # a layer applied more than once
        return False
    for c in children:
        if type(c) is nn.Linear:
            continue
        if type(c).__name__ not in ELEMENTWISE or type(c).__module__ != nn.GELU.__module__:
            return False
        if len(list(c.parameters(recurse=True))) or len(list(c.children())):
            return False
    return any(type(c) is nn.Linear for c in children)


def supports_ghost(model: nn.Module) -> bool:
    """True only for structures the per-vehicle Gram-norm trick is proven for.

    Accepted: an nn.Sequential of distinct nn.Linear layers and element-wise activations, or
    fedfsd's PriorMLP wrapping one (its prior is a fixed buffer). Refused: any other
    parametrised module, shared parameters, a Linear applied more than once, custom forwards.
    """
    from torch import nn

    net = model
    if type(model).__name__ == "PriorMLP" and type(model).__module__ == "fedfsd.models":
        children = dict(model.named_children())
        if set(children) != {"net"} or list(model.parameters(recurse=False)):
            return False
        net = children["net"]
    if not _linear_chain(net):
        return False
    seen: set[int] = set()
    for m in net._modules.values():
        if isinstance(m, nn.Linear):
            for p in m._parameters.values():  # parameters() would hide a shared tensor
                if p is None:
                    continue
                if id(p) in seen:
                    return False
                seen.add(id(p))
    return any(p.requires_grad for p in model.parameters())


def ghost_clipped_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    clip_norm: float,
    loss_fn: LossFn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write Σ_b clip(∇L_b) into each `p.grad`; return (per-vehicle losses, norms) [B].

    `x` is [B, K, F]; the model must be per-frame and satisfy `supports_ghost`.
    """
    import torch
    from torch import nn

    b, k = x.shape[:2]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if b == 0:  # empty Poisson batch: the clipped sum is zero, the step adds noise only
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        empty = torch.zeros(0, device=x.device)
        return empty, empty
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if mod in seen:
            raise RuntimeError("ghost clipping needs each Linear to be applied once per frame")
        seen[mod] = (inp[0].detach(), out)

    handles = [m.register_forward_hook(hook) for m in linears]
    try:
        out = model(x.reshape(b * k, *x.shape[2:])).reshape(b, k, -1)
    finally:
        for h in handles:
            h.remove()
    losses = loss_fn(out, y, mask)
    used = [m for m in linears if m in seen]
    outs = [seen[m][1] for m in used]
    gs = torch.autograd.grad(losses.sum(), outs)

    sq = torch.zeros(b, dtype=out.dtype, device=out.device)
    acts: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
    for m, g in zip(used, gs, strict=True):
        a = seen[m][0].reshape(b, k, -1)
        g = g.reshape(b, k, -1)
        acts.append((m, a, g))
        if k * (a.shape[-1] + g.shape[-1]) <= a.shape[-1] * g.shape[-1]:  # Gram is cheaper
            sq += ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum((1, 2))
        else:  # long windows: materialising the per-vehicle weight gradient is cheaper
            sq += torch.einsum("bko,bki->boi", g, a).pow(2).sum((1, 2))
        if m.bias is not None:
            sq += g.sum(1).pow(2).sum(-1)
    norms = sq.clamp_min(0).sqrt()
    c = clip_factors(norms, clip_norm)
    for m, a, g in acts:
        gc = g * c[:, None, None]
        m.weight.grad = gc.reshape(b * k, -1).T @ a.reshape(b * k, -1)
        if m.bias is not None:
            m.bias.grad = gc.sum((0, 1))
    for m in linears:
        if m not in seen:  # unused layer: contributes nothing, but Opacus needs a grad
            for p in m.parameters():
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
