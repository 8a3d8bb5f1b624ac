"""`fedfsd model pretrain`: non-private training on PUBLIC simulated data, selected on validation
episodes; region data is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from finetune_fixtures import tiny_dataset
from typer.testing import CliRunner

from fedfsd.aggregator.server_app import initial_weights
from fedfsd.aggregator.settings import RunSettings
from fedfsd.cli import app
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.data.vehicles import load_vehicle_frames
from fedfsd.modelhub.files import load_weights, weights_sha256
from fedfsd.modelhub.pretrain import (
    NonPublicData,
    check_public,
    pool_frames,
    pretrain_model,
    prior_start,
)
from fedfsd.region.evaluation import evaluate_weights


def _split(frames):
    eps = np.unique(frames.episodes)
    return frames.select_episodes(eps[eps % 4 != 0]), frames.select_episodes(eps[eps % 4 == 0])


def test_pool_keeps_every_vehicle_distinct() -> None:
    a = make_synthetic_frames(5, 7, seed=1, region="public")
    b = make_synthetic_frames(3, 4, seed=2, region="public")
    p = pool_frames([a, b])
    assert p.n_vehicles == 8 and p.n_frames == 47 and len(set(p.vehicle_ids)) == 8
    assert np.array_equal(p.features[p.offsets[5] : p.offsets[6]], b.features[:4])
    assert len(np.unique(p.episodes)) == len(np.unique(a.episodes)) + len(np.unique(b.episodes))


def test_pretrain_selects_on_pooled_validation_and_beats_its_start() -> None:
    fleets = [make_synthetic_frames(40, 40, seed=s, region="public") for s in (1, 2)]
    trains, vals = zip(*(_split(f) for f in fleets), strict=True)
    w, info = pretrain_model(
        list(trains), list(vals), "mlp", steps=150, lr=0.1, vehicles_per_step=16, seed=0
    )
    pooled_val = pool_frames(list(vals))
    start = prior_start(pool_frames(list(trains)), "mlp")
    assert info["val_fde_start"] == pytest.approx(evaluate_weights(pooled_val, start, "mlp")["fde"])
    assert info["val_fde"] < 0.5 * info["val_fde_start"] and info["best_step"] > 0
    assert evaluate_weights(pooled_val, w, "mlp")["fde"] == pytest.approx(info["val_fde"])
    assert [s["fleet_id"] for s in info["sources"]] == [f.fleet_id for f in fleets]
    assert info["weights_sha256"] == weights_sha256(w)


def test_the_start_is_the_prior_alone() -> None:
    frames = make_synthetic_frames(4, 4, seed=1)
    w = prior_start(frames, "mlp")
    last = max(int(k.split(".")[1]) for k in w if k.startswith("net."))
    assert not w[f"net.{last}.weight"].any() and not w[f"net.{last}.bias"].any()


def test_region_data_is_refused() -> None:
    with pytest.raises(NonPublicData, match="must never be pooled"):
        check_public({"region": "eu"}, "eu-data")
    check_public({"region": "eu"}, "eu-data", allow_nonpublic=True)
    check_public({"region": "public"}, "pub")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pretrain")
    return {
        "public": [tiny_dataset(root, "public", seed=s) for s in (11, 12)],
        "eu": tiny_dataset(root, "eu", seed=13),
    }


def _pretrain(*args: str):
    return CliRunner().invoke(app, ["model", "pretrain", *args])


def test_cli_refuses_region_data_with_one_line(datasets, tmp_path) -> None:
    out = tmp_path / "m.npz"
    r = _pretrain(
        "--data", str(datasets["public"][0]), "--data", str(datasets["eu"]), "--out", str(out)
    )
    assert r.exit_code != 0 and not out.exists()
    assert "'eu', not 'public'" in r.output and "must never be pooled" in r.output
    assert "Traceback" not in r.output


def test_cli_pretrains_on_public_data_and_writes_a_model_the_aggregator_can_load(
    datasets, tmp_path
) -> None:
    out = tmp_path / "public.npz"
    args = [f"--data={d}" for d in datasets["public"]]
    r = _pretrain(*args, "--out", str(out), "--steps", "120", "--vehicles-per-step", "8",
                  "--seed", "0", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    side = json.loads(out.with_suffix(".json").read_text())
    assert json.loads(r.stdout) == side
    w = load_weights(out)
    assert side["weights_sha256"] == weights_sha256(w)
    assert [s["region"] for s in side["sources"]] == ["public", "public"]
    assert len({s["fleet_id"] for s in side["sources"]}) == 2
    assert side["steps"] == 120 and "outside every region" in side["data"]
    assert side["val_fde"] <= side["val_fde_start"]
    # Same names and shapes as the aggregator's own round-0 model: usable as its initial model.
    ref = initial_weights(RunSettings())
    assert {k: v.shape for k, v in w.items()} == {k: v.shape for k, v in ref.items()}
    vals = [load_vehicle_frames(d, "val") for d in datasets["public"]]
    assert evaluate_weights(pool_frames(vals), w, "mlp")["fde"] == pytest.approx(side["val_fde"])


def test_report_states_a_pretrained_start_as_public_data_outside_epsilon(tmp_path) -> None:
    from fedfsd.config import RegionPolicy, TrainRequest
    from fedfsd.models import build_model, get_weights
    from fedfsd.privacy.ledger import Ledger
    from fedfsd.privacy.local_round import run_local_round
    from fedfsd.privacy.report import build_report

    frames = make_synthetic_frames(20, 6, seed=1, region="eu")
    policy = RegionPolicy(
        region="eu", epsilon_budget=20.0, delta=1e-3, min_noise_multiplier=1.0, max_clip_norm=1.0,
        update_norm_bound=5.0, max_local_steps=2, max_vehicles_per_step=4,
    )  # fmt: skip
    w = get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))
    req = TrainRequest(local_steps=2, vehicles_per_step=4, frames_per_vehicle=2)
    path = tmp_path / "l.jsonl"
    res = run_local_round(frames, policy, path, w, req, "run-1", 1, "mlp", seed=0)
    assert not any("initial model" in s for s in build_report(path).scope.not_covered)
    # A later release that records the aggregator's initial model (as run_local_round does when
    # the train request names one): same mechanism, history extended by its steps.
    rec = {**res.record, "round": 2, "initial_model_sha256": "ab" * 32}
    rec["accountant_history"] = [[h[0], h[1], h[2] * 2] for h in res.record["accountant_history"]]
    Ledger(path).append(rec)
    said = [s for s in build_report(path).scope.not_covered if "initial model" in s]
    assert said and "abababababab" in said[0]
    assert "public simulated data" in said[0] and "outside this ε" in said[0]
