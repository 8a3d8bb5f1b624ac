"""Server optimisers (FedAdam), the round-0 model from a file, and a plan as run config.

The federation runs use the real round loop of `run_federation` with the in-memory grid of
test_apps_evaluate_every (train replies carry no update, so the global model stays the round-0
model: that is what these tests look at).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType
from test_apps_evaluate_every import AnsweringGrid

from fedfsd.aggregator import checkpoint as ck
from fedfsd.aggregator.initial_model import InitialModelError, file_sha256
from fedfsd.aggregator.server_app import initial_weights, registry_weights, run_federation
from fedfsd.aggregator.settings import SettingsError, parse_settings
from fedfsd.aggregator.strategy import FedAdam, FedAvgMomentum, make_server_optimizer
from fedfsd.flower.message_objects import TaskIdentity


def test_fedadam_matches_a_hand_computed_step() -> None:
    """Reddi et al. 2021, Alg. 2: m = β1 m + (1-β1)Δ, v = β2 v + (1-β2)Δ², w += η m/(√v + τ)."""
    opt = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    g = {"w": np.zeros(2, np.float32)}
    ups = [({"w": np.array([1.0, -2.0], np.float32)}, 1.0), ({"w": np.array([3.0, 0.0])}, 1.0)]
    w1 = opt.step(g, ups)  # Δ = [2, -1]; v₀ = τ²
    # 0.1·0.1·2 / (√(0.99e-6 + 0.01·4) + 1e-3) and the same for Δ = -1:
    np.testing.assert_allclose(w1["w"], [0.09950126236765867, -0.09900504888254247], rtol=1e-6)
    w2 = opt.step(w1, [({"w": np.array([-1.0, 1.0], np.float32)}, 5.0)])
    np.testing.assert_allclose(w2["w"], [0.13526140169751902, -0.09196630648569797], rtol=1e-6)
    assert w2["w"].dtype == np.float32


def test_fedadam_state_survives_a_checkpoint_and_resumes_identically(tmp_path: Path) -> None:
    ups = [({"w": np.array([0.5, -1.0], np.float32)}, 1.0)]
    a = FedAdam(server_lr=0.05)
    w1 = a.step({"w": np.zeros(2, np.float32)}, ups)
    ck.save_checkpoint(tmp_path, ck.Checkpoint(1, "r", w1, a.state_dict()))
    back = ck.load_checkpoint(tmp_path)
    assert back is not None and set(back.strategy_state) == {"adam_m/w", "adam_v/w"}
    b = FedAdam(server_lr=0.05)
    b.load_state_dict(back.strategy_state)
    np.testing.assert_array_equal(b.step(back.weights, ups)["w"], a.step(w1, ups)["w"])
    fresh = FedAdam(server_lr=0.05).step(back.weights, ups)["w"]
    assert not np.allclose(fresh, a.step(w1, ups)["w"])  # the state matters
    with pytest.raises(ValueError, match="FedAdam state"):
        FedAvgMomentum(momentum=0.5).load_state_dict(back.strategy_state)
    with pytest.raises(ValueError, match="not FedAdam"):
        FedAdam().load_state_dict({"w": np.ones(2, np.float32)})


def test_server_optimizer_settings() -> None:
    assert isinstance(make_server_optimizer("fedadam", server_lr=0.1), FedAdam)
    s = parse_settings({"server-optimizer": "fedavgm", "server-momentum": 0.9})
    assert s.server_optimizer == "fedavgm"
    with pytest.raises(SettingsError, match="server-momentum > 0"):
        parse_settings({"server-optimizer": "fedavgm"})
    with pytest.raises(SettingsError, match="server-optimizer"):
        parse_settings({"server-optimizer": "sgd"})


def _identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what Flower sets inside a ServerApp
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class RecordingGrid(AnsweringGrid):
    """Also keeps the ConfigRecord of every train message."""

    def __init__(self) -> None:
        super().__init__()
        self.train_configs: list[dict] = []

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == MessageType.TRAIN:
                self.train_configs.append(dict(m.content.config_records["config"]))
        return super().push_messages(messages)


def _run_cfg(**extra: object) -> dict:
    return {"num-server-rounds": 2, "min-regions": 1, "round-timeout": 5.0, "run-id": "t", **extra}


def test_round0_model_from_a_file_is_recorded_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _identity(monkeypatch)
    pretrained = {k: v + 0.25 for k, v in registry_weights(parse_settings({})).items()}
    model_file = tmp_path / "public.npz"
    np.savez(model_file, **pretrained)
    sha = file_sha256(model_file)
    s = parse_settings(_run_cfg(**{"initial-model": str(model_file)}))
    run_dir = tmp_path / "run"
    grid = RecordingGrid()
    state = run_federation(grid, s, run_dir)  # type: ignore[arg-type]
    # no update was accepted (empty replies), so the global model is still the file's
    for k, v in pretrained.items():
        np.testing.assert_array_equal(state.weights[k], v.astype(np.float32))
    assert ck.load_checkpoint(run_dir).meta["initial_model_sha256"] == sha
    rounds = [json.loads(x) for x in (run_dir / ck.ROUNDS_JSONL).read_text().splitlines()]
    assert [r["initial_model_sha256"] for r in rounds] == [sha, sha]
    assert [c["initial-model-sha256"] for c in grid.train_configs] == [sha] * 4  # 2 nodes
    # without a file, no key is sent and the registry model (zero residual) is round 0
    grid2 = RecordingGrid()
    run_federation(grid2, parse_settings(_run_cfg()), tmp_path / "run2")  # type: ignore[arg-type]
    assert all("initial-model-sha256" not in c for c in grid2.train_configs)
    assert ck.load_checkpoint(tmp_path / "run2").meta["initial_model_sha256"] == ""


def test_a_mismatching_round0_model_is_refused_in_one_line(tmp_path: Path) -> None:
    w = registry_weights(parse_settings({}))
    bad = dict(w)
    bad["net.0.weight"] = np.zeros((3, 3), np.float32)
    path = tmp_path / "bad.npz"
    np.savez(path, **bad)
    with pytest.raises(InitialModelError) as e:
        initial_weights(parse_settings({"initial-model": str(path)}))
    msg = str(e.value)
    assert "\n" not in msg and "(3, 3)" in msg and str(tuple(w["net.0.weight"].shape)) in msg
    np.savez(path, **{"other": np.zeros(2, np.float32)})
    with pytest.raises(InitialModelError, match=r"file has \[other\].*model has \[net"):
        initial_weights(parse_settings({"initial-model": str(path)}))
    with pytest.raises(SettingsError, match="absolute"):
        parse_settings({"initial-model": "relative.npz"})


def test_resume_with_another_server_optimizer_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _identity(monkeypatch)
    run_federation(AnsweringGrid(), parse_settings(_run_cfg()), tmp_path)  # type: ignore[arg-type]
    s = parse_settings(
        _run_cfg(**{"num-server-rounds": 3, "resume": True, "server-optimizer": "fedadam"})
    )
    with pytest.raises(RuntimeError, match="server-optimizer 'fedavg'"):
        run_federation(AnsweringGrid(), s, tmp_path)  # type: ignore[arg-type]


def test_region_records_the_round0_model_digest_in_its_ledger(tmp_path: Path) -> None:
    """The train config's initial-model-sha256 reaches the region's ledger record."""
    from fedfsd.config import parse_policy
    from fedfsd.data.testing import make_synthetic_frames
    from fedfsd.models import build_model, get_weights
    from fedfsd.privacy.ledger import Ledger
    from fedfsd.privacy.local_round import run_local_round
    from fedfsd.region.client_app import _request

    frames = make_synthetic_frames(40, 4, seed=0)
    policy = parse_policy(
        'region = "synthetic"\nepsilon_budget = 8.0\ndelta = 1e-3\nmin_noise_multiplier = 1.0\n'
        "max_clip_norm = 1.0\nupdate_norm_bound = 0.5\n"
    )
    w = get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))
    sha = "ab" * 32
    cfg = {"local-steps": 2, "vehicles-per-step": 8, "frames-per-vehicle": 4}
    led = tmp_path / "l.jsonl"
    run_local_round(
        frames, policy, led, w, _request({**cfg, "initial-model-sha256": sha}), "r", 1, "mlp"
    )
    run_local_round(frames, policy, led, w, _request(cfg), "r", 2, "mlp")
    rel = Ledger(led).releases()
    assert rel[0]["initial_model_sha256"] == sha and "initial_model_sha256" not in rel[1]
    with pytest.raises(ValueError):
        _request({"initial-model-sha256": "not-a-digest"})


def test_aggregator_run_takes_the_plan_and_explicit_flags_win(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedfsd.aggregator.cli import schedule_config
    from fedfsd.cli import app

    plan = tmp_path / "plan.json"
    cfg = {"num-server-rounds": 12, "local-steps": 40, "vehicles-per-step": 256, "lr": 0.2}
    plan.write_text(json.dumps({"vehicles": 9000, "run_config": cfg}))
    explicit = {"lr": 0.1, "local-steps": None, "clip-norm": None}
    assert schedule_config(plan, explicit) == {**cfg, "lr": 0.1}
    assert schedule_config(None, explicit) == {"lr": 0.1}  # the rest: run-config defaults
    s = parse_settings({**schedule_config(plan, explicit), "plan": ""})
    assert (s.num_server_rounds, s.local_steps, s.vehicles_per_step, s.lr) == (12, 40, 256, 0.1)
    plan.write_text(json.dumps({"run_config": {"min-regions": 1}}))
    res = CliRunner().invoke(
        app, ["aggregator", "run", "--dir", "/nonexistent", "--plan", str(plan)]
    )
    assert res.exit_code == 2 and "--plan" in res.output and "min-regions" in res.output
    assert "Traceback" not in res.output
