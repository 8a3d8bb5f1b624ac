"""Several training workers per region (issue 16, parts 1 and 4): one worker's guarantee exactly.

Every test runs real worker processes (forked, gloo on loopback) on a tiny synthetic fleet.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedfsd.cli import app
from fedfsd.config import TrainRequest, parse_policy
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.models import build_model, get_weights
from fedfsd.privacy import distributed
from fedfsd.privacy.device import DeviceUnavailable, WorkersRefused
from fedfsd.privacy.distributed import WorkerFailed
from fedfsd.privacy.ledger import Ledger, set_fault_hook
from fedfsd.privacy.local_round import run_local_round
from fedfsd.privacy.objective import model_kwargs

POLICY = """
region = "synthetic"
epsilon_budget = 50.0
delta = 1e-3
min_noise_multiplier = 0.5
max_clip_norm = 1.0
update_norm_bound = 100.0
max_local_steps = 10
"""
REQ = TrainRequest(
    local_steps=4, lr=0.5, noise_multiplier=0.5, vehicles_per_step=10, frames_per_vehicle=4
)
# Everything a reviewer reads off the ledger line except timings and the update's own digest
# (the weights agree to float summation order, so their sha256 may differ in the last bit).
SAME_KEYS = (
    "noise_multiplier", "clip_norm", "sample_rate", "vehicles", "expected_vehicles_per_step",
    "frames_per_vehicle", "steps", "sampling", "normalisation", "delta", "epsilon_prv",
    "epsilon_rdp", "epsilon_budget", "accountant_history", "received_sha256", "private", "rng",
    "method", "lr",
)  # fmt: skip


def _fleet(model: str):
    frames = make_synthetic_frames(40, 12, seed=0, with_bev=model == "bev_cnn")
    net = build_model(
        model, frames.features.shape[1], frames.labels.shape[1], **model_kwargs(frames, model)
    )
    return frames, get_weights(net)


def _round(frames, w, ledger: Path, model: str, *, seed: int = 3, **kw):
    return run_local_round(
        frames, parse_policy(POLICY), ledger, w, REQ, "run", 1, model, seed=seed, **kw
    )


@pytest.mark.parametrize("model", ["mlp", "bev_cnn"])  # ghost and vmap per-vehicle clipping
def test_two_workers_release_what_one_worker_releases(tmp_path: Path, model: str) -> None:
    frames, w = _fleet(model)
    one = _round(frames, w, tmp_path / "one.jsonl", model)
    two = _round(frames, w, tmp_path / "two.jsonl", model, workers=2)
    for k in w:
        assert np.allclose(one.new_weights[k], two.new_weights[k], rtol=1e-5, atol=1e-6), k
    assert max(np.abs(one.new_weights[k] - w[k]).max() for k in w) > 1e-2  # it did train
    (l1,) = Ledger(tmp_path / "one.jsonl").releases()
    (l2,) = Ledger(tmp_path / "two.jsonl").releases()
    assert {k: l1[k] for k in SAME_KEYS} == {k: l2[k] for k in SAME_KEYS}
    assert l2["update_norm"] == pytest.approx(l1["update_norm"], rel=1e-5)
    assert l2["train_loss"] == pytest.approx(l1["train_loss"], rel=1e-5)
    assert (two.epsilon, two.steps, two.sample_rate) == (one.epsilon, one.steps, one.sample_rate)
    # Another seed samples other vehicles and draws other noise: the match above is not trivial.
    other = _round(frames, w, tmp_path / "other.jsonl", model, seed=4, workers=2)
    assert max(np.abs(other.new_weights[k] - two.new_weights[k]).max() for k in w) > 1e-3


def test_each_vehicle_is_clipped_once_and_noise_drawn_once_per_step(tmp_path: Path) -> None:
    frames, w = _fleet("mlp")
    n_tensors = len(w)  # Opacus draws one Gaussian tensor per parameter tensor per step
    with distributed.tracing() as events:
        _round(frames, w, tmp_path / "l.jsonl", "mlp", workers=2)
    assert len(events) == 2 * REQ.local_steps
    for step in range(REQ.local_steps):
        ranks = {e["rank"]: e for e in events if e["step"] == step}
        assert set(ranks) == {0, 1}
        sampled = ranks[0]["sampled"]
        assert sampled, "a step with no vehicle proves nothing"
        owned = [ranks[r]["vehicles"] for r in (0, 1)]
        assert sorted(owned[0] + owned[1]) == sorted(sampled)  # every sampled vehicle, once
        assert all(v % 2 == r for r in (0, 1) for v in owned[r])  # by its owning worker
        # the real clip function saw exactly the owner's vehicles, nobody else clipped them
        assert [ranks[r]["clipped"] for r in (0, 1)] == [len(o) for o in owned]
        assert ranks[0]["noise_draws"] == n_tensors and ranks[1]["noise_draws"] == 0


def test_an_empty_poisson_step_adds_noise_once_as_one_worker_does(tmp_path: Path) -> None:
    frames, w = _fleet("mlp")
    req = REQ.model_copy(update={"vehicles_per_step": 1, "local_steps": 8})  # q = 1/40
    pol = parse_policy(POLICY)
    one = run_local_round(frames, pol, tmp_path / "1.jsonl", w, req, "run", 1, "mlp", seed=4)
    with distributed.tracing() as events:
        two = run_local_round(
            frames, pol, tmp_path / "2.jsonl", w, req, "run", 1, "mlp", seed=4, workers=2
        )
    empty = [e for e in events if e["rank"] == 0 and not e["sampled"]]
    assert empty, "seed 4 should give at least one empty step"
    assert all(e["noise_draws"] == len(w) for e in empty)  # noised and accounted all the same
    for k in w:
        assert np.allclose(one.new_weights[k], two.new_weights[k], rtol=1e-5, atol=1e-6), k
    assert one.record["accountant_history"] == two.record["accountant_history"]


def _worker_pids(tmp_path: Path) -> list[int]:
    return [int(p.read_text()) for p in tmp_path.glob("pid-*")]


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_a_failing_worker_stops_the_others_and_nothing_is_released(
    tmp_path: Path, how: str
) -> None:
    frames, w = _fleet("mlp")
    led = tmp_path / "l.jsonl"

    def hook(point: str, **ctx: object) -> None:
        if point != "worker-step":
            return
        (tmp_path / f"pid-{ctx['rank']}").write_text(str(os.getpid()))
        if ctx["rank"] == 1 and ctx["step"] == 2:
            if how == "exit":
                os._exit(3)  # a hard crash: rank 0 is left waiting in the all-reduce
            raise RuntimeError("worker 1 broke")

    set_fault_hook(hook)
    try:
        with pytest.raises(WorkerFailed, match="training worker failed"):
            _round(frames, w, led, "mlp", workers=2)
    finally:
        set_fault_hook(None)
    pids = _worker_pids(tmp_path)
    assert len(pids) == 2
    for pid in pids:  # none outlives the round (joined, so not even a zombie)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert multiprocessing.active_children() == []
    assert Ledger(led).releases() == []  # no spend recorded
    assert Ledger(led).read_cache("run", 1) is None  # nothing cached for release
    ok = _round(frames, w, led, "mlp", workers=2)  # the lock was released: a retry trains
    assert ok.steps == REQ.local_steps and len(Ledger(led).releases()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_refused_without_cuda(tmp_path: Path) -> None:
    frames, w = _fleet("mlp")
    with pytest.raises(DeviceUnavailable, match="no CUDA device"):
        _round(frames, w, tmp_path / "l.jsonl", "mlp", device="cuda")
    assert not (tmp_path / "l.jsonl").exists()  # refused before the ledger was touched
    pol = tmp_path / "p.toml"
    pol.write_text(POLICY)
    args = ["--policy", str(pol), "--ledger", str(tmp_path / "c.jsonl"), "--device", "cuda"]
    r = CliRunner().invoke(
        app, ["region", "train-local", "--synthetic", "20", "--steps", "2", *args]
    )
    assert r.exit_code == 2 and "no CUDA device" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["region", "start", "--superlink", "127.0.0.1:1", "--data",
                                 str(tmp_path), "--insecure", *args])  # fmt: skip
    assert r.exit_code == 2 and "no CUDA device" in r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none present)")
def test_cuda_trains_and_releases_cpu_weights(tmp_path: Path) -> None:
    frames, w = _fleet("mlp")
    cpu = _round(frames, w, tmp_path / "cpu.jsonl", "mlp")
    gpu = _round(frames, w, tmp_path / "gpu.jsonl", "mlp", device="cuda")
    assert all(
        isinstance(v, np.ndarray) and v.dtype == np.float32 for v in gpu.new_weights.values()
    )
    assert (gpu.epsilon, gpu.steps, gpu.sample_rate) == (cpu.epsilon, cpu.steps, cpu.sample_rate)
    assert max(np.abs(gpu.new_weights[k] - w[k]).max() for k in w) > 1e-2


def test_bad_worker_counts_are_refused(tmp_path: Path) -> None:
    frames, w = _fleet("mlp")
    with pytest.raises(WorkersRefused, match=">= 1"):
        _round(frames, w, tmp_path / "l.jsonl", "mlp", workers=0)
    with pytest.raises(WorkersRefused, match="privately"):
        _round(frames, w, tmp_path / "l.jsonl", "mlp", workers=2, private=False)
    with pytest.raises(DeviceUnavailable, match="--device must be"):
        _round(frames, w, tmp_path / "l.jsonl", "mlp", device="tpu")


def test_train_local_with_two_workers(tmp_path: Path) -> None:
    pol = tmp_path / "p.toml"
    pol.write_text(POLICY)
    led = tmp_path / "l.jsonl"
    args = ["--policy", str(pol), "--ledger", str(led), "--steps", "3", "--vehicles-per-step", "8",
            "--noise-multiplier", "0.5", "--seed", "1", "--workers", "2"]  # fmt: skip
    r = CliRunner().invoke(app, ["region", "train-local", "--synthetic", "40", *args])
    assert r.exit_code == 0, r.output
    assert "ε spent" in r.output and "3 steps" in r.output
    (line,) = Ledger(led).releases()
    assert line["steps"] == 3 and line["sample_rate"] == pytest.approx(8 / 40)


def test_region_start_flags_reach_the_client_app_through_the_node_config() -> None:
    from fedfsd.deploy.federation import node_config_arg
    from fedfsd.region.cli import training_node_config
    from fedfsd.region.client_app import training_options

    assert training_node_config(1, "cpu") == {}  # today's default path: nothing added
    cfg = training_node_config(3, "cuda")
    assert node_config_arg(cfg) == 'workers=3 device="cuda"'
    assert training_options(cfg) == {"workers": 3, "device": "cuda"}
    assert training_options({"data-dir": "/d"}) == {}


ORPHAN_SCRIPT = """
import os, sys, tempfile, time
from fedfsd.config import DPParams
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.models import build_model, get_weights
from fedfsd.privacy.distributed import train_distributed
from fedfsd.privacy.ledger import set_fault_hook

out = sys.argv[1]
tempfile.tempdir = out  # the killed parent cannot remove its worker store: pytest's tmp_path does

def hook(point, **ctx):
    if point == "worker-step":
        if ctx["step"] == 0:
            with open(os.path.join(out, f"pid-{ctx['rank']}"), "w") as fh:
                fh.write(str(os.getpid()))
        time.sleep(0.05)

set_fault_hook(hook)
frames = make_synthetic_frames(20, 4, seed=0)
w = get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))
params = DPParams(noise_multiplier=1.0, clip_norm=1.0, steps=100000, vehicles_per_step=5,
                  frames_per_vehicle=2, lr=0.1, update_norm_bound=1.0)
train_distributed(frames, "mlp", w, params, [], frames.n_vehicles, workers=2, seed=0)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's new parent may not have reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# About 10 s alone (a fresh interpreter imports torch); up to 25 s on a loaded 2-core machine.
def test_workers_stop_when_the_training_process_is_killed(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while len(_worker_pids(tmp_path)) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "the training process ended early"
            time.sleep(0.1)
        pids = _worker_pids(tmp_path)
        assert len(pids) == 2 and all(_running(p) for p in pids)
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup in the parent
        proc.wait()
    deadline = time.monotonic() + 15
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(p) for p in pids), "a worker outlived its killed parent"


def test_the_client_app_trains_with_the_workers_of_its_node_config(tmp_path: Path) -> None:
    """`region start --workers 2` reaches the training through the node config."""
    import time

    from flwr.app import Context, Message, Metadata, RecordDict

    from fedfsd import wire
    from fedfsd.aggregator.server_app import initial_weights
    from fedfsd.aggregator.settings import RunSettings
    from fedfsd.region.client_app import make_client_app

    settings = RunSettings(**{"local-steps": 2, "vehicles-per-step": 8, "frames-per-vehicle": 4})
    w = initial_weights(settings)
    md = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=5, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=600, message_type="train",
    )  # fmt: skip
    config = {**settings.train_request(), "run-id": "run-1", "round": 1}
    content = RecordDict(wire.packed_records(w, wire.CONFIG, config))
    app = make_client_app({"sim-vehicles": 40, "sim-frames": 6, "sim-ledger-dir": str(tmp_path)})
    node = {"partition-id": 1, "num-partitions": 2, "workers": 2}
    ctx = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})
    with distributed.tracing() as events:
        reply = app(Message(metadata=md, content=content), ctx)
    m = wire.manifest_from_bytes(reply.content.config_records[wire.MANIFEST][wire.MANIFEST_KEY])
    assert not m.refused_reason and m.steps == 2
    assert {e["rank"] for e in events} == {0, 1}  # two worker processes trained the round
