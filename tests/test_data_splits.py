"""Episode-level train / val / test splits (issue 18, item 3).

The test episodes must be the ones chosen before validation splits existed (so test numbers stay
comparable), val is carved out of the rest, and datasets whose manifest predates val keep their
old train/test split and refuse "val" with a clear message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedfsd.cli import app
from fedfsd.data import splits
from fedfsd.data.generate import generate_dataset
from fedfsd.data.profiles import RegionProfile, load_region
from fedfsd.data.validate import DatasetError, validate_dataset
from fedfsd.data.vehicles import load_vehicle_frames

runner = CliRunner()


def _legacy_test_choice(n_episodes: int, seed: int, fraction: float = 0.2) -> set[int]:
    """The test episodes as fedfsd chose them before validation splits (rule written out here,
    so a change to the library's rule cannot silently move the test set)."""
    if n_episodes < 2:
        return set()
    n_test = max(1, int(round(fraction * n_episodes)))
    rng = np.random.default_rng([seed, 4])
    return set(rng.choice(np.arange(n_episodes), size=n_test, replace=False).tolist())


def _manifest(seed: int, val: float | None = 0.1) -> dict:
    split = {"by": "episode", "test_fraction": 0.2, "seed": seed}
    if val is not None:
        split["val_fraction"] = val
    return {"seed": seed, "split": split}


@pytest.mark.parametrize("seed", [0, 7, 123])
def test_splits_partition_episodes_and_keep_the_test_set(seed: int) -> None:
    for n in range(1, 120):
        eps = np.arange(n)
        s = splits.split_episodes(_manifest(seed), eps)
        tr, va, te = set(s.train.tolist()), set(s.val.tolist()), set(s.test.tolist())
        assert tr.isdisjoint(va) and tr.isdisjoint(te) and va.isdisjoint(te)
        assert tr | va | te == set(range(n))
        assert te == _legacy_test_choice(n, seed)
        assert set(s.episodes("all").tolist()) == set(range(n))
        if n >= 5:
            assert va and tr, n
        if n >= 3:
            assert len(va) >= 1 and len(tr) >= 1
        assert len(va) == (0 if n < 3 else max(1, round(0.1 * n)))
        # An old manifest (no val_fraction): the same test set, train = everything else.
        old = splits.split_episodes(_manifest(seed, val=None), eps)
        assert set(old.test.tolist()) == te and set(old.train.tolist()) == tr | va
        with pytest.raises(splits.NoValidationSplit, match="predates validation splits"):
            old.episodes("val")


def test_val_depends_on_seed_and_is_reproducible() -> None:
    a = splits.split_episodes(_manifest(1), np.arange(50))
    b = splits.split_episodes(_manifest(1), np.arange(50))
    c = splits.split_episodes(_manifest(2), np.arange(50))
    np.testing.assert_array_equal(a.val, b.val)
    assert not np.array_equal(a.val, c.val)


def tiny(region: str) -> RegionProfile:
    d = load_region(region).model_dump(mode="json")
    d["traffic"]["vehicles_per_episode"] = 6
    d["episode"].update({"duration_s": 8.0, "warmup_s": 2.0})
    return RegionProfile.model_validate(d)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("splits") / "eu"
    return generate_dataset(tiny("eu"), 8, 6, 3, out, workers=1, progress=False)


def test_loaded_splits_are_disjoint_and_cover_everything(dataset: Path) -> None:
    m = validate_dataset(dataset)
    assert m["split"] == {"by": "episode", "val_fraction": 0.1, "test_fraction": 0.2, "seed": 3}
    fr = {s: load_vehicle_frames(dataset, s) for s in ("train", "val", "test", "all")}
    eps = {s: set(f.episodes.tolist()) for s, f in fr.items()}
    assert eps["val"] and eps["test"] and eps["train"]
    assert eps["train"].isdisjoint(eps["val"] | eps["test"]) and eps["val"].isdisjoint(eps["test"])
    assert eps["train"] | eps["val"] | eps["test"] == eps["all"]
    assert eps["test"] == _legacy_test_choice(6, 3)
    assert fr["train"].n_frames + fr["val"].n_frames + fr["test"].n_frames == fr["all"].n_frames
    # select_episodes on "all" gives exactly what the loader gives for a split.
    sub = fr["all"].select_episodes(sorted(eps["val"]))
    assert sub.vehicle_ids == fr["val"].vehicle_ids
    np.testing.assert_array_equal(sub.features, fr["val"].features)
    np.testing.assert_array_equal(sub.offsets, fr["val"].offsets)


def _as_old(dataset: Path, tmp_path: Path) -> Path:
    old = tmp_path / "old"
    shutil.copytree(dataset, old)
    m = json.loads((old / "manifest.json").read_text())
    m["split"] = {"by": "episode", "test_fraction": 0.2, "seed": m["seed"]}
    (old / "manifest.json").write_text(json.dumps(m))
    return old


def test_old_manifest_keeps_train_and_test_and_refuses_val(dataset: Path, tmp_path: Path) -> None:
    old = _as_old(dataset, tmp_path)
    new_test = load_vehicle_frames(dataset, "test")
    old_test = load_vehicle_frames(old, "test")
    np.testing.assert_array_equal(new_test.features, old_test.features)
    np.testing.assert_array_equal(new_test.labels, old_test.labels)
    old_train = load_vehicle_frames(old, "train")
    new_train_val = set(load_vehicle_frames(dataset, "train").episodes.tolist()) | set(
        load_vehicle_frames(dataset, "val").episodes.tolist()
    )
    assert set(old_train.episodes.tolist()) == new_train_val
    with pytest.raises(DatasetError, match="predates validation splits") as err:
        load_vehicle_frames(old, "val")
    assert "\n" not in str(err.value) and "regenerate" in str(err.value)
    res = runner.invoke(app, ["data", "stats", str(old)])
    assert res.exit_code == 0, res.output
    assert "predates validation splits" in " ".join(res.output.split())
    res = runner.invoke(app, ["data", "stats", str(old), "--split", "val"])
    assert res.exit_code == 2 and "predates validation splits" in " ".join(res.output.split())


def test_stats_lists_every_split(dataset: Path) -> None:
    res = runner.invoke(app, ["data", "stats", str(dataset), "--split", "val"])
    assert res.exit_code == 0, res.output
    counts = {s: load_vehicle_frames(dataset, s) for s in ("train", "val", "test")}
    lines = res.output.splitlines()
    for name, fr in counts.items():
        row = next(ln for ln in lines if ln.strip("│ ").startswith(name))
        cells = [c.strip() for c in row.split("│") if c.strip()]
        assert cells == [
            name,
            str(len(set(fr.episodes.tolist()))),
            str(fr.n_frames),
            str(fr.n_vehicles),
        ], row


def test_bad_val_fraction_is_refused(dataset: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    m = json.loads((bad / "manifest.json").read_text())
    for value in (-0.1, 0.8, "x"):
        m["split"]["val_fraction"] = value
        (bad / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(DatasetError, match="val_fraction"):
            validate_dataset(bad)


def test_val_split_needs_three_episodes(tmp_path: Path) -> None:
    ds = generate_dataset(tiny("us"), 4, 2, 1, tmp_path / "us", workers=1, progress=False)
    assert load_vehicle_frames(ds, "train").n_frames > 0
    with pytest.raises(DatasetError, match="split 'val' has no episodes"):
        load_vehicle_frames(ds, "val")


def test_large_datasets_stream_and_load_the_same_frames(dataset: Path, monkeypatch) -> None:
    """Above KEEP_ROWS the loader re-reads (and re-checks) files instead of keeping them."""
    from fedfsd.data import loader

    kept = {s: load_vehicle_frames(dataset, s) for s in ("train", "val", "all")}
    monkeypatch.setattr(loader, "KEEP_ROWS", 0)
    for s, a in kept.items():
        b = load_vehicle_frames(dataset, s)
        assert a.vehicle_ids == b.vehicle_ids
        for k in ("features", "labels", "offsets", "episodes"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    # A file changed between the passes is caught by the second pass's checksum.
    m = json.loads((dataset / "manifest.json").read_text())
    real = loader._read_checked

    def tamper(root, entry):  # noqa: ANN001
        p = root / entry["path"]
        p.write_bytes(p.read_bytes()[:-10])
        return real(root, entry)

    copy = dataset.parent / "tamper"
    shutil.copytree(dataset, copy)
    monkeypatch.setattr(loader, "_read_checked", tamper)
    with pytest.raises(DatasetError, match=m["files"][0]["path"].split("/")[-1]):
        load_vehicle_frames(copy, "all")


def test_train_share_matches_the_measured_fleets() -> None:
    """The share of vehicles with train frames sizes fleet_scale's generation: measured 97.2–97.5%
    at three appearances (README, Fleet data) and 69.5% at one (cn: 73,632 of 106,000)."""
    from fedfsd.data.splits import train_share

    assert 0.972 <= train_share(3.0) <= 0.975
    assert abs(train_share(1.0) - 73_632 / 106_000) < 0.01
    assert train_share(1.0) < train_share(2.0) < train_share(3.0) < 1.0
