"""The aggregator checks each manifest's signature and ledger head and keeps receipts
(issue 12 item 5): a bad signature, an unsigned manifest, a second ledger and a rolled-back
ledger are refused, at the receipts layer and through the real ServerApp round loop."""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict

from fedfsd.aggregator.receipts import LEDGER_HEADS, ReceiptBook, read_receipts
from fedfsd.aggregator.server_app import run_federation
from fedfsd.aggregator.settings import parse_settings
from fedfsd.config import TrainRequest, parse_policy
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.flower.message_objects import TaskIdentity
from fedfsd.models import build_model, get_weights
from fedfsd.privacy import signing
from fedfsd.privacy.ledger import Ledger
from fedfsd.privacy.local_round import run_local_round
from fedfsd.region.client_app import make_client_app
from fedfsd.region.egress import guard_update, release_manifest

POLICY = parse_policy(
    """
region = "eu"
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
    f = make_synthetic_frames(60, 4, seed=0, region="eu")
    return f


@pytest.fixture(scope="module")
def weights(frames):
    return get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))


def release(frames, weights, led: Path, rnd: int, run: str = "run-a"):
    res = run_local_round(frames, POLICY, led, weights, REQ, run, rnd, "mlp", seed=rnd)
    rel = guard_update(weights, res.new_weights, POLICY.update_norm_bound)
    return release_manifest(
        led,
        region="eu",
        run_id=run,
        round_idx=rnd,
        release=rel,
        record=res.record,
        update_norm_bound=POLICY.update_norm_bound,
        epsilon=res.epsilon,
        epsilon_rdp=res.epsilon_rdp,
        epsilon_budget=res.budget,
        delta=POLICY.delta,
        steps=res.steps,
    )


def pub(led: Path):
    return signing.parse_public_key(Ledger(led).public_key)


def test_signed_manifest_carries_the_ledger_line(tmp_path, frames, weights):
    led = tmp_path / "eu.jsonl"
    m = release(frames, weights, led, 1)
    line = Ledger(led).releases()[0]
    assert (m.noise_multiplier, m.sample_rate, m.steps) == (1.0, line["sample_rate"], 2)
    assert (m.frames_per_vehicle, m.clip_norm, m.fleet_id) == (4, 1.0, line["fleet_id"])
    assert m.sha256 == line["update_sha256"] and m.epsilon == line["epsilon_prv"]
    assert m.ledger_seq == 2 and m.ledger_head == Ledger(led).head
    assert m.ledger_id == Ledger(led).ledger_id and m.public_key == Ledger(led).public_key
    assert signing.verify(pub(led), signing.manifest_payload(m), m.signature)


def test_registered_key_accepts_and_records_receipts(tmp_path, frames, weights):
    led = tmp_path / "eu.jsonl"
    key = signing.generate_key(led.with_name(led.name + ".key"))  # `fedfsd region keygen`
    book = ReceiptBook(tmp_path / "run", {"eu": key.public_key()})
    for rnd in (1, 2):
        m = release(frames, weights, led, rnd)
        assert book.check(m) is None
        book.record(m, rnd)
    recs = read_receipts(tmp_path / "run")
    assert [r["manifest"]["round"] for r in recs] == [1, 2]
    assert recs[0]["public_key"] == Ledger(led).public_key
    assert recs[0]["key_source"] == "registered"
    heads = json.loads((tmp_path / "run" / LEDGER_HEADS).read_text())
    assert heads["eu"]["ledger_seq"] == 3 and heads["eu"]["ledger_head"] == Ledger(led).head
    # A resumed aggregator (new book, same run dir) keeps the heads.
    again = ReceiptBook(tmp_path / "run", {"eu": pub(led)})
    assert again.heads == heads


def test_bad_signature_and_unsigned_are_refused(tmp_path, frames, weights):
    led = tmp_path / "eu.jsonl"
    m = release(frames, weights, led, 1)
    other = signing.generate_key(tmp_path / "other.key")
    book = ReceiptBook(tmp_path / "run", {"eu": other.public_key()})
    assert "bad signature" in book.check(m)
    forged = type(m)()
    forged.CopyFrom(m)
    forged.noise_multiplier = 3.0  # a field edited after signing
    assert "bad signature" in ReceiptBook(tmp_path / "r2", {"eu": pub(led)}).check(forged)
    unsigned = type(m)()
    unsigned.CopyFrom(m)
    unsigned.signature = ""
    assert "unsigned" in ReceiptBook(tmp_path / "r3", {"eu": pub(led)}).check(unsigned)
    assert "unsigned" in ReceiptBook(tmp_path / "r4").check(unsigned)
    assert ReceiptBook(tmp_path / "r5", allow_unsigned=True).check(unsigned) is None
    assert "no registered" in ReceiptBook(tmp_path / "r6", {"us": pub(led)}).check(m)


def test_rollback_second_ledger_and_tofu_key_change_are_refused(tmp_path, frames, weights):
    led = tmp_path / "eu.jsonl"
    release(frames, weights, led, 1)
    backup = tmp_path / "backup"
    backup.mkdir()
    for p in tmp_path.glob("eu.jsonl*"):
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, backup / p.name)
    m2 = release(frames, weights, led, 2)
    book = ReceiptBook(tmp_path / "run")  # no registry: the first key is pinned
    assert book.check(m2) is None
    book.record(m2, 2)
    assert book.check(m2) is None  # the same release again (resumed round) is fine
    # Rollback: the region restores its ledger from before round 2 and releases round 3.
    for p in backup.iterdir():
        dst = tmp_path / p.name
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst)
    m3 = release(frames, weights, led, 3)
    assert m3.ledger_seq == m2.ledger_seq
    assert "ledger rollback: line 3 does not extend line 3" in book.check(m3)
    # A second ledger (same key, fresh file) restarts at ε = 0: refused.
    led2 = tmp_path / "second.jsonl"
    shutil.copy2(led.with_name("eu.jsonl.key"), led2.with_name("second.jsonl.key"))
    m4 = release(frames, weights, led2, 4)
    assert "second ledger" in book.check(m4)
    # Another key under the same region name (trust on first use pinned the first one).
    m5 = release(frames, weights, tmp_path / "third.jsonl", 5)
    assert "bad signature" in book.check(m5)


# ---- through the real round loop --------------------------------------------------------


SIM_CFG = {
    "sim-vehicles": 40,
    "sim-frames": 6,
    "sim-allowed-metrics": "",
}


class ClientGrid:
    """Two nodes whose replies come from the real region ClientApp (synthetic fleets)."""

    def __init__(self, ledger_dir: Path) -> None:
        self.app = make_client_app({**SIM_CFG, "sim-ledger-dir": str(ledger_dir)})
        self.nodes = {11: 0, 12: 1}
        self._ids = itertools.count()
        self._replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            mid = f"m{next(self._ids)}"
            ids.append(mid)
            md = Metadata(
                run_id=1,
                message_id=mid,
                src_node_id=0,
                dst_node_id=m.metadata.dst_node_id,
                reply_to_message_id="",
                group_id=m.metadata.group_id,
                created_at=time.time(),
                ttl=600,
                message_type=m.metadata.message_type,
            )
            pid = self.nodes[m.metadata.dst_node_id]
            ctx = Context(
                run_id=1,
                node_id=m.metadata.dst_node_id,
                node_config={"partition-id": pid, "num-partitions": 2},
                state=RecordDict(),
                run_config={},
            )
            reply = self.app(Message(metadata=md, content=m.content), ctx)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            self._replies.append(reply)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        wanted = set(ids)
        got = [r for r in self._replies if r.metadata.reply_to_message_id in wanted]
        self._replies = [r for r in self._replies if r not in got]
        return got


def _settings(run_dir: Path, keys: Path, rounds: int, resume: bool = False):
    return parse_settings(
        {
            "num-server-rounds": rounds,
            "local-steps": 2,
            "vehicles-per-step": 4,
            "frames-per-vehicle": 4,
            "min-regions": 1,
            "round-timeout": 30,
            "evaluate-every": 100,
            "run-dir": str(run_dir),
            "run-id": "loop",
            "region-keys": str(keys),
            "resume": resume,
        }
    )


def _rejected(run_dir: Path) -> list[tuple[int, str, str]]:
    p = run_dir / "rejected.jsonl"
    rows = [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []
    return [(r["round"], r["region"], r["reason"]) for r in rows]


def test_round_loop_refuses_bad_signature_and_rolled_back_ledger(tmp_path, monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what Flower sets inside a ServerApp
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    ledgers = tmp_path / "ledgers"
    keys = {}
    for name in ("sim0", "sim1"):  # the regions' keys, registered out of band
        key = signing.generate_key(ledgers / "loop" / f"{name}.jsonl.key")
        keys[name] = signing.public_hex(key.public_key())
    wrong = signing.generate_key(tmp_path / "wrong.key")
    keys_file = tmp_path / "region-keys.json"
    keys_file.write_text(
        json.dumps({"sim0": keys["sim0"], "sim1": signing.public_hex(wrong.public_key())})
    )
    run_dir = tmp_path / "run"
    grid = ClientGrid(ledgers)
    run_federation(grid, _settings(run_dir, keys_file, 2), run_dir)
    rej = _rejected(run_dir)
    assert [(r, g) for r, g, _ in rej] == [(1, "sim1"), (2, "sim1")]
    assert all("bad signature" in why for _, _, why in rej)
    receipts = read_receipts(run_dir)
    assert [(r["round"], r["region"]) for r in receipts] == [(1, "sim0"), (2, "sim0")]
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in rounds] == [["sim0"], ["sim0"]]

    # sim0 rolls its ledger back to before round 2 (file and release markers), then round 3.
    led = ledgers / "loop" / "sim0.jsonl"
    lines = led.read_bytes().splitlines(keepends=True)
    led.write_bytes(b"".join(lines[:2]))
    for p in Ledger(led).cache_dir.glob("*-r2.*"):
        p.unlink()
    run_federation(grid, _settings(run_dir, keys_file, 3, resume=True), run_dir)
    rej = _rejected(run_dir)
    assert rej[-2][:2] == (3, "sim0") or rej[-1][:2] == (3, "sim0")
    why = {g: w for r, g, w in rej if r == 3}
    assert "ledger rollback" in why["sim0"] and "bad signature" in why["sim1"]
    assert [r["round"] for r in read_receipts(run_dir)] == [1, 2]
    assert np.isfinite(json.loads((run_dir / LEDGER_HEADS).read_text())["sim0"]["epsilon"])


def test_region_keys_file_and_keygen_cli(tmp_path):
    from typer.testing import CliRunner

    from fedfsd.cli import app

    r = CliRunner().invoke(app, ["region", "keygen", "--ledger", str(tmp_path / "eu.jsonl")])
    assert r.exit_code == 0, r.output
    hex_line = [x for x in r.output.splitlines() if x.startswith("public key (hex)")][0]
    eu_hex = hex_line.split()[-1]
    again = CliRunner().invoke(app, ["region", "keygen", "--ledger", str(tmp_path / "eu.jsonl")])
    assert again.exit_code != 0 and "already exists" in again.output
    us = signing.generate_key(tmp_path / "us.key")
    jp = signing.generate_key(tmp_path / "jp.key")
    jp_pem = signing.public_path(tmp_path / "jp.key").read_text()
    f = tmp_path / "keys.toml"
    f.write_text(
        f'eu = "eu.jsonl.key.pub"\nus = "{signing.public_hex(us.public_key())}"\n'
        f'jp = """{jp_pem}"""\n'
    )
    keys = signing.load_region_keys(f)
    assert {k: signing.public_hex(v) for k, v in keys.items()} == {
        "eu": eu_hex,
        "us": signing.public_hex(us.public_key()),
        "jp": signing.public_hex(jp.public_key()),
    }
    (tmp_path / "bad.json").write_text(json.dumps({"eu": "zz"}))
    with pytest.raises(signing.SigningKeyError, match="region 'eu'"):
        signing.load_region_keys(tmp_path / "bad.json")


def test_hostile_manifests_never_crash_the_book(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from fedfsd import wire

    key = signing.generate_key(tmp_path / "k.key")
    books = [
        ReceiptBook(tmp_path / "a", {"eu": key.public_key()}),
        ReceiptBook(tmp_path / "b"),
        ReceiptBook(tmp_path / "c", allow_unsigned=True),
    ]
    text = st.text(max_size=80)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        region=st.sampled_from(["eu", "us", ""]) | text,
        signature=st.sampled_from(["", "00" * 64, "zz"]) | text,
        public_key=st.sampled_from(["", signing.public_hex(key.public_key())]) | text,
        seq=st.integers(0, 2**64 - 1),
        eps=st.floats(allow_nan=True, allow_infinity=True),
        head=text,
    )
    def run(region, signature, public_key, seq, eps, head):
        m = wire.UpdateManifest(
            region=region,
            signature=signature,
            public_key=public_key,
            ledger_seq=seq,
            ledger_id=head,
            ledger_head=head,
            epsilon=eps,
        )
        for b in books:
            reason = b.check(m)
            assert reason is None or isinstance(reason, str)
            if reason is None:
                b.record(m, 1)

    run()
