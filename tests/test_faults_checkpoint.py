"""Issue 20, items 1, 3 and 7c: resume is explicit, checkpoints are verified, failed runs fail.

The round loop under test is the real `run_federation`; the Grid is the in-memory answering
stand-in of test_apps_evaluate_every (Flower's real grids need a SuperLink).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict
from test_apps_evaluate_every import AnsweringGrid
from typer.testing import CliRunner

from fedfsd import wire
from fedfsd.aggregator import checkpoint as ck
from fedfsd.aggregator.server_app import (
    RunRefused,
    failed_rounds,
    initial_weights,
    make_server_app,
    run_federation,
)
from fedfsd.aggregator.settings import parse_settings
from fedfsd.flower.message_objects import TaskIdentity

CFG = {"min-regions": 1, "round-timeout": 5.0, "run-id": "f20", "local-steps": 1}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what Flower sets inside a ServerApp
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _weights() -> dict[str, np.ndarray]:
    w = {f"l{i}.weight": np.arange(6, dtype=np.float32).reshape(2, 3) + i for i in range(4)}
    w["head.bias"] = np.arange(8, dtype=np.float32)
    return w


def _same(a: ck.Checkpoint, b: ck.Checkpoint) -> bool:
    return (
        (a.round, a.run_id, a.meta) == (b.round, b.run_id, b.meta)
        and set(a.weights) == set(b.weights)
        and all(
            a.weights[k].shape == b.weights[k].shape
            and a.weights[k].dtype == b.weights[k].dtype
            and np.array_equal(a.weights[k], b.weights[k])
            for k in a.weights
        )
    )


def _flip(raw: bytes, at: int, bit: int) -> bytes:
    b = bytearray(raw)
    b[at] ^= 1 << bit
    return bytes(b)


def test_shape_header_and_central_directory_flips_refuse(tmp_path: Path) -> None:
    weights = {**_weights(), "big": np.ones((512, 3), np.float32)}  # larger than a zip read
    ck.save_checkpoint(tmp_path, ck.Checkpoint(2, "r", weights, meta={"node_regions": {}}))
    path = tmp_path / ck.CHECKPOINT
    raw = path.read_bytes()
    # An array's .npy header: (512, 3) -> (512, 1) ('3' ^ 0b10 = '1'): fewer elements read,
    # the member's CRC never checked (schema 1 loaded this silently).
    at = raw.index(b"'shape': (512, 3)") + len("'shape': (512, ")
    path.write_bytes(_flip(raw, at, 1))
    with pytest.raises(ck.CheckpointError, match="header says") as e:
        ck.load_checkpoint(tmp_path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    # Central directory (the last copy of the name): 'w/l0...' -> 'g/l0...' drops the array.
    at = raw.rindex(b"w/l0.weight.npy")
    path.write_bytes(_flip(raw, at, 4))
    with pytest.raises(ck.CheckpointError, match="corrupt checkpoint refused"):
        ck.load_checkpoint(tmp_path)


def test_no_single_bit_flip_loads_different_data(tmp_path: Path) -> None:
    ref_ckpt = ck.Checkpoint(3, "r", _weights(), {"l0.weight": np.ones((2, 3), np.float32)}, {})
    ck.save_checkpoint(tmp_path, ref_ckpt)
    path = tmp_path / ck.CHECKPOINT
    raw = path.read_bytes()
    ref = ck.load_checkpoint(tmp_path)
    silent = []
    for at in range(len(raw)):
        path.write_bytes(_flip(raw, at, at % 8))
        try:
            got = ck.load_checkpoint(tmp_path)
        except ck.CheckpointError:
            continue
        if not _same(got, ref):
            silent.append(at)
    assert silent == []


def _run(tmp_path: Path, **over: object) -> tuple[AnsweringGrid, ck.Checkpoint]:
    grid = AnsweringGrid()
    s = parse_settings({**CFG, "num-server-rounds": 2, **over})
    return grid, run_federation(grid, s, tmp_path)  # type: ignore[arg-type]


def test_resume_without_checkpoint_refuses_and_trains_nothing(tmp_path: Path) -> None:
    _run(tmp_path)
    rounds_before = (tmp_path / ck.ROUNDS_JSONL).read_text()
    (tmp_path / ck.CHECKPOINT).unlink()
    grid = AnsweringGrid()
    s = parse_settings({**CFG, "num-server-rounds": 4, "resume": True})
    with pytest.raises(RunRefused, match=r"checkpoint.npz is missing"):
        run_federation(grid, s, tmp_path)  # type: ignore[arg-type]
    assert grid.pushed == [] and (tmp_path / ck.ROUNDS_JSONL).read_text() == rounds_before


def test_a_new_run_never_starts_in_a_directory_that_holds_one(tmp_path: Path) -> None:
    _run(tmp_path)
    (tmp_path / ck.CHECKPOINT).unlink()  # even with the checkpoint gone, rounds.jsonl remains
    grid = AnsweringGrid()
    with pytest.raises(RunRefused, match="already holds a run"):
        run_federation(grid, parse_settings({**CFG, "num-server-rounds": 2}), tmp_path)  # type: ignore[arg-type]
    assert grid.pushed == []


def test_incomplete_weights_never_become_the_global_model(tmp_path: Path) -> None:
    _, state = _run(tmp_path)
    before = (tmp_path / ck.GLOBAL_MODEL).read_bytes()
    lacking = dict(state.weights)
    lacking.pop(sorted(lacking)[0])  # a consistent checkpoint, but one layer short
    ck.save_checkpoint(tmp_path, ck.Checkpoint(state.round, state.run_id, lacking, meta={}))
    grid = AnsweringGrid()
    s = parse_settings({**CFG, "num-server-rounds": 3, "resume": True})
    with pytest.raises(RunRefused, match="does not match the model: missing"):
        run_federation(grid, s, tmp_path)  # type: ignore[arg-type]
    assert grid.pushed == [] and (tmp_path / ck.GLOBAL_MODEL).read_bytes() == before


def test_a_run_with_failed_rounds_fails(tmp_path: Path) -> None:
    # AnsweringGrid's train replies carry no update: every round misses its quorum.
    _, state = _run(tmp_path)
    assert failed_rounds(state) == [1, 2]
    app = make_server_app({**CFG, "num-server-rounds": 2, "run-dir": str(tmp_path / "b")})
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(RunRefused, match=r"2 of 2 round\(s\) failed"):
        app(AnsweringGrid(), ctx)  # type: ignore[arg-type]
    assert set(np.load(tmp_path / "b" / ck.GLOBAL_MODEL).files) == set(
        initial_weights(parse_settings(CFG))
    )


class RefusingGrid(AnsweringGrid):
    """Train replies are refusals whose manifest says ε 0.0 (a region that lost its ledger view)."""

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        from fedfsd.region.egress import make_manifest

        messages = list(messages)
        ids = super().push_messages(messages)
        for mid, m in zip(ids, messages, strict=True):
            if m.metadata.message_type != MessageType.TRAIN:
                continue
            man = make_manifest(
                region="eu",
                run_id="f20",
                round_idx=int(m.metadata.group_id),
                refused_reason="privacy budget exhausted",
                epsilon=0.0,
                epsilon_budget=2.0,
                delta=1e-6,
            )
            reply = Message(
                metadata=Metadata(
                    run_id=1,
                    message_id=f"refusal-{mid}",
                    src_node_id=m.metadata.dst_node_id,
                    dst_node_id=0,
                    reply_to_message_id=mid,
                    group_id=m.metadata.group_id,
                    created_at=time.time(),
                    ttl=60,
                    message_type=MessageType.TRAIN,
                ),
                content=RecordDict(
                    {
                        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 0}),
                        wire.MANIFEST: ConfigRecord({wire.MANIFEST_KEY: man.SerializeToString()}),
                    }
                ),
            )
            self._replies = [r for r in self._replies if r.metadata.reply_to_message_id != mid]
            self._replies.append(reply)
        return ids

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        return [11]


def test_a_refusal_keeps_the_last_known_epsilon(tmp_path: Path) -> None:
    ck.append_csv(tmp_path / ck.EPSILON_CSV, ck.EPSILON_HEADER, [(1, "eu", 1.33, 1.5, 2.0, 1e-6)])
    ck.save_checkpoint(tmp_path, ck.Checkpoint(1, "f20", initial_weights(parse_settings(CFG))))
    s = parse_settings({**CFG, "num-server-rounds": 2, "resume": True})
    run_federation(RefusingGrid(), s, tmp_path)  # type: ignore[arg-type]
    rows = ck.read_csv(tmp_path / ck.EPSILON_CSV)
    assert [(r["round"], r["region"], float(r["epsilon"])) for r in rows] == [
        ("1", "eu", 1.33),
        ("2", "eu", 1.33),
    ]
    last = json.loads((tmp_path / ck.ROUNDS_JSONL).read_text().splitlines()[-1])
    assert last["refused"] == ["eu"] and last["epsilon"] == {"eu": 1.33}


def test_cli_refuses_resume_without_checkpoint_and_reuse_of_a_run_dir(tmp_path: Path) -> None:
    from fedfsd.cli import app

    agg = tmp_path / "agg"
    (agg / "flwr_home").mkdir(parents=True)
    (agg / "flwr_home" / "config.toml").write_text("")  # as if `aggregator start` had run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ck.ROUNDS_JSONL).write_text('{"round": 1}\n')
    runner = CliRunner()
    base = ["aggregator", "run", "--dir", str(agg), "--run-dir", str(run_dir)]
    res = runner.invoke(app, [*base, "--resume"])
    assert res.exit_code == 2 and "checkpoint.npz is missing" in res.output
    res = runner.invoke(app, base)
    assert res.exit_code == 2 and "already holds a run (rounds.jsonl)" in res.output


def test_a_checkpoint_keeps_the_state_dict_order(tmp_path: Path) -> None:
    w = {"z.weight": np.ones(2, np.float32), "a.bias": np.zeros(3, np.float32)}
    ck.save_checkpoint(tmp_path, ck.Checkpoint(1, "r", w))
    assert list(ck.load_checkpoint(tmp_path).weights) == ["z.weight", "a.bias"]
