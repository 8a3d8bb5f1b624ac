"""Checkpoints are atomic and resumable; logs of an unfinished round are dropped on resume."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest

from fedfsd.aggregator import checkpoint as ck
from fedfsd.aggregator.strategy import FedAvgMomentum

ROOT = Path(__file__).resolve().parents[1]


def _ckpt(rnd: int, value: float) -> ck.Checkpoint:
    return ck.Checkpoint(
        round=rnd,
        run_id="run-x",
        weights={"w": np.full((2, 3), value, np.float32), "b": np.zeros(2, np.float32)},
        strategy_state={"w": np.ones((2, 3), np.float32)},
        meta={"node_regions": {"7": "eu"}},
    )


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path, _ckpt(2, 1.5))
    back = ck.load_checkpoint(tmp_path)
    assert back is not None and back.round == 2 and back.run_id == "run-x"
    np.testing.assert_array_equal(back.weights["w"], np.full((2, 3), 1.5, np.float32))
    assert set(back.strategy_state) == {"w"} and back.meta == {"node_regions": {"7": "eu"}}
    assert ck.load_checkpoint(tmp_path / "nothing-here") is None


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    ck.save_checkpoint(tmp_path, _ckpt(1, 1.0))

    def crash(*_a, **_k):
        raise OSError("disk yanked")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, _ckpt(2, 2.0))
    monkeypatch.undo()
    back = ck.load_checkpoint(tmp_path)
    assert back.round == 1 and float(back.weights["w"][0, 0]) == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.CHECKPOINT]  # no temp left


def test_truncate_drops_rows_of_unfinished_rounds(tmp_path: Path) -> None:
    m = tmp_path / ck.METRICS_CSV
    ck.append_csv(m, ck.METRICS_HEADER, [(1, "eu", "loss", 0.5), (2, "eu", "loss", 0.4)])
    ck.append_csv(m, ck.METRICS_HEADER, [(3, "eu", "loss", 0.3)])
    ck.append_jsonl(tmp_path / ck.REJECTED_JSONL, {"round": 2, "region": "us", "reason": "x"})
    ck.append_jsonl(tmp_path / ck.REJECTED_JSONL, {"round": 3, "region": "us", "reason": "y"})
    ck.truncate_after_round(tmp_path, 2)
    rows = ck.read_csv(m)
    assert [(r["round"], r["value"]) for r in rows] == [("1", "0.5"), ("2", "0.4")]
    lines = (tmp_path / ck.REJECTED_JSONL).read_text().splitlines()
    assert len(lines) == 1 and '"round": 2' in lines[0]


def test_plot_and_final_model(tmp_path: Path) -> None:
    ck.append_csv(
        tmp_path / ck.METRICS_CSV,
        ck.METRICS_HEADER,
        [(r, reg, "loss", 1.0 / r) for r in (1, 2, 3) for reg in ("eu", "us")],
    )
    png = ck.plot_metric(tmp_path, "loss")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    assert ck.plot_metric(tmp_path, "nope") is None
    path = ck.save_global_model(tmp_path, {"w": np.ones(3, np.float32)})
    with np.load(path) as z:
        np.testing.assert_array_equal(z["w"], np.ones(3, np.float32))


def test_fedavg_weights_and_momentum_state_survive_a_checkpoint(tmp_path: Path) -> None:
    g = {"w": np.zeros(2, np.float32)}
    ups = [
        ({"w": np.array([1.0, 0.0], np.float32)}, 1.0),
        ({"w": np.array([0.0, 4.0], np.float32)}, 3.0),
    ]
    plain = FedAvgMomentum().step(g, ups)
    np.testing.assert_allclose(plain["w"], [0.25, 3.0])

    s1 = FedAvgMomentum(momentum=0.5)
    w1 = s1.step(g, ups)
    ck.save_checkpoint(tmp_path, ck.Checkpoint(1, "r", w1, s1.state_dict()))
    back = ck.load_checkpoint(tmp_path)
    s2 = FedAvgMomentum(momentum=0.5)
    s2.load_state_dict(back.strategy_state)
    w2_resumed = s2.step(back.weights, ups)
    w2_straight = s1.step(w1, ups)
    np.testing.assert_allclose(w2_resumed["w"], w2_straight["w"])
    np.testing.assert_allclose(w2_straight["w"], [0.25 * 2.5, 3.0 * 2.5])  # v = 1.5 Δ on round 2
    with pytest.raises(ValueError):
        FedAvgMomentum().average([({"w": np.zeros(1)}, 0.0)])


FORBIDDEN = ("fedfsd.data", "fedfsd.privacy.dpsgd", "fedfsd.privacy.distributed")


def _imports(path: Path) -> list[str]:
    mods = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            mods += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.append(node.module)
            mods += [f"{node.module}.{a.name}" for a in node.names]
    return mods


def test_aggregator_never_imports_data_or_dp_training() -> None:
    files = sorted((ROOT / "fedfsd" / "aggregator").rglob("*.py")) + [ROOT / "fedfsd" / "wire.py"]
    assert len(files) >= 5
    bad = [
        f"{f.relative_to(ROOT)}: {m}"
        for f in files
        for m in _imports(f)
        if any(m == x or m.startswith(x + ".") for x in FORBIDDEN)
    ]
    assert not bad, "the aggregator side must not import the data side: " + "; ".join(bad)


def test_importing_the_server_app_loads_no_data_module() -> None:
    import subprocess
    import sys

    code = (
        "import sys, fedfsd.aggregator.server_app, fedfsd.aggregator.update_checks;"
        "bad=[m for m in sys.modules if m.startswith(('fedfsd.data','fedfsd.privacy.dpsgd'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
