"""VehicleFrames grouping, the K cap in sample, and the synthetic fleet."""

from __future__ import annotations

import numpy as np
import pytest

from fedfsd.data.feature_spec import FEATURE_NAMES, LABEL_NAMES, N_FEATURES, N_LABELS
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.data.vehicles import VehicleFrames


def test_names_are_unique_and_sized() -> None:
    assert len(set(FEATURE_NAMES)) == N_FEATURES and 35 <= N_FEATURES <= 50
    assert len(set(LABEL_NAMES)) == N_LABELS == 7


def test_synthetic_shapes_and_determinism() -> None:
    a = make_synthetic_frames(5, 12, seed=3)
    b = make_synthetic_frames(5, 12, seed=3)
    c = make_synthetic_frames(5, 12, seed=4)
    assert a.n_vehicles == 5 and a.n_frames == 60
    assert a.features.shape == (60, N_FEATURES) and a.labels.shape == (60, N_LABELS)
    assert a.features.dtype == np.float32 and a.labels.dtype == np.float32
    np.testing.assert_array_equal(a.features, b.features)
    assert not np.array_equal(a.features, c.features)
    assert make_synthetic_frames(2, 3, seed=0, n_features=7).features.shape == (6, 7)


def test_synthetic_signal_is_learnable() -> None:
    fr = make_synthetic_frames(20, 50, seed=0)
    x, y = fr.all_frames()
    xb = np.c_[x, np.ones(len(x))]
    coef, *_ = np.linalg.lstsq(xb, y, rcond=None)
    resid = y - xb @ coef
    assert resid.var() < 0.2 * y.var()


def test_sample_caps_k_and_groups_by_vehicle() -> None:
    fr = make_synthetic_frames(4, 10, seed=1)
    # Give vehicle 0 only 3 frames so padding is exercised.
    keep = np.r_[0:3, 10:40]
    fr = VehicleFrames(
        region=fr.region,
        features=fr.features[keep],
        labels=fr.labels[keep],
        offsets=np.array([0, 3, 13, 23, 33]),
        vehicle_ids=fr.vehicle_ids,
        episodes=fr.episodes[keep],
    )
    rng = np.random.default_rng(0)
    x, y, mask = fr.sample(np.array([0, 2]), k=5, rng=rng)
    assert x.shape == (2, 5, N_FEATURES) and y.shape == (2, 5, N_LABELS) and mask.shape == (2, 5)
    assert mask[0].sum() == 3 and mask[1].sum() == 5
    assert np.all(x[0, 3:] == 0)
    own = {tuple(r) for r in fr.features[fr.offsets[2] : fr.offsets[3]].tolist()}
    assert all(tuple(r) in own for r in x[1].tolist())
    assert len({tuple(r) for r in x[1].tolist()}) == 5  # without replacement


def test_sample_bev_and_errors() -> None:
    fr = make_synthetic_frames(3, 4, seed=2, with_bev=True)
    x, _, mask = fr.sample(np.array([1]), k=2, rng=np.random.default_rng(0), modality="bev")
    assert x.shape == (1, 2, 2, 16, 32) and x.dtype == np.float32 and x.max() <= 1.0
    assert x[mask].std() > 0
    with pytest.raises(ValueError):
        make_synthetic_frames(2, 2, seed=0).sample(np.array([0]), 1, np.random.default_rng(), "bev")
    with pytest.raises(IndexError):
        fr.sample(np.array([3]), 1, np.random.default_rng())
