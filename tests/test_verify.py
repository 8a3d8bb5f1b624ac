"""Every verification rule the aggregator applies to a region's update, one by one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedfsd.aggregator.update_checks import Expectation, verify_update
from fedfsd.wire import MANIFEST_SCHEMA, UpdateManifest, array_digest, l2_norm

GLOBAL = {
    "0.weight": np.zeros((4, 3), np.float32),
    "0.bias": np.zeros((4,), np.float32),
    "2.weight": np.zeros((2, 4), np.float32),
}
BOUND = 1.0


def _exp(**kw) -> Expectation:
    args = {"norm_bound": BOUND, "run_id": "run-a", "round_idx": 3, **kw}
    return Expectation.from_weights(GLOBAL, **args)


def _update(scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    u = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}
    n = l2_norm(u)
    return {k: (v * np.float32(scale / n)).astype(np.float32) for k, v in u.items()}


def _manifest(u: dict[str, np.ndarray], **kw) -> UpdateManifest:
    fields = {"schema": MANIFEST_SCHEMA, "region": "eu", "run_id": "run-a", "round": 3,
              "sha256": array_digest(u), **kw}  # fmt: skip
    return UpdateManifest(update_norm=l2_norm(u), **fields)


def test_honest_update_is_accepted() -> None:
    u = _update()
    assert verify_update(u, _manifest(u), _exp()) is None


def test_update_exactly_at_the_bound_is_accepted() -> None:
    u = _update(scale=BOUND)
    assert verify_update(u, _manifest(u), _exp()) is None


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (lambda u: u["0.bias"].__setitem__(1, np.nan), "NaN or inf"),
        (lambda u: u["0.bias"].__setitem__(0, np.inf), "NaN or inf"),
        (lambda u: u["0.weight"].__setitem__((0, 0), -np.inf), "NaN or inf"),
        (lambda u: u.__setitem__("0.bias", np.zeros((5,), np.float32)), "shape"),
        (lambda u: u.__setitem__("0.bias", np.zeros((4,), np.float64)), "dtype"),
        (lambda u: u.__setitem__("0.bias", np.zeros((4,), np.int32)), "not float"),
        (lambda u: u.__setitem__("0.bias", np.float32(0.0)), "not an array"),
        (lambda u: u.__setitem__("evil", np.zeros((1,), np.float32)), "names differ"),
        (lambda u: u.pop("2.weight"), "names differ"),
        (lambda u: u.__setitem__("0.weight", u["0.weight"] * 100), "exceeds bound"),
    ],
    ids=["nan", "inf", "-inf", "shape", "float64", "int", "0-d", "extra", "missing", "norm"],
)
def test_bad_arrays_are_rejected(tamper, needle) -> None:
    u = _update()
    tamper(u)
    reason = verify_update(u, _manifest(u), _exp())  # digest honest: only the rule can fail
    assert reason is not None and needle in reason


def test_over_norm_is_rejected_even_with_honest_manifest() -> None:
    u = _update(scale=BOUND * 1.01)
    assert "exceeds bound" in verify_update(u, _manifest(u), _exp())


def test_bad_digest_is_rejected() -> None:
    u = _update()
    m = _manifest(u)
    u["0.bias"][0] += np.float32(1e-3)  # arrays changed after the manifest was made
    assert "digest mismatch" in verify_update(u, m, _exp())


def test_stale_round_is_rejected() -> None:
    u = _update()
    assert "stale round" in verify_update(u, _manifest(u, round=2), _exp())
    assert "stale round" in verify_update(u, _manifest(u, round=4), _exp())


def test_wrong_run_is_rejected() -> None:
    u = _update()
    assert "wrong run" in verify_update(u, _manifest(u, run_id="run-b"), _exp())


def test_old_manifest_schema_is_rejected_with_a_clear_reason() -> None:
    u = _update()
    for old in (0, 1):
        reason = verify_update(u, _manifest(u, schema=old), _exp())
        assert reason is not None and f"manifest schema {old} is not 2" in reason
        assert "older fedfsd wire format" in reason


def test_missing_or_refused_manifest_is_rejected() -> None:
    u = _update()
    assert "missing manifest" in verify_update(u, None, _exp())
    assert "refused" in verify_update(u, _manifest(u, refused_reason="budget"), _exp())
    assert "no region" in verify_update(u, _manifest(u, region=""), _exp())


def test_digest_is_order_independent_and_content_sensitive() -> None:
    u = _update()
    assert array_digest(dict(reversed(list(u.items())))) == array_digest(u)
    renamed = {("x" + k if k == "0.bias" else k): v for k, v in u.items()}
    assert array_digest(renamed) != array_digest(u)
    reshaped = {**u, "0.weight": u["0.weight"].reshape(3, 4)}
    assert array_digest(reshaped) != array_digest(u)
    recast = {**u, "0.bias": u["0.bias"].astype(np.float64)}
    assert array_digest(recast) != array_digest(u)


_float_arrays = st.one_of(
    arrays(np.float32, st.sampled_from([(4,), (5,), (4, 1), ()])),
    arrays(np.float64, (4,)),
    arrays(np.int64, (4,)),
    arrays(np.float16, (4,)),
)


@settings(max_examples=150, deadline=None)
@given(
    bias=_float_arrays,
    rnd=st.integers(0, 10),
    run=st.sampled_from(["run-a", "run-b", ""]),
    digest_ok=st.booleans(),
)
def test_fuzz_accepts_only_updates_that_satisfy_every_rule(bias, rnd, run, digest_ok) -> None:
    u = {**_update(), "0.bias": bias}
    m = _manifest(u, round=rnd, run_id=run)
    if not digest_ok:
        m.sha256 = "0" * 64
    reason = verify_update(u, m, _exp())  # must never raise
    ok = (
        bias.dtype == np.float32
        and bias.shape == (4,)
        and bool(np.all(np.isfinite(bias)))
        and l2_norm(u) <= BOUND * (1 + 1e-4) + 1e-6
        and rnd == 3
        and run == "run-a"
        and digest_ok
    )
    assert (reason is None) == ok, reason
