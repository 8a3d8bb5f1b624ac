"""The region's egress guard: only clipped float32 updates with a matching digest leave."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfsd.region.egress import EgressError, guard_update, make_manifest, num_examples
from fedfsd.wire import array_digest, l2_norm

OLD = {"a.weight": np.ones((3, 2), np.float32), "a.bias": np.zeros((3,), np.float32)}


def _new(delta: float) -> dict[str, np.ndarray]:
    return {k: (v + np.float32(delta)).astype(np.float32) for k, v in OLD.items()}


def test_small_update_passes_unchanged() -> None:
    rel = guard_update(OLD, _new(0.01), bound=5.0)
    assert not rel.clipped
    for k in OLD:
        np.testing.assert_allclose(rel.arrays[k], _new(0.01)[k] - OLD[k])
        assert rel.arrays[k].dtype == np.float32
    assert rel.sha256 == array_digest(rel.arrays)
    assert rel.norm == pytest.approx(l2_norm(rel.arrays))


def test_large_update_is_clipped_to_the_bound() -> None:
    rel = guard_update(OLD, _new(10.0), bound=1.0)
    assert rel.clipped and rel.raw_norm > 1.0
    assert rel.norm <= 1.0 and rel.norm == pytest.approx(1.0, rel=1e-5)
    # direction preserved
    ratio = rel.arrays["a.bias"] / (_new(10.0)["a.bias"] - OLD["a.bias"])
    assert np.allclose(ratio, ratio[0])


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(1e-6, 1e6), bound=st.floats(1e-3, 1e3))
def test_clipped_norm_never_exceeds_the_bound(scale: float, bound: float) -> None:
    rng = np.random.default_rng(1)
    new = {k: (v + rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in OLD.items()}
    assert guard_update(OLD, new, bound).norm <= bound


@pytest.mark.parametrize(
    ("new", "needle"),
    [
        ({**_new(0.1), "a.bias": np.zeros((3,), np.int64)}, "non-float"),
        ({**_new(0.1), "a.bias": np.float32(1.0)}, "0-d"),
        ({**_new(0.1), "a.bias": np.zeros((4,), np.float32)}, "shape"),
        ({**_new(0.1), "extra": np.zeros((1,), np.float32)}, "names differ"),
        ({**_new(0.1), "a.bias": np.array([np.nan, 0, 0], np.float32)}, "not finite"),
    ],
    ids=["int", "0-d", "shape", "extra-name", "nan"],
)
def test_unsendable_updates_raise(new, needle) -> None:
    with pytest.raises(EgressError, match=needle):
        guard_update(OLD, new, bound=5.0)


def test_float64_weights_leave_as_float32() -> None:
    new = {k: v.astype(np.float64) + 0.5 for k, v in OLD.items()}
    rel = guard_update(OLD, new, bound=5.0)
    assert all(a.dtype == np.float32 for a in rel.arrays.values())


def test_refusal_manifest_requires_a_reason() -> None:
    with pytest.raises(ValueError):
        make_manifest(region="eu", run_id="r", round_idx=1)
    m = make_manifest(region="eu", run_id="r", round_idx=1, refused_reason="budget")
    assert m.refused_reason == "budget" and m.sha256 == "" and m.update_norm == 0.0


@pytest.mark.parametrize(
    ("weighting", "n", "expected"),
    [
        ("equal", 200, 1),
        ("bucket", 200, 128),
        ("bucket", 1, 1),
        ("bucket", 1024, 1024),
        ("bucket", 1023, 512),
    ],
)
def test_num_examples_never_reveals_exact_counts(weighting, n, expected) -> None:
    assert num_examples(weighting, n) == expected
