"""Model hand-off (issue 19): evaluate in the region, export for the vehicle, run tracking.

Against the real code: datasets come from the simulator (a custom profile TOML), the run from
the real round loop with real region ClientApps, the event files are read back with
tensorboard's own reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from finetune_fixtures import tiny_dataset, tiny_profile
from typer.testing import CliRunner

from fedfsd.cli import app
from fedfsd.models import build_model, get_weights, prior_only_weights

TOL = 1e-4


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _trained_mlp(n_features: int = 45) -> dict[str, np.ndarray]:
    """Registry MLP with a non-zero residual (so the model and the prior differ)."""
    w = get_weights(build_model("mlp", n_features, 7))
    rng = np.random.default_rng(7)
    return {k: v + 0.02 * rng.standard_normal(v.shape).astype(np.float32) for k, v in w.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fedfsd.data.generate import generate_dataset

    root = tmp_path_factory.mktemp("handoff")
    bev = root / "bev"
    generate_dataset(
        tiny_profile(root, "bevland"), 8, 4, 5, bev, workers=1, progress=False, with_bev=True
    )
    mlp = root / "mlp.npz"
    np.savez(mlp, **_trained_mlp())  # a bare state-dict, like global_model.npz before issue 19
    cnn = root / "cnn.npz"
    np.savez(cnn, **get_weights(build_model("bev_cnn", 0, 7, in_channels=2, seed=3)))
    return {"eu": tiny_dataset(root, "custom", seed=21), "bev": bev, "mlp": mlp, "cnn": cnn}


# ---- evaluate -----------------------------------------------------------------------------------


def test_evaluate_gives_the_in_region_numbers_for_model_and_prior(data) -> None:
    from fedfsd.data.vehicles import load_vehicle_frames
    from fedfsd.modelhub.files import load_weights
    from fedfsd.region.evaluation import evaluate_weights

    r = _cli("model", "evaluate", "--model", str(data["mlp"]), "--data", str(data["eu"]), "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert set(got) == {"model", "constant_velocity", "frames", "vehicles", "dataset"}
    frames = load_vehicle_frames(data["eu"], split="test")
    w = load_weights(data["mlp"])
    want = evaluate_weights(frames, w, "mlp")
    prior = evaluate_weights(frames, prior_only_weights(w), "mlp")
    for k in ("ade", "fde", "accel_mae", "loss"):
        assert got["model"][k] == pytest.approx(want[k], rel=1e-12)
        assert got["constant_velocity"][k] == pytest.approx(prior[k], rel=1e-12)
    assert got["model"]["ade"] != pytest.approx(got["constant_velocity"]["ade"], rel=1e-3)
    assert got["frames"] == frames.n_frames and got["vehicles"] == frames.n_vehicles
    d = got["dataset"]
    assert (d["region"], d["fleet_id"], d["schema_version"]) == ("custom", frames.fleet_id, 1)
    assert d["profile"] == "custom" and d["split"] == "test"


def test_evaluate_the_bev_cnn_and_the_prior_on_its_frames(data) -> None:
    from fedfsd.data.feature_spec import LABEL_SCALES, constant_velocity_labels
    from fedfsd.data.vehicles import load_vehicle_frames
    from fedfsd.modelhub.files import load_weights
    from fedfsd.region.evaluation import evaluate_weights, score_predictions

    r = _cli(
        "model", "evaluate", "--model", str(data["cnn"]), "--data", str(data["bev"]),
        "--split", "all", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    frames = load_vehicle_frames(data["bev"], split="all")
    want = evaluate_weights(frames, load_weights(data["cnn"]), "bev_cnn")
    prior = score_predictions(
        constant_velocity_labels(frames.features), frames.labels, np.asarray(LABEL_SCALES)
    )
    assert got["model"]["fde"] == pytest.approx(want["fde"], rel=1e-12)
    assert got["constant_velocity"]["fde"] == pytest.approx(prior["fde"], rel=1e-12)


def test_the_table_says_nothing_left(data) -> None:
    r = _cli("model", "evaluate", "--model", str(data["mlp"]), "--data", str(data["eu"]))
    assert r.exit_code == 0, r.output
    assert "constant-velocity prior" in r.stdout and "nothing left this machine" in r.stdout


def _one_error_line(r) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_mismatched_model_and_dataset_are_refused_naming_both(data, tmp_path) -> None:
    small = tmp_path / "ten.npz"
    np.savez(small, **_trained_mlp(10))
    r = _cli("model", "evaluate", "--model", str(small), "--data", str(data["eu"]))
    assert r.exit_code == 2
    line = _one_error_line(r)
    assert str(small) in line and str(data["eu"]) in line
    assert "10 features" in line and "object-list v1 (45 features)" in line

    r = _cli("model", "evaluate", "--model", str(data["cnn"]), "--data", str(data["eu"]))
    assert r.exit_code == 2
    assert "no BEV rasters" in _one_error_line(r)

    # same feature count, other scales: a model file stating another schema is refused too
    from fedfsd.modelhub.files import save_model
    from fedfsd.modelhub.schema import feature_schema

    other = feature_schema()
    other["feature_scales"] = [s * 2 for s in other["feature_scales"]]
    other["version"] = 2
    moved = tmp_path / "v2.npz"
    save_model(moved, _trained_mlp(), {"feature_schema": other, "model": "mlp"})
    r = _cli("model", "evaluate", "--model", str(moved), "--data", str(data["eu"]))
    assert r.exit_code == 2
    line = _one_error_line(r)
    assert "object-list v2 (45 features)" in line and "object-list v1 (45 features)" in line


def test_damaged_dataset_is_refused_as_validate_refuses_it(data, tmp_path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(data["eu"], bad)
    victim = sorted((bad / "tracks").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    v = _cli("data", "validate", str(bad))
    r = _cli("model", "evaluate", "--model", str(data["mlp"]), "--data", str(bad))
    assert v.exit_code != 0 and r.exit_code != 0
    line = _one_error_line(r)
    assert "unreadable Parquet" in line
    assert line == " ".join(v.stderr.split())


def test_replaced_weights_and_newer_formats_are_refused(data, tmp_path) -> None:
    from fedfsd.modelhub.files import save_model

    m = tmp_path / "m.npz"
    save_model(m, _trained_mlp(), {"model": "mlp"})
    np.savez(m, **prior_only_weights(_trained_mlp()))  # weights replaced, sidecar kept
    r = _cli("model", "evaluate", "--model", str(m), "--data", str(data["eu"]))
    assert r.exit_code == 4 and "sha256" in _one_error_line(r)

    save_model(m, _trained_mlp(), {"model": "mlp", "format_version": 99})
    r = _cli("model", "evaluate", "--model", str(m), "--data", str(data["eu"]))
    assert r.exit_code == 2 and "newer" in _one_error_line(r)


def test_feature_scales_turn_features_back_into_physical_units(data) -> None:
    """The export divides by these scales: they must be featurisation's (checked on real rows)."""
    import pyarrow.parquet as pq

    from fedfsd.data.feature_spec import FEATURE_NAMES
    from fedfsd.data.vehicles import load_vehicle_frames
    from fedfsd.modelhub.schema import feature_scales

    scales = np.asarray(feature_scales()[0])
    raw = load_vehicle_frames(data["eu"], split="all").features * scales
    rows = pq.read_table(sorted((data["eu"] / "tracks").glob("*.parquet"))).to_pandas()
    rows = rows[rows.is_fleet]
    col = {n: raw[:, FEATURE_NAMES.index(n)] for n in ("speed_limit", "ego_length", "lane_count")}
    assert np.allclose(np.unique(col["speed_limit"]), np.unique(rows.speed_limit), atol=1e-4)
    assert set(np.round(col["ego_length"], 3)) <= set(np.round(rows.length.unique(), 3))
    assert set(np.round(col["lane_count"])) <= set(rows.n_lanes.unique())


# ---- export -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_export_parity_on_real_frames(data, tmp_path, fmt: str, kind: str) -> None:
    from fedfsd.data.vehicles import load_vehicle_frames
    from fedfsd.modelhub.export import export_model
    from fedfsd.modelhub.meta import load_model

    ds = data["eu" if kind == "mlp" else "bev"]
    frames = load_vehicle_frames(ds, split="all")
    info = export_model(load_model(data[kind]), fmt, tmp_path / f"m.{fmt}", frames)
    assert info["parity"]["source"] == "dataset frames" and info["parity"]["frames"] > 100
    assert info["parity"]["max_abs_diff"] <= TOL
    assert (tmp_path / f"m.{fmt}").stat().st_size == info["bytes"] > 0


def test_exported_graph_holds_prior_and_scaling(data, tmp_path) -> None:
    """A zero-residual model exported to ONNX predicts constant velocity from physical inputs."""
    import onnxruntime as ort

    from fedfsd.data.feature_spec import constant_velocity_labels
    from fedfsd.data.vehicles import load_vehicle_frames
    from fedfsd.modelhub.export import export_model
    from fedfsd.modelhub.meta import load_model
    from fedfsd.modelhub.schema import feature_scales

    prior = tmp_path / "prior.npz"
    np.savez(prior, **prior_only_weights(_trained_mlp()))
    export_model(load_model(prior), "onnx", tmp_path / "p.onnx")
    frames = load_vehicle_frames(data["eu"], split="test")
    raw = (frames.features * np.asarray(feature_scales()[0], np.float32)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"features_raw": raw})[0]
    np.testing.assert_allclose(got, constant_velocity_labels(frames.features), atol=TOL)
    assert np.abs(got[:, 4]).max() > 20.0  # dx_3s in metres, not scaled units


def test_export_cli_writes_graph_card_and_reports_parity(data, tmp_path) -> None:
    ev = tmp_path / "ev.json"
    r = _cli("model", "evaluate", "--model", str(data["mlp"]), "--data", str(data["eu"]), "--json")
    ev.write_text(r.stdout)
    out = tmp_path / "vehicle" / "model.onnx"
    r = _cli(
        "model", "export", "--model", str(data["mlp"]), "--format", "onnx", "--out", str(out),
        "--data", str(data["eu"]), "--evaluation", str(ev),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "max abs diff" in r.stdout
    card = json.loads(Path(f"{out}.card.json").read_text())
    assert card["model"]["parameters"] == sum(v.size for v in np.load(data["mlp"]).values())
    assert card["feature_schema"]["version"] == 1 and len(card["feature_schema"]["features"]) == 45
    assert card["feature_schema"]["feature_scales"][0] == 30.0
    assert card["export"]["parity"]["max_abs_diff"] <= TOL
    assert card["evaluation"][0]["model"] == json.loads(ev.read_text())["model"]
    assert card["code_version"]["fedfsd"]
    md = Path(f"{out}.card.md").read_text()
    assert "constant-velocity" in md and card["model"]["weights_sha256"] in md


# ---- a real run: sidecar, card, TensorBoard -----------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_privacy_metrics import ClientAppGrid, _app

    from fedfsd.aggregator.server_app import run_federation
    from fedfsd.aggregator.settings import parse_settings
    from fedfsd.flower.message_objects import TaskIdentity

    tmp = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setattr(TaskIdentity, "_run_id", 1)
    mp.setattr(TaskIdentity, "_node_id", 0)
    mp.setattr(TaskIdentity, "_task_id", 1)
    try:
        app_ = _app(tmp / "ledgers", **{"sim-allowed-metrics": "fde"})
        s = parse_settings(
            {
                "num-server-rounds": 2,
                "min-regions": 2,
                "round-timeout": 60.0,
                "run-id": "tb",
                "local-steps": 1,
                "vehicles-per-step": 4,
                "frames-per-vehicle": 4,
            }
        )
        run_federation(ClientAppGrid(app_), s, tmp / "run")  # type: ignore[arg-type]
    finally:
        mp.undo()
    return tmp / "run"


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_run_writes_per_round_scalars_to_tensorboard(run_dir) -> None:
    sc = _scalars(run_dir / "tensorboard")
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [s for s, _ in sc["regions/accepted"]] == [1, 2]
    assert [v for _, v in sc["regions/accepted"]] == [len(r["accepted"]) for r in rounds] == [2, 2]
    assert [v for _, v in sc["regions/rejected"]] == [0, 0]
    assert [v for _, v in sc["round/seconds"]] == pytest.approx([r["seconds"] for r in rounds])
    for region in ("sim0", "sim1"):
        eps = [v for _, v in sc[f"epsilon/{region}"]]
        assert eps == pytest.approx([r["epsilon"][region] for r in rounds], rel=1e-6)
        assert eps[1] > eps[0] > 0
        assert all(0 < v <= 5.0 + 1e-6 for _, v in sc[f"update_norm/{region}"])
        fde = [v for _, v in sc[f"eval/fde/{region}"]]
        assert fde == pytest.approx([r["metrics"][f"{region}/fde"] for r in rounds], rel=1e-6)


def test_run_writes_a_model_sidecar_and_the_card_states_the_run(run_dir, tmp_path) -> None:
    side = json.loads((run_dir / "global_model.json").read_text())
    assert side["architecture"]["name"] == "mlp" and side["run"]["rounds"] == 2
    out = tmp_path / "g.pt"
    r = _cli("model", "export", "--model", str(run_dir / "global_model.npz"), "--format",
             "torchscript", "--out", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    card = json.loads(Path(f"{out}.card.json").read_text())
    assert card["training"]["rounds"] == 2 and card["training"]["regions"] == ["sim0", "sim1"]
    eps = card["privacy"]["epsilon_per_region"]
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert eps["sim0"]["epsilon"] == pytest.approx(rounds[-1]["epsilon"]["sim0"])
    assert "epsilon.csv round 2" in eps["sim0"]["source"]
    assert card["model"]["weights_sha256"] == side["weights_sha256"]
    assert card["export"]["parity"]["max_abs_diff"] <= TOL
    assert card["training"]["run_id"] == "tb"
    fed = card["federation_metrics"]
    assert fed["round"] == 2 and fed["metrics"] == rounds[-1]["metrics"]
    assert "Released by the regions" in Path(f"{out}.card.md").read_text()

    old = tmp_path / "old-run"  # a run from before the sidecar: the card reads the run dir
    shutil.copytree(run_dir, old)
    (old / "global_model.json").unlink()
    r = _cli("model", "export", "--model", str(old / "global_model.npz"), "--format", "onnx",
             "--out", str(tmp_path / "o.onnx"))  # fmt: skip
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "o.onnx.card.json").read_text())
    assert again["privacy"]["epsilon_per_region"] == card["privacy"]["epsilon_per_region"]
    assert again["training"]["run_id"] == "tb" and again["training"]["rounds"] == 2
    assert str(old) in again["training"]["source"]


def test_results_documents_go_to_tensorboard(tmp_path) -> None:
    from fedfsd.aggregator.tracking import log_document

    doc = {"rows": [{"round": 1, "fde": 2.0}, {"round": 2, "fde": 1.5}], "eps": 3.0, "ok": True}
    assert log_document(tmp_path / "tb", "study", doc) == 3
    sc = _scalars(tmp_path / "tb")
    assert sc["study/rows/fde"] == [(1, 2.0), (2, 1.5)] and sc["study/eps"] == [(0, 3.0)]


def test_a_resumed_run_purges_events_after_its_checkpoint(run_dir, tmp_path, monkeypatch) -> None:
    from test_privacy_metrics import ClientAppGrid, _app

    from fedfsd.aggregator.server_app import run_federation
    from fedfsd.aggregator.settings import parse_settings
    from fedfsd.flower.message_objects import TaskIdentity

    for k, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, k, v)
    again = tmp_path / "run"
    shutil.copytree(run_dir, again)
    shutil.copytree(run_dir.parent / "ledgers", tmp_path / "ledgers")
    from torch.utils.tensorboard import SummaryWriter

    stale = SummaryWriter(str(again / "tensorboard"))  # round 3 logged, then a crash before
    stale.add_scalar("regions/accepted", 9.0, 3)  # its checkpoint: the resume runs it again
    stale.close()
    s = parse_settings(
        {
            "num-server-rounds": 3,
            "min-regions": 2,
            "round-timeout": 60.0,
            "run-id": "tb",
            "resume": True,
            "local-steps": 1,
            "vehicles-per-step": 4,
            "frames-per-vehicle": 4,
        }
    )
    app_ = _app(tmp_path / "ledgers", **{"sim-allowed-metrics": "fde"})
    run_federation(ClientAppGrid(app_), s, again)  # type: ignore[arg-type]
    sc = _scalars(again / "tensorboard")
    assert sc["regions/accepted"] == [(1, 2.0), (2, 2.0), (3, 2.0)]  # the stale 9.0 purged
    assert [s for s, _ in sc["epsilon/sim0"]] == [1, 2, 3]
