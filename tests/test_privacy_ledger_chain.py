"""The hash-chained, signed ledger: edits, deletions and reorders are found; a torn tail is
dropped only when its release provably never left (issue 12 item 5, issue 20 item 2)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fedfsd.config import TrainRequest, parse_policy
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.models import build_model, get_weights
from fedfsd.privacy import signing
from fedfsd.privacy.ledger import Ledger, LedgerError
from fedfsd.privacy.local_round import run_local_round

POLICY = parse_policy(
    """
region = "synthetic"
epsilon_budget = 50.0
delta = 1e-3
min_noise_multiplier = 1.0
max_clip_norm = 1.0
update_norm_bound = 0.5
"""
)
REQ = TrainRequest(
    local_steps=2, lr=0.05, noise_multiplier=1.0, vehicles_per_step=10, frames_per_vehicle=4
)


@pytest.fixture(scope="module")
def frames():
    return make_synthetic_frames(60, 4, seed=0)


@pytest.fixture(scope="module")
def weights(frames):
    return get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))


def train(frames, weights, led, rnd, run="run-a"):
    return run_local_round(frames, POLICY, led, weights, REQ, run, rnd, "mlp", seed=rnd)


@pytest.fixture(scope="module")
def five_lines(tmp_path_factory, frames, weights):
    """A ledger of 5 lines (open + 4 releases, each released), as bytes plus its side files."""
    d = tmp_path_factory.mktemp("five")
    led = d / "eu.jsonl"
    for r in range(1, 5):
        train(frames, weights, led, r)
    return led


def copy_ledger(src, dst_dir):
    """The ledger, its key and its release directory, copied (the attacks edit the copy)."""
    import shutil

    dst = dst_dir / src.name
    shutil.copy2(src, dst)
    shutil.copy2(src.with_name(src.name + ".key"), dst.with_name(dst.name + ".key"))
    shutil.copytree(src.with_name(src.name + ".releases"), dst.with_name(dst.name + ".releases"))
    return dst


def test_every_line_is_chained_and_signed(five_lines):
    lg = Ledger(five_lines)
    lines = [json.loads(x) for x in five_lines.read_text().splitlines()]
    assert lines[0]["prev"] == "" and lines[0]["chain"] and lines[0]["public_key"]
    hashes = lg.line_hashes()
    for i in range(1, 5):
        assert lines[i]["prev"] == hashes[i - 1]
        assert signing.verify(
            signing.parse_public_key(lines[0]["public_key"]),
            {k: v for k, v in lines[i].items() if k != "sig"},
            lines[i]["sig"],
        )
    assert lg.head == hashes[-1] and lg.ledger_id == hashes[0]
    assert lg.release_proof("run-a", 3) == {
        "ledger_id": hashes[0],
        "ledger_seq": 4,
        "ledger_head": hashes[3],
    }
    key = five_lines.with_name("eu.jsonl.key")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_edited_deleted_reordered_lines_name_the_line(tmp_path, five_lines):
    raw = five_lines.read_text().splitlines(keepends=True)
    led = tmp_path / "l.jsonl"
    edited = json.loads(raw[2])
    edited["train_loss"] = 0.0  # an edit that keeps the accountant history consistent
    cases = {
        "edit": [raw[0], raw[1], json.dumps(edited) + "\n", *raw[3:]],
        "reorder": [raw[0], raw[2], raw[1], *raw[3:]],
        "header-edit": [raw[0].replace('"epsilon_budget": 50.0', '"epsilon_budget": 99.0')]
        + raw[1:],
    }
    led.write_text("".join(cases["edit"]))
    with pytest.raises(LedgerError, match=r":3: bad signature"):
        Ledger(led).records()
    led.write_text("".join(cases["reorder"]))
    with pytest.raises(LedgerError, match=r":2: "):
        Ledger(led).records()
    led.write_text("".join(cases["header-edit"]))
    with pytest.raises(LedgerError, match=r":1: bad signature"):
        Ledger(led).records()
    # Dropping a middle line and re-chaining is impossible without the key: the next line
    # names the dropped line's hash.
    led.write_text("".join([raw[0], raw[1], raw[3]]))
    with pytest.raises(LedgerError, match=r":3: "):
        Ledger(led).records()


def test_cut_mid_line_3_of_5_refuses_to_train(tmp_path, frames, weights, five_lines):
    led = copy_ledger(five_lines, tmp_path)
    data = led.read_bytes()
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    cut = starts[2] + (starts[3] - starts[2]) // 2  # the middle of line 3
    led.write_bytes(data[:cut])
    lg = Ledger(led)
    assert len(lg.releases()) == 1 and lg.torn_tail  # today's loader silently forgot 3 of 4
    with pytest.raises(LedgerError, match=r"run 'run-a' round 2 was released .* line 3 is torn"):
        train(frames, weights, led, 5)
    assert led.read_bytes() == data[:cut]  # nothing cut, nothing appended


def test_deleted_last_line_is_found_by_its_release_marker(tmp_path, frames, weights, five_lines):
    led = copy_ledger(five_lines, tmp_path)
    lines = led.read_bytes().splitlines(keepends=True)
    led.write_bytes(b"".join(lines[:-1]))  # a clean cut at a newline: the chain alone is fine
    with pytest.raises(LedgerError, match=r"round 4 was released .* not on the ledger"):
        train(frames, weights, led, 5)


def test_garbage_without_newline_refuses_to_train(tmp_path, frames, weights, five_lines):
    led = copy_ledger(five_lines, tmp_path)
    led.write_bytes(led.read_bytes() + b"garbage")
    with pytest.raises(LedgerError, match=r":6: 7 bytes without a newline .* tampering"):
        train(frames, weights, led, 5)
    assert led.read_bytes().endswith(b"garbage")


def test_torn_write_of_an_unsent_release_is_dropped(tmp_path, frames, weights, five_lines):
    led = copy_ledger(five_lines, tmp_path)
    good = led.read_bytes()
    train(frames, weights, led, 5)
    nxt = led.read_bytes()[len(good) :]
    # The crash happened mid-write: no marker yet (it follows the fsync'd line).
    (Ledger(led).cache_dir / (Ledger(led).cache_path("run-a", 5).stem + ".released")).unlink()
    led.write_bytes(good + nxt[: len(nxt) // 3])
    res = train(frames, weights, led, 5)  # the round is trained again and recorded once
    lg = Ledger(led)
    assert lg.torn_tail is None and [r["round"] for r in lg.releases()] == [1, 2, 3, 4, 5]
    assert not res.cached


def test_a_second_key_cannot_append(tmp_path, frames, weights, five_lines):
    led = copy_ledger(five_lines, tmp_path)
    signing.generate_key(led.with_name(led.name + ".key"), overwrite=True)
    with pytest.raises(LedgerError, match="not this ledger's key"):
        train(frames, weights, led, 5)


def test_legacy_ledger_is_readable_but_never_appended(tmp_path, frames, weights, five_lines):
    led = tmp_path / "legacy.jsonl"
    recs = [json.loads(x) for x in five_lines.read_text().splitlines()]
    for r in recs:
        for k in ("prev", "sig", "chain", "public_key"):
            r.pop(k, None)
    led.write_text("".join(json.dumps(r) + "\n" for r in recs))
    lg = Ledger(led)
    assert lg.legacy and len(lg.releases()) == 4 and lg.epsilon() > 0
    with pytest.raises(LedgerError, match="legacy ledger"):
        train(frames, weights, led, 5)


def test_key_file_is_0600_and_replaces_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("not a key")
    link = tmp_path / "k.key"
    link.symlink_to(target)
    signing.generate_key(link, overwrite=True)
    assert target.read_text() == "not a key" and not link.is_symlink()
    assert stat.S_IMODE(os.stat(link).st_mode) == 0o600
    loose = tmp_path / "loose.key"
    loose.write_text("x")
    os.chmod(loose, 0o644)
    signing.generate_key(loose, overwrite=True)
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o600
    signing.load_private_key(loose)
    os.chmod(loose, 0o644)
    with pytest.raises(signing.SigningKeyError, match="0600"):
        signing.load_private_key(loose)
