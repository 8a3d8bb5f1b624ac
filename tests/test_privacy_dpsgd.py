"""Vehicle-level DP-SGD: per-vehicle clipping, bounded sensitivity, q as Opacus records it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfsd.config import DPParams
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.data.vehicles import VehicleFrames
from fedfsd.models import build_model
from fedfsd.privacy.dpsgd import VehicleDPSGD, sample_rate
from fedfsd.privacy.objective import label_scales, per_vehicle_loss
from fedfsd.privacy.pervehicle import ghost_clipped_sum, supports_ghost, vmap_clipped_sum

C = 0.5
torch.set_num_threads(1)  # the CI box has 2 cores shared by every test


def params(**kw) -> DPParams:
    base = dict(
        noise_multiplier=1.0,
        clip_norm=C,
        steps=10,
        vehicles_per_step=8,
        frames_per_vehicle=8,
        lr=0.1,
        update_norm_bound=10.0,
    )
    return DPParams(**{**base, **kw})


def loss_fn(out, y, m):
    return per_vehicle_loss(out, y, m, label_scales())


def tensors(frames, idx, k=8, seed=0):
    x, y, m = frames.sample(np.asarray(idx), k, np.random.default_rng(seed))
    return torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(m)


def ghost_sum(model, x, y, m, clip=C):
    model.zero_grad(set_to_none=True)
    losses, norms = ghost_clipped_sum(model, x, y, m, clip, loss_fn)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, norms


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """A non-zero residual output layer, so every layer (not only the output) has a gradient.

    A fresh MLP's output layer is zero (it starts at the prior): its hidden layers would get a
    zero gradient and the comparison below would cover only the output layer.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.net[-1].reset_parameters()  # PyTorch's default (random) Linear init
    return model


def test_ghost_and_vmap_agree_on_the_mlp():
    frames = make_synthetic_frames(30, 12, seed=0)
    model = _trained_like(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))
    assert supports_ghost(model)
    assert supports_ghost(build_model("bev_cnn", 0, 7, in_channels=2))  # tests/test_ghost_conv.py
    x, y, m = tensors(frames, range(20))
    m[3, 2:] = False  # a vehicle with only 2 of 8 frames
    g_sum, g_norms = ghost_sum(model, x, y, m, clip=0.17)
    v_sum, _, v_norms = vmap_clipped_sum(model, x, y, m, 0.17, loss_fn)
    torch.testing.assert_close(g_norms, v_norms, rtol=1e-4, atol=1e-6)
    assert (v_norms > 0.17).any() and (v_norms < 0.17).any()  # some clipped, some not
    for n in v_sum:
        torch.testing.assert_close(g_sum[n], v_sum[n], rtol=1e-4, atol=1e-7)
    assert float(g_sum["net.0.weight"].abs().max()) > 0  # hidden layers were compared too


def _fleet_with_heavy_vehicle(heavy_frames: int, light: int = 12) -> VehicleFrames:
    """12 ordinary vehicles of 10 frames plus one vehicle with `heavy_frames` outlier frames."""
    base = make_synthetic_frames(light, 10, seed=1)
    rng = np.random.default_rng(2)
    fx = rng.normal(0, 3, (heavy_frames, base.features.shape[1])).astype(np.float32)
    fy = np.full((heavy_frames, base.labels.shape[1]), 500.0, np.float32)  # wild labels
    n = base.n_frames
    return VehicleFrames(
        region="synthetic",
        features=np.concatenate([base.features, fx]),
        labels=np.concatenate([base.labels, fy]),
        offsets=np.append(base.offsets, n + heavy_frames),
        vehicle_ids=[*base.vehicle_ids, "heavy"],
        episodes=np.concatenate([base.episodes, np.full(heavy_frames, 10_000)]),
        fleet_id="t",
    )


@pytest.mark.parametrize("heavy_frames", [1, 10_000])
@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_one_vehicle_changes_the_clipped_sum_by_at_most_c(heavy_frames, method):
    frames = _fleet_with_heavy_vehicle(heavy_frames)
    model = _trained_like(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))
    others = list(range(12))
    with_v = tensors(frames, [*others, 12], k=16)
    without = tuple(t[:12] for t in with_v)  # identical frames for the other vehicles
    if method == "ghost":
        s_with, norms = ghost_sum(model, *with_v)
        s_without, _ = ghost_sum(model, *without)
    else:
        s_with, _, norms = vmap_clipped_sum(model, *with_v, C, loss_fn)
        s_without, _, _ = vmap_clipped_sum(model, *without, C, loss_fn)
    assert norms[-1] > 10 * C  # the vehicle's raw gradient is far above C ...
    diff = torch.sqrt(sum(((s_with[n] - s_without[n]) ** 2).sum() for n in s_with))
    assert diff <= C * (1 + 1e-4)  # ... but its contribution is bounded by C
    assert diff >= 0.99 * C


def test_sample_rate_matches_opacus_record_and_history_continues():
    frames = make_synthetic_frames(40, 5, seed=0)
    model = build_model("mlp", frames.features.shape[1], frames.labels.shape[1], hidden=16)
    prior = [(1.3, 0.5, 7)]
    tr = VehicleDPSGD(model, params(vehicles_per_step=6), frames.n_vehicles, history=prior, seed=0)
    assert tr.q == sample_rate(6, 40) == 0.15
    for _ in range(5):
        tr.step(frames)
    tr.check_sample_rate()
    assert tr.history == [(1.3, 0.5, 7), (1.0, 0.15, 5)]
    assert tr.accountant.history[-1][1] == 6 / 40


@pytest.mark.parametrize("name", ["mlp", "bev_cnn"])
def test_empty_poisson_batch_still_steps_with_noise(name):
    frames = make_synthetic_frames(10, 4, seed=0, with_bev=name == "bev_cnn")
    kw = {"in_channels": 2} if name == "bev_cnn" else {}
    model = build_model(name, frames.features.shape[1], frames.labels.shape[1], **kw)
    tr = VehicleDPSGD(
        model,
        params(),
        frames.n_vehicles,
        seed=0,
        modality="bev" if name == "bev_cnn" else "objects",
    )
    assert tr.method == "ghost"  # both models have per-vehicle ghost rules
    before = [p.detach().clone() for p in model.parameters()]
    r = tr.step_fixed_batch(frames, np.array([], dtype=np.int64))
    assert r.n_vehicles == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert tr.accountant.history == [(1.0, 0.8, 1)]


def test_noise_scale_is_sigma_c_over_expected_batch():
    frames = make_synthetic_frames(100, 4, seed=0)
    model = build_model("mlp", frames.features.shape[1], frames.labels.shape[1])
    p = params(noise_multiplier=2.0, vehicles_per_step=20, lr=1.0)
    tr = VehicleDPSGD(model, p, frames.n_vehicles, seed=0)
    before = torch.cat([q.detach().flatten().clone() for q in model.parameters()])
    tr.step_fixed_batch(
        frames, np.array([], dtype=np.int64)
    )  # zero gradient: the step is pure noise
    after = torch.cat([q.detach().flatten() for q in model.parameters()])
    std = float((after - before).std())
    assert std == pytest.approx(2.0 * C / 20, rel=0.05)


def test_dp_training_reduces_loss_and_nonprivate_baseline_too():
    frames = make_synthetic_frames(300, 8, seed=0)
    x, y = (torch.as_tensor(a) for a in frames.all_frames())

    def loss(m):
        with torch.no_grad():
            return float(((m(x) - y / label_scales()) ** 2).mean())

    for private in (True, False):
        model = build_model("mlp", frames.features.shape[1], frames.labels.shape[1], hidden=32)
        # The residual starts at zero (here the prior is zero too, so the start predicts 0):
        # the first step moves only the output layer, the hidden layers follow from the second.
        p = params(clip_norm=1.0, vehicles_per_step=96, lr=1.0)
        tr = VehicleDPSGD(model, p, frames.n_vehicles, private=private, seed=0)
        assert (tr.accountant is None) == (not private)
        start = loss(model)
        assert start == pytest.approx(float(((y / label_scales()) ** 2).mean()))
        for _ in range(100):
            tr.step(frames)
        assert loss(model) < 0.8 * start
