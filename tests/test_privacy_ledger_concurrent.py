"""Two processes spending one region's ledger at the same time (two runs of one region: two
SuperNodes, or `fedfsd region train-local` beside a federation).

Each process runs real DP local rounds on the same ledger file at once. Afterwards the ledger is
one valid hash chain, every release is there once, and the accountant history holds every step
of both processes: no ε was lost to a lost update (both reading the same history and each
appending its own continuation of it).
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from fedfsd.config import TrainRequest, parse_policy
from fedfsd.privacy.accounting import compute_epsilon
from fedfsd.privacy.ledger import Ledger

POLICY = """
region = "synthetic"
epsilon_budget = 50.0
delta = 1e-3
min_noise_multiplier = 1.0
max_clip_norm = 1.0
update_norm_bound = 0.5
max_local_steps = 200
"""
STEPS, ROUNDS = 5, 4
REQ = dict(local_steps=STEPS, lr=0.05, noise_multiplier=1.0, vehicles_per_step=10)


def _spend(ledger: str, run_id: str, barrier, seed: int) -> None:
    """ROUNDS DP local rounds of `run_id` on `ledger`, chaining the released weights."""
    from fedfsd.data.testing import make_synthetic_frames
    from fedfsd.models import build_model, get_weights
    from fedfsd.privacy.local_round import run_local_round

    frames = make_synthetic_frames(100, 6, seed=0)
    weights = get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))
    req = TrainRequest(**REQ, frames_per_vehicle=4)
    barrier.wait(timeout=120)  # both processes are loaded: start spending together
    for rnd in range(1, ROUNDS + 1):
        res = run_local_round(
            frames, parse_policy(POLICY), ledger, weights, req, run_id, rnd, "mlp", seed=seed + rnd
        )
        weights = res.new_weights


def test_two_processes_spending_one_ledger_lose_no_epsilon(tmp_path: Path) -> None:
    led = tmp_path / "synthetic.jsonl"
    ctx = mp.get_context("spawn")  # no torch state shared with the test process
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_spend, args=(str(led), run, barrier, 10 * i))
        for i, run in enumerate(("run-a", "run-b"))
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=600)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()

    ledger = Ledger(led)  # loading verifies every line's link to the one before it
    ledger.check_integrity()
    rel = ledger.releases()
    keys = [(r["run_id"], r["round"]) for r in rel]
    assert sorted(keys) == [(run, n) for run in ("run-a", "run-b") for n in range(1, ROUNDS + 1)]
    # Every release extends the history by exactly its own steps: nothing counted once for two.
    for i, r in enumerate(rel, start=1):
        assert sum(h[2] for h in r["accountant_history"]) == i * STEPS, (i, r["run_id"])
    total = 2 * ROUNDS * STEPS
    assert ledger.history() == [(1.0, 0.1, total)]
    assert ledger.epsilon(1e-3) == pytest.approx(compute_epsilon([(1.0, 0.1, total)], 1e-3))
    assert rel[-1]["epsilon_prv"] == pytest.approx(ledger.epsilon(1e-3), rel=1e-6)
