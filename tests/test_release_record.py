"""The typed release record and the one clipper (issue 13, finding 4) against a real local round."""

from __future__ import annotations

import numpy as np
import pytest

from fedfsd.config import TrainRequest, parse_policy
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.models import build_model, get_weights
from fedfsd.privacy.clipping import clip_update
from fedfsd.privacy.ledger import Ledger
from fedfsd.privacy.local_round import run_local_round
from fedfsd.privacy.release_record import RELEASE_KEYS, REQUIRED_RELEASE_KEYS
from fedfsd.privacy.report import build_report
from fedfsd.region.egress import guard_update
from fedfsd.wire import array_digest, l2_norm

POLICY = """
region = "synthetic"
epsilon_budget = 8.0
delta = 1e-3
min_noise_multiplier = 1.0
max_clip_norm = 1.0
update_norm_bound = 0.01
max_local_steps = 10
"""
REQ = TrainRequest(
    local_steps=2, lr=0.5, noise_multiplier=1.0, vehicles_per_step=10, frames_per_vehicle=4
)


def test_a_real_release_line_has_exactly_the_typed_keys(tmp_path) -> None:
    frames = make_synthetic_frames(60, 6, seed=0)
    w = get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))
    led = tmp_path / "l.jsonl"
    res = run_local_round(frames, parse_policy(POLICY), led, w, REQ, "r", 1, "mlp", seed=0)
    (line,) = Ledger(led).releases()
    keys = set(line)
    assert REQUIRED_RELEASE_KEYS <= keys <= RELEASE_KEYS, (
        f"missing {sorted(REQUIRED_RELEASE_KEYS - keys)}, untyped {sorted(keys - RELEASE_KEYS)}"
    )
    assert set(res.record) <= RELEASE_KEYS
    rel = build_report(led).releases[0]
    assert (rel.vehicles, rel.steps, rel.update_sha256) == (
        line["vehicles"],
        line["steps"],
        line["update_sha256"],
    )
    # the round clipped with the same function the border uses: the guard finds nothing to clip
    # and the bytes leaving are the ones on the ledger line
    assert line["update_norm"] <= 0.01
    release = guard_update(w, res.new_weights, 0.01)
    assert not release.clipped and release.sha256 == line["update_sha256"]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_one_clipper_holds_the_bound_as_the_border_recomputes_it(scale: float) -> None:
    rng = np.random.default_rng(0)
    received = {"a": rng.normal(size=(50, 7)).astype(np.float32) * 100, "b": np.ones(3, "f4")}
    update = {k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in received.items()}
    bound = 0.05
    clipped, raw = clip_update(update, bound, received=received)
    new = {k: (received[k] + clipped[k]).astype(np.float32) for k in received}
    at_border = {k: new[k] - received[k] for k in received}
    assert l2_norm(at_border) <= bound and raw == pytest.approx(l2_norm(update))
    plain, _ = clip_update(update, bound)
    assert l2_norm(plain) <= bound
    release = guard_update(received, new, bound)
    assert not release.clipped and release.sha256 == array_digest(at_border)
    with pytest.raises(ValueError, match="> 0"):
        clip_update(update, 0.0)
