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

    from fedfsd.data.features import (
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
