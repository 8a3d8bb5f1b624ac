"""Per-vehicle gradient norms and clipped sums, layer by layer, for conv nets (the BEV CNN).

The ghost path (`fedfsd.privacy.pervehicle.ghost_clipped_sum`) runs one forward and one backward
to the outputs of the parametrised layers, then asks each layer's rule here for (1) every
vehicle's squared gradient norm in that layer and (2) a function that, given the clip factors
c_b, returns Σ_b c_b G_b for the layer's parameters. Opacus works per sample; we work per vehicle,
so every rule sums over all of a vehicle's "tokens": its K frames and, for a conv, every output
position of every frame.

For a layer whose per-token weight gradient is an outer product (Linear; Conv2d on its unfolded
input), vehicle b's gradient is G_b = Σ_t g_tᵀ a_t over its T tokens (a: layer input, or the
unfolded patch for a conv, width D; g: gradient at the layer output, width O). Two ways to get
‖G_b‖², chosen per layer by flops, as Opacus' "mixed ghost norm" does:

* Gram form, ‖G_b‖² = Σ_{t,t'} (a_t·a_t')(g_t·g_t'): about T²(D + O) per vehicle, memory B·T²;
* direct form, G_b materialised: about T·D·O per vehicle, memory B·D·O.

The Gram form wins when T(D + O) ≤ D·O (few tokens, wide layers: the MLP's hidden layers); on the
BEV CNN every conv has hundreds to thousands of tokens per vehicle, so the direct form wins there.
Norm layers (GroupNorm, LayerNorm) have per-channel weight and bias: their per-vehicle gradients
(Σ_t g·x̂ and Σ_t g, x̂ the normalised input) are tiny and computed exactly, never approximated.

Layers without a rule make `supports_ghost` false, so the model falls back to `vmap`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

if TYPE_CHECKING:
    import torch
    from torch import nn

Form = Literal["auto", "gram", "direct"]


@dataclass
class Part:
    """One trainable parameter's share: per-vehicle squared norms [B] and Σ_b c_b G_b(c)."""

    param: torch.Tensor
    sq: torch.Tensor
    clipped: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """How the B·K frame rows of every layer's input are ordered.

    Vehicle-major (row b·K + k) is what the data gives; frame-major (row k·B + b) makes the
    conv rule's grouped layout [K, B·C, H, W] a free view (see `conv2d_rule`).
    """

    b: int
    k: int
    frame_major: bool

    def by_vehicle(self, t: torch.Tensor) -> torch.Tensor:
        """[B·K, *rest] rows -> [B, K, *rest] (a view)."""
        if self.frame_major:
            return t.reshape(self.k, self.b, *t.shape[1:]).transpose(0, 1)
        return t.reshape(self.b, self.k, *t.shape[1:])

    def sum_frames(self, t: torch.Tensor) -> torch.Tensor:
        """[B·K, *rest] rows -> [B, *rest], each vehicle's rows summed (no copy of t)."""
        if self.frame_major:
            return t.reshape(self.k, self.b, *t.shape[1:]).sum(0)
        return t.reshape(self.b, self.k, *t.shape[1:]).sum(1)

    def per_row(self, c: torch.Tensor) -> torch.Tensor:
        """A per-vehicle value [B] spread over the B·K rows."""
        return c.repeat(self.k) if self.frame_major else c.repeat_interleave(self.k)

    def by_frame(self, t: torch.Tensor) -> torch.Tensor:
        """[B·K, *rest] rows -> [K, B, *rest] (a view)."""
        if self.frame_major:
            return t.reshape(self.k, self.b, *t.shape[1:])
        return t.reshape(self.b, self.k, *t.shape[1:]).transpose(0, 1)


Rule = Callable[["nn.Module", "torch.Tensor", "torch.Tensor", Layout, Form], list[Part]]

# Parameter-free torch.nn layers that act on each frame alone (never across the batch), so the
# gradient of the summed loss at a layer's output rows of vehicle b is the gradient of L_b.
PER_FRAME_PARAM_FREE = (
    "GELU",
    "ReLU",
    "Tanh",
    "Sigmoid",
    "SiLU",
    "LeakyReLU",
    "ELU",
    "Identity",
    "Flatten",
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "MaxPool2d",
)
# fedfsd's own parameter-free per-frame layers (exact qualified names in fedfsd.models).
FEDFSD_PARAM_FREE = ("_bev_cnn.<locals>.ScaleUint8",)


def _trainable(p: Any) -> bool:
    return p is not None and p.requires_grad


def use_gram(tokens: int, d_in: int, d_out: int, form: Form) -> bool:
    """Gram form iff it costs no more flops per vehicle: T²(D + O) ≤ T·D·O (or forced)."""
    if form != "auto":
        return form == "gram"
    return tokens * (d_in + d_out) <= d_in * d_out


def materialised(param: torch.Tensor, per_vehicle: torch.Tensor) -> Part:
    """A part whose per-vehicle gradients [B, ...] are in hand: norms and Σ_b c_b G_b direct."""
    flat = per_vehicle.reshape(per_vehicle.shape[0], -1)
    return Part(param, flat.pow(2).sum(-1), lambda c: (c @ flat).reshape(param.shape))


def gram_part(
    param: torch.Tensor,
    a: torch.Tensor,
    g: torch.Tensor,
    weighted_sum: Callable[[torch.Tensor], torch.Tensor],
) -> Part:
    """‖G_b‖² = Σ_{t,t'} (a_t·a_t')(g_t·g_t') from a [B, T, D], g [B, T, O], never forming G_b;
    `weighted_sum(c)` then gives Σ_b c_b G_b in one pass over all tokens."""
    sq = ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum((1, 2))
    return Part(param, sq, weighted_sum)


def linear_rule(
    m: nn.Module, inp: torch.Tensor, g: torch.Tensor, lay: Layout, form: Form
) -> list[Part]:
    """nn.Linear on [B·K, ..., D]: tokens are the frames (and any extra leading dims)."""
    m = cast("nn.Linear", m)
    b = lay.b
    a3 = lay.by_vehicle(inp).reshape(b, -1, inp.shape[-1])  # [B, T, D]
    g3 = lay.by_vehicle(g).reshape(b, -1, g.shape[-1])  # [B, T, O]
    parts: list[Part] = []
    if _trainable(m.weight):
        if use_gram(a3.shape[1], a3.shape[2], g3.shape[2], form):

            def weighted_sum(c: torch.Tensor) -> torch.Tensor:
                gc = g3 * c[:, None, None]
                return gc.reshape(-1, g3.shape[-1]).T @ a3.reshape(-1, a3.shape[-1])

            parts.append(gram_part(m.weight, a3, g3, weighted_sum))
        else:
            parts.append(materialised(m.weight, g3.transpose(1, 2) @ a3))
    if _trainable(m.bias):
        parts.append(materialised(m.bias, g3.sum(1)))
    return parts


def conv2d_rule(
    m: nn.Module, inp: torch.Tensor, g: torch.Tensor, lay: Layout, form: Form
) -> list[Part]:
    """nn.Conv2d (groups = 1, zero padding): tokens are a vehicle's frames × output positions.

    With the unfolded input patch a [D = Cin·kh·kw] and the output gradient g [O] at each
    position, the conv is a Linear per position: G_b = Σ_{k,p} g_bkp a_bkpᵀ. The direct form
    never unfolds: it runs the conv's own weight-gradient kernel once with the vehicles as
    groups (input [K, B·Cin, H, W], output gradient [K, B·O, H', W'], groups = B), which sums
    over a vehicle's frames and positions at about the cost of the non-private weight gradient.
    """
    import torch.nn.functional as F
    from torch.nn.grad import conv2d_weight

    m = cast("nn.Conv2d", m)
    b, k = lay.b, lay.k
    cin, o = inp.shape[1], g.shape[1]
    w = m.weight
    pad = cast("tuple[int, ...]", m.padding)  # never a string: `supports_layer_chain` refuses it
    parts: list[Part] = []
    if _trainable(w):
        d = cin * w.shape[2] * w.shape[3]
        tokens = k * g.shape[2] * g.shape[3]
        if use_gram(tokens, d, o, form):
            patches = F.unfold(inp, m.kernel_size, m.dilation, pad, m.stride)  # [N, D, P]
            a_t = lay.by_vehicle(patches.transpose(1, 2)).reshape(b, tokens, d)
            g_t = lay.by_vehicle(g.flatten(2).transpose(1, 2)).reshape(b, tokens, o)

            def weighted_sum(c: torch.Tensor) -> torch.Tensor:
                gc = g * lay.per_row(c)[:, None, None, None]
                return conv2d_weight(inp, w.shape, gc, m.stride, pad, m.dilation, 1)

            parts.append(gram_part(w, a_t, g_t, weighted_sum))
        else:
            xg = lay.by_frame(inp).reshape(k, b * cin, *inp.shape[2:])
            gg = lay.by_frame(g).reshape(k, b * o, *g.shape[2:])
            pv = conv2d_weight(
                xg, (b * o, *w.shape[1:]), gg, m.stride, pad, m.dilation, b
            )  # [B·O, Cin, kh, kw]: vehicle b's gradient in rows b·O .. (b+1)·O
            parts.append(materialised(w, pv.reshape(b, *w.shape)))
    if m.bias is not None and m.bias.requires_grad:
        gb = lay.sum_frames(g.sum((2, 3)))  # [B, O]
        parts.append(materialised(m.bias, gb))
    return parts


def _affine_norm_parts(
    m: nn.GroupNorm | nn.LayerNorm,
    xhat: torch.Tensor,
    g: torch.Tensor,
    lay: Layout,
    channel_dim: int,
) -> list[Part]:
    """Per-channel scale and shift, out = x̂·w + β: G_b(w) = Σ_t g·x̂, G_b(β) = Σ_t g, exact.

    `channel_dim` 1 (GroupNorm, [N, C, *]) or -1 (LayerNorm, [N, ..., *shape]).
    """

    import torch

    n = g.shape[0]
    shape = (m.weight if m.weight is not None else m.bias).shape

    # [N, C, *] (GroupNorm) -> [N, C, P] "ncp"; [N, ..., *shape] (LayerNorm) -> [N, T, S] "nts":
    # both contiguous views, so the einsum below is one batched dot product per (row, channel),
    # about 3× faster on CPU than multiplying then summing.
    if channel_dim == 1:
        eq, g3, sum_dim = "ncp,ncp->nc", g.reshape(n, g.shape[1], -1), 2
        x3 = xhat.reshape(g3.shape)
    else:
        eq, g3, sum_dim = "nts,nts->ns", g.reshape(n, -1, shape.numel()), 1
        x3 = xhat.reshape(g3.shape)

    parts: list[Part] = []
    if _trainable(m.weight):
        dot = torch.einsum(eq, g3, x3)  # Σ over a frame's positions of g·x̂, per channel
        parts.append(materialised(m.weight, lay.sum_frames(dot).reshape(-1, *shape)))
    if _trainable(m.bias):
        pb = lay.sum_frames(g3.sum(sum_dim))
        parts.append(materialised(m.bias, pb.reshape(-1, *shape)))
    return parts


def group_norm_rule(
    m: nn.Module, inp: torch.Tensor, g: torch.Tensor, lay: Layout, form: Form
) -> list[Part]:
    """nn.GroupNorm: per-frame statistics, so x̂ of a frame depends on that frame alone."""
    import torch.nn.functional as F

    m = cast("nn.GroupNorm", m)
    xhat = F.group_norm(inp, m.num_groups, eps=m.eps)
    return _affine_norm_parts(m, xhat, g, lay, channel_dim=1)


def layer_norm_rule(
    m: nn.Module, inp: torch.Tensor, g: torch.Tensor, lay: Layout, form: Form
) -> list[Part]:
    """nn.LayerNorm over the trailing `normalized_shape` of each token."""
    import torch.nn.functional as F

    m = cast("nn.LayerNorm", m)
    xhat = F.layer_norm(inp, m.normalized_shape, eps=m.eps)
    return _affine_norm_parts(m, xhat, g, lay, channel_dim=-1)


def rule_for(m: nn.Module) -> Rule | None:
    """The per-vehicle rule for a parametrised layer (exact type match), or None."""
    from torch import nn

    rules: dict[type, Rule] = {
        nn.Linear: linear_rule,
        nn.Conv2d: conv2d_rule,
        nn.GroupNorm: group_norm_rule,
        nn.LayerNorm: layer_norm_rule,
    }
    return rules.get(type(m))


def _rule_applies(m: nn.Module) -> bool:
    """A layer with a rule, in a configuration the rule is written for."""
    from torch import nn

    if rule_for(m) is None or list(m.children()):
        return False
    if type(m) is nn.Conv2d:
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return True


def _param_free_per_frame(m: nn.Module) -> bool:
    from torch import nn

    if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
        return False
    if any(True for _ in m.children()):
        return False
    t = type(m)
    if t.__module__.startswith("torch.nn.modules.") and t.__name__ in PER_FRAME_PARAM_FREE:
        return getattr(nn, t.__name__, None) is t
    return t.__module__ == "fedfsd.models" and t.__qualname__ in FEDFSD_PARAM_FREE


def supports_layer_chain(seq: nn.Module) -> bool:
    """An nn.Sequential of distinct layers that each act on one frame alone: layers with a rule
    (Linear, Conv2d, GroupNorm, LayerNorm) and known parameter-free per-frame layers; no
    parameter shared between layers."""
    from torch import nn

    if type(seq) is not nn.Sequential:
        return False
    children = list(seq._modules.values())  # children() would hide a repeated layer
    if not children or len({id(c) for c in children}) != len(children):
        return False
    seen: set[int] = set()
    for c in children:
        if c is None:
            return False
        if _rule_applies(c):
            for p in c._parameters.values():  # parameters() would hide a shared tensor
                if p is None:
                    continue
                if id(p) in seen:
                    return False
                seen.add(id(p))
        elif not _param_free_per_frame(c):
            return False
    return bool(seen)
