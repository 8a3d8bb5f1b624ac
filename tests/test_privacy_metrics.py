"""Nothing leaves a region outside its ledger (issue 12, items 1-4 and 7), against the real code.

- the crafted-evaluate probe: weights the region never received are refused; the received model
  gets at most one noised, ledgered answer per round (a retry returns the same answer);
- no metric leaves by default (policy, example policy, demo; rounds.jsonl of a real round loop);
- one outlier vehicle moves a released metric by at most its bound (plus the same noise);
- metric releases compose in the accountant history, the report and `verify`;
- a public, rounded-down fleet size is all that q, ε and the report reveal;
- `step(idx)` refuses caller-chosen batches in private mode; `supports_ghost` is strict.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict

from fedfsd import wire
from fedfsd.aggregator.server_app import initial_weights
from fedfsd.aggregator.settings import RunSettings
from fedfsd.config import DPParams, PolicyError, RegionPolicy, TrainRequest, load_policy
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.privacy.accounting import compute_epsilon, extend_history
from fedfsd.privacy.ledger import Ledger
from fedfsd.privacy.local_round import BudgetExceeded, run_local_round
from fedfsd.privacy.metrics import MetricRefused, noisy_means, release_metrics
from fedfsd.region.client_app import make_client_app
from fedfsd.region.evaluation import per_vehicle_scores

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = RunSettings(**{"local-steps": 2, "vehicles-per-step": 4, "frames-per-vehicle": 4})
SIM = {"partition-id": 1, "num-partitions": 2}


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return initial_weights(SETTINGS)


def _msg(kind: str, w: dict, run_id: str = "run-1", rnd: int = 1) -> Message:
    md = Metadata(
        run_id=1,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id=str(rnd),
        created_at=time.time(),
        ttl=600,
        message_type=kind,
    )
    config = {**SETTINGS.train_request(), "run-id": run_id, "round": rnd}
    content = RecordDict(wire.packed_records(w, wire.CONFIG, config))
    return Message(metadata=md, content=content)


def _ctx() -> Context:
    return Context(run_id=1, node_id=5, node_config=SIM, state=RecordDict(), run_config={})


def _lines(path: Path, kind: str) -> list[dict]:
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in recs if r.get("kind") == kind]


def _metrics(reply: Message) -> dict:
    return {
        k: v
        for k, v in reply.content.metric_records[wire.METRICS].items()
        if k != wire.NUM_EXAMPLES
    }


def _refusal(reply: Message) -> str:
    return str(reply.content.config_records[wire.REGION].get("refused_reason", ""))


def _app(tmp_path: Path, **extra) -> object:
    return make_client_app(
        {"sim-vehicles": 30, "sim-frames": 6, "sim-ledger-dir": str(tmp_path), **extra}
    )


# ---- 1. nothing but the update leaves by default -----------------------------------------------


def test_no_metric_is_allowed_by_default() -> None:
    from fedfsd.demo import DemoConfig

    assert (
        RegionPolicy(
            region="eu",
            epsilon_budget=8,
            delta=1e-6,
            min_noise_multiplier=1,
            max_clip_norm=1,
            update_norm_bound=5,
        ).allowed_metrics
        == []
    )
    assert load_policy(ROOT / "examples" / "policy-eu.toml").allowed_metrics == []
    assert tuple(DemoConfig().allowed_metrics) == ()


def test_default_train_reply_has_no_loss_and_evaluate_is_refused(tmp_path, weights) -> None:
    app = _app(tmp_path)
    reply = app(_msg("train", weights), _ctx())
    assert reply.content.array_records  # the update leaves
    assert _metrics(reply) == {}  # ... and nothing else
    ev = app(_msg("evaluate", weights), _ctx())
    assert _metrics(ev) == {} and "no metric allowed" in _refusal(ev)
    assert _lines(tmp_path / "run-1" / "sim1.jsonl", "metric") == []


class ClientAppGrid:
    """An in-memory Grid whose nodes are real region ClientApps (synthetic fleets)."""

    def __init__(self, app: object, nodes: int = 2) -> None:
        self.app, self.nodes = app, list(range(1, nodes + 1))
        self._ids = itertools.count()
        self._replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return self.nodes

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            mid = f"m{next(self._ids)}"
            ids.append(mid)
            node = m.metadata.dst_node_id
            md = Metadata(
                run_id=1,
                message_id=mid,
                src_node_id=0,
                dst_node_id=node,
                reply_to_message_id="",
                group_id=m.metadata.group_id,
                created_at=time.time(),
                ttl=600,
                message_type=m.metadata.message_type,
            )
            ctx = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1},
                state=RecordDict(),
                run_config={},
            )
            self._replies.append(self.app(Message(metadata=md, content=m.content), ctx))
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        wanted = set(ids)
        got = [r for r in self._replies if r.metadata.reply_to_message_id in wanted]
        self._replies = [r for r in self._replies if r not in got]
        return got


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **sim) -> list[dict]:
    from fedfsd.aggregator.server_app import run_federation
    from fedfsd.aggregator.settings import parse_settings
    from fedfsd.flower.message_objects import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    app = _app(tmp_path / "ledgers", **sim)
    s = parse_settings(
        {
            "num-server-rounds": 2,
            "min-regions": 2,
            "round-timeout": 60.0,
            "run-id": "rl",
            "local-steps": 1,
            "vehicles-per-step": 4,
            "frames-per-vehicle": 4,
        }
    )
    run_dir = tmp_path / "run"
    run_federation(ClientAppGrid(app), s, run_dir)  # type: ignore[arg-type]
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]


def test_rounds_jsonl_has_no_region_metrics_by_default(tmp_path, monkeypatch) -> None:
    rounds = _run(tmp_path, monkeypatch)
    assert [r["status"] for r in rounds] == ["ok", "ok"]
    assert all(r["metrics"] == {} for r in rounds)  # no metric from region data
    assert all(set(r["epsilon"]) == {"sim0", "sim1"} for r in rounds)  # run info stays
    assert not (tmp_path / "run" / "metrics.csv").read_text().strip().count("\n")


def test_allowed_metrics_reach_rounds_jsonl_as_ledgered_releases(tmp_path, monkeypatch) -> None:
    rounds = _run(tmp_path, monkeypatch, **{"sim-allowed-metrics": "fde"})
    assert all(set(r["metrics"]) == {"sim0/fde", "sim1/fde"} for r in rounds)
    led = tmp_path / "ledgers" / "rl" / "sim0.jsonl"
    ev = [r for r in _lines(led, "metric") if r["phase"] == "evaluate"]
    assert [r["round"] for r in ev] == [1, 2]
    assert [r["values"]["fde"] for r in ev] == [rounds[0]["metrics"]["sim0/fde"],
                                               rounds[1]["metrics"]["sim0/fde"]]  # fmt: skip


# ---- 2. the crafted-evaluate probe -------------------------------------------------------------


def _bias_shifted(w: dict, delta: float) -> dict:
    out = {k: v.copy() for k, v in w.items()}
    name = sorted(k for k in w if k.endswith("bias"))[-1]  # the output layer's bias
    out[name][0] += np.float32(delta)
    return out


def test_crafted_evaluate_probe_is_refused_or_noised_once(tmp_path, weights) -> None:
    app = _app(tmp_path, **{"sim-allowed-metrics": "loss"})
    led = tmp_path / "run-1" / "sim1.jsonl"
    # Before any training in this run, even the "right" weights are refused.
    assert "no update released" in _refusal(app(_msg("evaluate", weights), _ctx()))
    app(_msg("train", weights), _ctx())  # the region received `weights` for round 1
    eps_after_train, hist_after_train = Ledger(led).epsilon(), Ledger(led).history()

    # The audit's probe: three models that differ only in one output bias.
    probes = [_bias_shifted(weights, d) for d in (1.0, 2.0)]
    for w in probes:
        r = app(_msg("evaluate", w), _ctx())
        assert _metrics(r) == {} and "differ from the global model" in _refusal(r)
    first = app(_msg("evaluate", weights), _ctx())
    assert set(_metrics(first)) == {"loss"}
    # Noised: not the exact mean loss over the held-out frames.
    from fedfsd.region.evaluation import evaluate_weights

    test = make_synthetic_frames(30, 6, 1 + 10_000, region="sim1")
    assert _metrics(first)["loss"] != pytest.approx(evaluate_weights(test, weights, "mlp")["loss"])
    again = app(_msg("evaluate", weights), _ctx())
    assert _metrics(again) == _metrics(first)  # the same answer, not a fresh noise draw
    # A claimed later round for which nothing was trained is refused too.
    assert "no update released" in _refusal(app(_msg("evaluate", weights, rnd=2), _ctx()))

    lines = [r for r in _lines(led, "metric") if r["phase"] == "evaluate"]
    assert len(lines) == 1 and lines[0]["values"] == _metrics(first)
    assert Ledger(led).history() == extend_history(hist_after_train, 5.0, 1.0, 1)
    assert Ledger(led).epsilon() > eps_after_train  # the answer was paid for


def test_train_loss_leaves_only_as_a_ledgered_release(tmp_path, weights) -> None:
    app = _app(tmp_path, **{"sim-allowed-metrics": "loss"})
    reply = app(_msg("train", weights), _ctx())
    led = tmp_path / "run-1" / "sim1.jsonl"
    (line,) = _lines(led, "metric")
    assert line["phase"] == "train" and _metrics(reply) == line["values"]
    raw = _lines(led, "release")[0]["train_loss"]  # stays in the region
    assert _metrics(reply)["loss"] != pytest.approx(raw)
    app(_msg("train", weights), _ctx())  # a retried round: cached, no second metric line
    assert len(_lines(led, "metric")) == 1


# ---- 3. bounded contributions, accounting, budget ---------------------------------------------


def test_outlier_vehicle_moves_a_release_by_at_most_its_bound() -> None:
    base = np.full(50, 3.0)
    outlier = base.copy()
    outlier[7] = 1e6  # the audit's outlier: one vehicle with a huge loss
    bounds = {"loss": 10.0}
    a, n_a = noisy_means({"loss": base}, bounds, 5.0, np.random.default_rng(0))
    b, n_b = noisy_means({"loss": outlier}, bounds, 5.0, np.random.default_rng(0))
    assert n_a == n_b
    assert abs(b["loss"] - a["loss"]) <= bounds["loss"] / max(n_a, 1.0) + 1e-9
    # Without the clip the same vehicle would have moved the mean by ~2e4.
    assert (outlier.mean() - base.mean()) > 1e4


def _policy(**kw) -> RegionPolicy:
    base = {
        "region": "synthetic",
        "epsilon_budget": 20.0,
        "delta": 1e-5,
        "min_noise_multiplier": 1.0,
        "max_clip_norm": 1.0,
        "update_norm_bound": 5.0,
        "allowed_metrics": ["loss", "fde"],
    }
    return RegionPolicy(**{**base, **kw})


def _round(tmp_path: Path, policy: RegionPolicy, n: int = 40, **kw):
    frames = make_synthetic_frames(n, 6, seed=0)
    w = initial_weights(SETTINGS)
    req = TrainRequest(
        local_steps=3, noise_multiplier=1.0, vehicles_per_step=8, frames_per_vehicle=4
    )
    res = run_local_round(frames, policy, tmp_path / "l.jsonl", w, req, "r", 1, "mlp", seed=0, **kw)
    return frames, res


def test_metric_release_is_accounted_reported_and_verified(tmp_path) -> None:
    from fedfsd.privacy.report import build_report
    from fedfsd.privacy.report_checks import verify_report

    policy = _policy()
    frames, res = _round(tmp_path, policy)
    led = tmp_path / "l.jsonl"
    rel = release_metrics(
        led,
        policy,
        run_id="r",
        round_idx=1,
        phase="evaluate",
        model_sha256=wire.array_digest(res.new_weights),
        score=lambda: per_vehicle_scores(frames, res.new_weights, "mlp"),
    )
    hist = Ledger(led).history()
    assert hist[-1] == (policy.metric_noise_multiplier, 1.0, 1)
    assert rel.epsilon == pytest.approx(compute_epsilon(hist, policy.delta, "prv"))
    assert rel.epsilon > res.epsilon
    rep = build_report(led)
    assert [r.model for r in rep.releases] == ["mlp", "metric:evaluate:loss,fde"]
    assert rep.accounting.epsilon == pytest.approx(rel.epsilon, rel=1e-6)
    v = verify_report(rep)
    assert v.ok, v.problems
    from fedfsd.privacy.report_render import to_html

    assert "metrics (evaluate): loss,fde" in to_html(rep)
    # A report that drops the metric release from its history no longer verifies.
    del rep.accounting.history[-1]
    assert not verify_report(rep).ok
    # Scope: what leaves, the held-out vehicles, and the neighbours outside the unit.
    covered, not_covered = " ".join(rep.scope.covered), " ".join(rep.scope.not_covered)
    assert "what leaves the region" in covered and "metric release" in covered
    assert "held-out episodes" in covered
    assert "neighbours" in not_covered
    assert "without noise" not in covered + not_covered


def test_metric_release_over_budget_is_refused_and_not_recorded(tmp_path) -> None:
    frames, res = _round(tmp_path, _policy())
    led = tmp_path / "l.jsonl"
    tight = _policy(epsilon_budget=res.epsilon + 1e-3)
    with pytest.raises(BudgetExceeded):
        release_metrics(
            led,
            tight,
            run_id="r",
            round_idx=1,
            phase="evaluate",
            model_sha256="x",
            score=lambda: pytest.fail("scored although over budget"),
        )
    assert Ledger(led).metric_releases() == []
    with pytest.raises(MetricRefused):  # a policy without metrics releases nothing
        release_metrics(
            led,
            _policy(allowed_metrics=[]),
            run_id="r",
            round_idx=1,
            phase="evaluate",
            model_sha256="x",
            score=dict,
        )


# ---- 4. fleet coverage and the public fleet size -----------------------------------------------


def test_ledger_covers_every_vehicle_id_of_the_dataset(tmp_path) -> None:
    _, _ = _round(tmp_path, _policy(), fleet_vehicles=90)
    assert Ledger(tmp_path / "l.jsonl").header["vehicles"] == 90
    with pytest.raises(PolicyError, match="delta"):  # δ is checked against all 2,000 ids
        _round(tmp_path / "b", _policy(delta=1e-3), fleet_vehicles=2000)


def test_public_fleet_size_is_all_that_q_and_epsilon_reveal(tmp_path) -> None:
    from fedfsd.privacy.report import build_report

    _, exact = _round(tmp_path / "exact", _policy())
    _, public = _round(tmp_path / "public", _policy(public_fleet_size=32))
    assert exact.sample_rate == 8 / 40 and public.sample_rate == 8 / 32  # ≥ the true rate
    hist = [(1.0, 8 / 32, 3)]
    assert public.epsilon == pytest.approx(compute_epsilon(hist, 1e-5, "prv"))
    assert public.epsilon != pytest.approx(exact.epsilon)  # so ε no longer determines 40
    rep = build_report(tmp_path / "public" / "l.jsonl")
    assert rep.mechanism.vehicles == 32
    text = rep.statement + rep.accounting.delta_rule + " ".join(rep.scope.not_covered)
    assert not re.search(r"(?<![\d.])40(?![\d.])", text) and "public fleet size" in text
    assert all(r.vehicles == 32 for r in rep.releases)
    with pytest.raises(PolicyError, match="rounded DOWN"):
        _round(tmp_path / "over", _policy(public_fleet_size=41))


# ---- 7. small fixes ----------------------------------------------------------------------------


def test_caller_chosen_batch_is_refused_in_private_mode() -> None:
    from fedfsd.models import build_model
    from fedfsd.privacy.dpsgd import FixedBatchError, VehicleDPSGD

    frames = make_synthetic_frames(10, 4, seed=0)
    p = DPParams(
        noise_multiplier=1.0,
        clip_norm=1.0,
        steps=1,
        vehicles_per_step=4,
        frames_per_vehicle=2,
        lr=0.1,
        update_norm_bound=5.0,
    )
    model = build_model("mlp", frames.features.shape[1], frames.labels.shape[1])
    tr = VehicleDPSGD(model, p, frames.n_vehicles, seed=0)
    with pytest.raises(FixedBatchError):
        tr.step(frames, np.arange(4))
    assert tr.history == []  # nothing was stepped or accounted
    tr.step_fixed_batch(frames, np.arange(4))  # benchmarks: allowed, but taints the trainer
    with pytest.raises(FixedBatchError):
        _ = tr.history
    plain = VehicleDPSGD(model, p, frames.n_vehicles, private=False, seed=0)
    assert plain.step(frames, np.arange(4)).n_vehicles == 4


def test_supports_ghost_accepts_only_proven_structures() -> None:
    from torch import nn

    from fedfsd.models import build_model
    from fedfsd.privacy.pervehicle import supports_ghost

    assert supports_ghost(build_model("mlp", 10, 7))
    assert supports_ghost(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert supports_ghost(build_model("bev_cnn", 10, 7, in_channels=2))  # conv ghost rules
    shared = nn.Linear(4, 4)
    assert not supports_ghost(nn.Sequential(shared, nn.GELU(), shared))  # applied twice
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    assert not supports_ghost(nn.Sequential(a, nn.GELU(), b))  # shared parameter
    assert not supports_ghost(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)))  # mixes frames
    assert not supports_ghost(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten()))
    assert not supports_ghost(nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 2)))

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.a(x))

    assert not supports_ghost(Twice())  # only Linear params, but a custom forward


def test_region_ledger_opens_with_every_vehicle_id_of_all_splits(tmp_path, weights) -> None:
    from fedfsd.data.generate import generate_dataset
    from fedfsd.data.profiles import RegionProfile, load_region
    from fedfsd.data.vehicles import load_vehicle_frames

    d = load_region("eu").model_dump(mode="json")
    d["traffic"]["vehicles_per_episode"] = 8
    d["episode"].update({"duration_s": 9.0, "warmup_s": 2.0})
    data = generate_dataset(
        RegionProfile.model_validate(d), 24, 5, 3, tmp_path / "data", workers=1, progress=False
    )
    ids = {s: set(load_vehicle_frames(data, split=s).vehicle_ids) for s in ("train", "val", "test")}
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'region = "eu"\nepsilon_budget = 50.0\ndelta = 1e-6\nmin_noise_multiplier = 0.8\n'
        "max_clip_norm = 1.0\nupdate_norm_bound = 5.0\n"
    )
    node = {"data-dir": str(data), "policy": str(policy), "ledger": str(tmp_path / "l.jsonl")}
    app = make_client_app()
    ctx = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})
    reply = app(_msg("train", weights), ctx)
    assert reply.content.array_records, _refusal(reply) if wire.REGION in reply.content else reply
    every = ids["train"] | ids["val"] | ids["test"]
    assert Ledger(tmp_path / "l.jsonl").header["vehicles"] == len(every)
    # q still divides by the training vehicles DP-SGD samples from.
    assert _lines(tmp_path / "l.jsonl", "release")[0]["vehicles"] == len(ids["train"])
