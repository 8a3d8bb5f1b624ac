"""Conv ghost norms: the per-vehicle rules for the BEV CNN against the `vmap` reference.

Every comparison runs the real BEV CNN (`fedfsd.models`) on small 2 × 16 × 32 rasters, with
vehicles holding different numbers of frames (one of them a single frame), and checks norms and
clipped sums with clipping that binds for some vehicles and not for others.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedfsd.config import DPParams
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.data.vehicles import VehicleFrames
from fedfsd.models import build_model
from fedfsd.privacy.dpsgd import VehicleDPSGD
from fedfsd.privacy.ghost_conv import use_gram
from fedfsd.privacy.objective import label_scales, per_vehicle_loss
from fedfsd.privacy.pervehicle import ghost_clipped_sum, supports_ghost, vmap_clipped_sum

torch.set_num_threads(1)  # the CI box has 2 cores shared by every test


def loss_fn(out, y, m):
    return per_vehicle_loss(out, y, m, label_scales())


def _bev_batch(b: int = 7, k: int = 4, seed: int = 0):
    """Random BEV stacks [B, K, 2, 16, 32] in [0, 1]; vehicle 0 has 1 frame, vehicle 1 has 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, k, 2, 16, 32, generator=g)
    y = torch.randn(b, k, 7, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0, 4.0, 1.0])
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[0, 1:] = False
    mask[1, 2:] = False
    x[~mask] = 0.0  # padding rows are zero, as `VehicleFrames.sample` gives them
    return x, y, mask


def _ghost(model, x, y, m, clip, form="auto"):
    model.zero_grad(set_to_none=True)
    losses, norms = ghost_clipped_sum(model, x, y, m, clip, loss_fn, form=form)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, losses, norms


def _assert_matches_vmap(model, x, y, m, clip, form="auto"):
    g_sum, g_losses, g_norms = _ghost(model, x, y, m, clip, form)
    v_sum, v_losses, v_norms = vmap_clipped_sum(model, x, y, m, clip, loss_fn)
    torch.testing.assert_close(g_losses, v_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_norms, v_norms, rtol=1e-4, atol=1e-6)
    assert set(g_sum) == set(v_sum)
    for n in v_sum:
        scale = float(v_sum[n].abs().max())
        assert scale > 0, f"{n}: no gradient reached this layer, the comparison is empty"
        torch.testing.assert_close(g_sum[n], v_sum[n], rtol=1e-4, atol=1e-5 * scale)
    return v_norms


def test_bev_cnn_takes_the_ghost_path():
    model = build_model("bev_cnn", 0, 7, in_channels=2)
    assert supports_ghost(model)
    types = {type(m) for m in model.modules()}
    assert {nn.Conv2d, nn.GroupNorm, nn.Linear} <= types  # every rule is exercised below


@pytest.mark.parametrize("form", ["auto", "gram", "direct"])
def test_norms_and_clipped_sums_equal_vmap(form):
    model = build_model("bev_cnn", 0, 7, in_channels=2)
    x, y, m = _bev_batch()
    norms = _assert_matches_vmap(model, x, y, m, clip=1e6, form=form)  # no clipping
    clip = float(norms.median())  # binds for about half of the vehicles
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()
    _assert_matches_vmap(model, x, y, m, clip=clip, form=form)


def test_auto_form_follows_flops_on_the_bev_cnn():
    """At K = 8 on real 48 × 128 rasters every conv has thousands of tokens per vehicle: the
    direct form is far cheaper; the MLP's hidden layers (8 tokens, 256 wide) take the Gram."""
    k = 8
    assert not use_gram(k * 24 * 64, 2 * 9, 16, "auto")  # conv 1 on a 48 × 128 raster
    assert not use_gram(k * 2 * 4, 32 * 9, 32, "auto")  # conv 3 on the 16 × 32 test raster
    assert use_gram(k, 256, 256, "auto")
    assert not use_gram(k, 256, 7, "auto")  # narrow output layer: materialise


def test_single_frame_vehicle_alone_and_clip_bounds_each_vehicle():
    model = build_model("bev_cnn", 0, 7, in_channels=2)
    x, y, m = _bev_batch()
    one = tuple(t[:1] for t in (x, y, m))  # only the one-frame vehicle
    _assert_matches_vmap(model, *one, clip=1e6)
    # Adding one vehicle moves the clipped sum by at most C (and by C when its clip binds).
    clip = 1e-3
    with_v, _, norms = _ghost(model, x, y, m, clip)
    without, _, _ = _ghost(model, x[1:], y[1:], m[1:], clip)
    assert norms[0] > 10 * clip
    diff = torch.sqrt(sum(((with_v[n] - without[n]) ** 2).sum() for n in with_v))
    assert clip * 0.999 <= float(diff) <= clip * (1 + 1e-3)


def test_frozen_layers_get_no_gradient_and_are_left_out_of_the_norm():
    model = build_model("bev_cnn", 0, 7, in_channels=2)
    for p in model[1].parameters():  # the first conv, e.g. kept fixed while fine-tuning
        p.requires_grad_(False)
    x, y, m = _bev_batch(b=4)
    g_sum, _, g_norms = _ghost(model, x, y, m, 1e6)
    v_sum, _, v_norms = vmap_clipped_sum(model, x, y, m, 1e6, loss_fn)
    assert model[1].weight.grad is None and model[1].bias.grad is None
    torch.testing.assert_close(g_norms, v_norms, rtol=1e-4, atol=1e-6)
    assert set(g_sum) == set(v_sum) and "1.weight" not in v_sum
    for n in v_sum:
        torch.testing.assert_close(g_sum[n], v_sum[n], rtol=1e-4, atol=1e-7)


def test_layer_norm_and_frame_tokens_match_vmap():
    """LayerNorm's rule and a Linear over extra token dims (not in the BEV CNN, but accepted by
    `supports_ghost`, so checked too)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Flatten(2),  # [N, 4, 128]: a Linear over 4 tokens per frame
        nn.Linear(128, 16),
        nn.LayerNorm(16),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(64, 7),
    )
    assert supports_ghost(model)
    x, y, m = _bev_batch(b=5, k=3)
    for form in ("gram", "direct"):
        _assert_matches_vmap(model, x, y, m, clip=0.05, form=form)


def _bev_fleet() -> VehicleFrames:
    """Vehicles with 1 to 6 frames (K = 4): padding and one-frame vehicles in most batches."""
    base = make_synthetic_frames(12, 6, seed=3, with_bev=True)
    counts = np.arange(12) % 6 + 1  # 1..6 frames, twice
    keep = np.concatenate([base.offsets[v] + np.arange(c) for v, c in enumerate(counts)])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return VehicleFrames(
        region=base.region,
        features=base.features[keep],
        labels=base.labels[keep],
        offsets=offsets,
        vehicle_ids=base.vehicle_ids,
        episodes=base.episodes[keep],
        bev=base.bev[keep],
        fleet_id=base.fleet_id,
    )


def test_dp_step_equals_vmap_step_with_the_same_noise_seed():
    frames = _bev_fleet()
    params = DPParams(
        noise_multiplier=1.0,
        clip_norm=0.05,
        steps=3,
        vehicles_per_step=6,
        frames_per_vehicle=4,
        lr=0.5,
        update_norm_bound=10.0,
    )
    trained = {}
    for method in ("auto", "vmap"):
        model = build_model("bev_cnn", 0, 7, in_channels=2, seed=1)
        tr = VehicleDPSGD(model, params, frames.n_vehicles, method=method, modality="bev", seed=7)
        assert tr.method == ("ghost" if method == "auto" else "vmap")
        start = [p.detach().clone() for p in model.parameters()]
        for _ in range(3):
            tr.step(frames)  # Poisson-sampled: the same vehicles and frames for both seeds
        trained[method] = [p.detach() for p in model.parameters()]
        moved = sum(
            float((a - p.detach()).norm()) for a, p in zip(start, model.parameters(), strict=True)
        )
        assert moved > 0
        assert tr.history == [(1.0, 0.5, 3)]
    for g, v in zip(trained["auto"], trained["vmap"], strict=True):
        torch.testing.assert_close(g, v, rtol=1e-4, atol=1e-6)
