"""A region process SIGKILLed at any point of a round neither loses nor double-counts spend.

Runs the real `fedfsd region train-local` in a subprocess with a fault hook installed
(`fedfsd.privacy.ledger.set_fault_hook`) that SIGKILLs it at a chosen point (mid-training,
after caching the weights, after the ledger fsync, half-way through writing the ledger line);
then a retry of the same round must end with the round's spend on the ledger exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fedfsd.privacy.accounting import compute_epsilon
from fedfsd.privacy.ledger import Ledger, fault_point, set_fault_hook

POLICY = """
region = "synthetic"
epsilon_budget = 50.0
delta = 1e-3
min_noise_multiplier = 1.0
max_clip_norm = 1.0
update_norm_bound = 1.0
"""

# `python -c DRIVER POINT fedfsd-args...`: the real CLI, killed at POINT by an injected hook.
DRIVER = """
import os, signal, sys
from fedfsd.privacy.ledger import set_fault_hook

point = sys.argv[1]

def kill_at(name, file=None, line=None, **_):
    if point == "ledger-torn" and name == "ledger-line":  # half a line reaches the disk
        file.write(line[: len(line) // 2])
        file.flush()
        os.fsync(file.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    if name == point:
        os.kill(os.getpid(), signal.SIGKILL)

set_fault_hook(kill_at)
from fedfsd.cli import app

sys.argv = ["fedfsd", *sys.argv[2:]]
app()
"""


def train_local(tmp_path, round_idx: int, fault: str | None) -> subprocess.CompletedProcess:
    # The old environment switch must no longer do anything: only an injected hook kills.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDFSD_FAULT_AT": "record"}
    args = [
        "region", "train-local", "--synthetic", "60",
        "--policy", str(tmp_path / "policy.toml"), "--ledger", str(tmp_path / "l.jsonl"),
        "--steps", "4", "--vehicles-per-step", "6", "--frames-per-vehicle", "4",
        "--run-id", "crash", "--round", str(round_idx), "--seed", str(round_idx),
    ]  # fmt: skip
    cmd = [sys.executable, "-c", DRIVER, fault, *args] if fault else [
        sys.executable, "-m", "fedfsd.cli", *args
    ]  # fmt: skip
    # subprocess.run kills the child if it overruns the timeout
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_no_hook_no_effect_and_a_hook_sees_each_point() -> None:
    fault_point("record")  # production: nothing installed, nothing happens
    seen: list[tuple[str, dict]] = []
    set_fault_hook(lambda name, **ctx: seen.append((name, ctx)))
    try:
        fault_point("cache")
        fault_point("ledger-line", line=b"x")
    finally:
        set_fault_hook(None)
    fault_point("train")
    assert seen == [("cache", {}), ("ledger-line", {"line": b"x"})]


def rounds(tmp_path) -> list[int]:
    lg = Ledger(tmp_path / "l.jsonl")
    return [r["round"] for r in lg.releases()] if lg.exists() and not lg.is_unopened() else []


@pytest.mark.timeout(600)
def test_sigkill_at_every_point_loses_and_doublecounts_nothing(tmp_path):
    (tmp_path / "policy.toml").write_text(POLICY)
    killed = -signal.SIGKILL
    cache0 = Ledger(tmp_path / "l.jsonl").cache_path("crash", 0)

    r = train_local(tmp_path, 0, "train")  # killed mid-training: nothing recorded or cached
    assert r.returncode == killed, r.stderr
    assert rounds(tmp_path) == [] and not cache0.exists()

    r = train_local(tmp_path, 0, "cache")  # weights cached, spend not yet on the ledger
    assert r.returncode == killed, r.stderr
    assert rounds(tmp_path) == [] and cache0.exists()  # an orphan cache is never returned

    r = train_local(tmp_path, 0, "record")  # spend fsync'd, killed before returning
    assert r.returncode == killed, r.stderr
    assert rounds(tmp_path) == [0]

    r = train_local(tmp_path, 0, None)  # the retry returns the cached release, no new spend
    assert r.returncode == 0, r.stderr
    assert "re-used cached release" in r.stdout
    assert rounds(tmp_path) == [0]

    r = train_local(tmp_path, 1, "ledger-torn")  # killed half-way through the ledger line
    assert r.returncode == killed, r.stderr
    lg = Ledger(tmp_path / "l.jsonl")
    assert lg.torn_tail and rounds(tmp_path) == [0]

    r = train_local(tmp_path, 1, None)
    assert r.returncode == 0, r.stderr
    lg = Ledger(tmp_path / "l.jsonl")
    assert lg.torn_tail is None and rounds(tmp_path) == [0, 1]
    assert lg.history() == [(1.0, 0.1, 8)]  # exactly two rounds of 4 steps at q = 6/60
    assert lg.epsilon() == pytest.approx(compute_epsilon([(1.0, 0.1, 8)], 1e-3))
    assert "ε left" in r.stdout
