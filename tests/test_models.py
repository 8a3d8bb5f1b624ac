"""Model registry: both models, no BatchNorm, weights round-trip as float32 arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfsd.models import MODEL_NAMES, build_model, get_weights, set_weights


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_build_forward_and_have_no_batchnorm(name):
    kw = {"in_channels": 2} if name == "bev_cnn" else {}
    m = build_model(name, 41, 7, **kw)
    assert not any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())
    x = torch.rand(5, 2, 16, 32) if name == "bev_cnn" else torch.randn(5, 41)
    assert m(x).shape == (5, 7)
    if name == "bev_cnn":  # raw uint8 stacks are scaled to [0, 1] inside the model
        raw = (x * 255).round().to(torch.uint8)
        assert torch.allclose(m(raw), m(raw.float() / 255.0))


def test_same_init_everywhere_and_roundtrip():
    a, b = build_model("mlp", 41, 7), build_model("mlp", 41, 7)
    wa = get_weights(a)
    assert all(v.dtype == np.float32 for v in wa.values())
    assert all(np.array_equal(wa[k], v) for k, v in get_weights(b).items())
    c = build_model("mlp", 41, 7, seed=1)
    shifted = {k: v + 1.0 for k, v in wa.items()}
    set_weights(c, shifted)
    assert all(np.array_equal(shifted[k], v) for k, v in get_weights(c).items())


def test_bad_names_and_weights_refused():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", 41, 7)
    m = build_model("mlp", 41, 7)
    w = get_weights(m)
    with pytest.raises(ValueError, match="missing"):
        set_weights(m, {k: v for k, v in w.items() if k != "net.0.weight"})
    w["net.0.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        set_weights(m, w)


def test_mlp_prior_is_fixed_and_never_in_the_weights():
    """The constant-velocity prior shapes predictions but is not a weight that travels."""
    import torch

    from fedfsd.data.feature_spec import (
        FEATURE_NAMES,
        LABEL_NAMES,
        LABEL_SCALES,
        constant_velocity_labels,
    )
    from fedfsd.data.testing import make_synthetic_frames
    from fedfsd.privacy.objective import model_kwargs

    f, n_labels = len(FEATURE_NAMES), len(LABEL_NAMES)
    frames = make_synthetic_frames(4, 5, seed=0, n_features=f)
    kw = model_kwargs(frames, "mlp")
    with_prior, plain = build_model("mlp", f, n_labels, **kw), build_model("mlp", f, n_labels)
    assert set(get_weights(with_prior)) == set(get_weights(plain))  # same wire format
    x = torch.from_numpy(frames.features[:16])
    diff = (with_prior(x) - plain(x)).detach().numpy() * np.asarray(LABEL_SCALES)
    np.testing.assert_allclose(diff, constant_velocity_labels(frames.features[:16]), atol=1e-3)
    assert all(not b.requires_grad for b in with_prior.buffers())


def _prior_model_and_inputs():
    from fedfsd.data.feature_spec import FEATURE_NAMES, LABEL_NAMES
    from fedfsd.data.testing import make_synthetic_frames
    from fedfsd.privacy.objective import model_kwargs

    f, n_labels = len(FEATURE_NAMES), len(LABEL_NAMES)
    frames = make_synthetic_frames(4, 5, seed=0, n_features=f)
    model = build_model("mlp", f, n_labels, **model_kwargs(frames, "mlp"))
    return model, torch.from_numpy(frames.features)


def test_fresh_mlp_predicts_exactly_the_prior():
    """Issue 18: the residual starts at zero, so the start IS the constant-velocity prior."""
    model, x = _prior_model_and_inputs()
    w = get_weights(model)
    out_w, out_b = "net.4.weight", "net.4.bias"
    assert not w[out_w].any() and not w[out_b].any()
    assert w["net.0.weight"].std() > 0  # hidden layers are random (they need to break symmetry)
    with torch.no_grad():
        assert torch.equal(model(x), x @ model.prior)
    assert float(model.prior.abs().sum()) > 0  # a real prior, not the trivial zero one


def test_prior_only_weights_zero_the_residual_of_a_trained_model():
    from fedfsd.models import prior_only_weights, residual_output_names

    model, x = _prior_model_and_inputs()
    trained = {k: v + 0.3 for k, v in get_weights(model).items()}  # every layer moved
    set_weights(model, trained)
    with torch.no_grad():
        assert not torch.allclose(model(x), x @ model.prior)
    prior = prior_only_weights(trained)
    assert residual_output_names(trained) == ("net.4.weight", "net.4.bias")
    assert np.array_equal(prior["net.0.weight"], trained["net.0.weight"])
    assert trained["net.4.weight"].any()  # the input is not modified
    set_weights(model, prior)
    with torch.no_grad():
        assert torch.equal(model(x), x @ model.prior)
    with pytest.raises(ValueError, match="not an object-list MLP"):
        prior_only_weights(get_weights(build_model("bev_cnn", 0, 7, in_channels=2)))


def test_aggregator_initial_weights_have_a_zero_output_layer():
    from fedfsd.aggregator.server_app import initial_weights
    from fedfsd.aggregator.settings import parse_settings

    w = initial_weights(parse_settings({}))
    assert not w["net.4.weight"].any() and not w["net.4.bias"].any()
    assert w["net.0.weight"].any()


def test_one_dp_step_from_the_prior_changes_the_model():
    """Zero init does not stall training: one DP step moves the output layer."""
    from fedfsd.config import DPParams
    from fedfsd.data.testing import make_synthetic_frames
    from fedfsd.privacy.dpsgd import VehicleDPSGD

    frames = make_synthetic_frames(64, 8, seed=3)
    model = build_model("mlp", frames.features.shape[1], frames.labels.shape[1], hidden=16)
    before = get_weights(model)
    p = DPParams(
        noise_multiplier=0.0,
        clip_norm=1.0,
        steps=1,
        vehicles_per_step=32,
        frames_per_vehicle=8,
        lr=0.5,
        update_norm_bound=10.0,
    )
    tr = VehicleDPSGD(model, p, frames.n_vehicles, private=True, seed=0)
    tr.step(frames)
    after = get_weights(model)
    assert after["net.4.weight"].any()  # the residual left zero ...
    assert np.array_equal(after["net.0.weight"], before["net.0.weight"])  # ... hidden: next step
    tr.step(frames)
    assert not np.array_equal(get_weights(model)["net.0.weight"], before["net.0.weight"])
