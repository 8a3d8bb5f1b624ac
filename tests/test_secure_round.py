"""A secure round in process: the real region-side release (fedfsd.region.secure_release) and the
real aggregator driver (fedfsd.aggregator.secure_round) talk through their bytes, without Flower.
"""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest

from fedfsd.aggregator.secure_round import default_threshold, make_spec, run_secure_round
from fedfsd.config import parse_policy
from fedfsd.data.testing import make_synthetic_frames
from fedfsd.models import build_model, get_weights
from fedfsd.privacy import signing
from fedfsd.privacy.ledger import Ledger
from fedfsd.region import secure_release
from fedfsd.region.secure_release import RegionContext, SecureRoundRefused, handle_stage
from fedfsd.secagg import from_ring
from fedfsd.secagg.round_spec import flatten

pytestmark = pytest.mark.secagg

REGIONS = ("eu", "jp", "us")
VPS = 4


def _policy(region: str, t: int = 2, budget: float = 50.0):
    return parse_policy(
        f'region = "{region}"\nepsilon_budget = {budget}\ndelta = 1e-3\n'
        "min_noise_multiplier = 1.0\nmax_clip_norm = 1.0\nupdate_norm_bound = 5.0\n"
        f'trust_model = "distributed"\nmin_honest_regions = {t}\n'
    )


@pytest.fixture
def world(tmp_path):
    frames0 = make_synthetic_frames(16, 8, 0, region="eu")
    model = build_model("mlp", frames0.features.shape[1], frames0.labels.shape[1])
    weights = get_weights(model)
    keys, ctxs = {}, {}
    for i, r in enumerate(REGIONS):
        ledger = tmp_path / r / "ledger.jsonl"
        sk = signing.load_or_create_key(signing.ledger_key_path(ledger))
        keys[r] = sk.public_key()
        frames = make_synthetic_frames(16, 8, i, region=r)
        ctxs[r] = RegionContext(
            policy=_policy(r),
            ledger_path=ledger,
            signing_key=sk,
            peer_keys={},
            frames=frames,
            fleet_vehicles=16,
            run_id="run1",
            round_idx=1,
            seed=100 + i,
        )
    for c in ctxs.values():
        c.peer_keys = keys
    return weights, keys, ctxs


def _spec(weights, **kw):
    d = int(sum(v.size for v in weights.values()))
    args = dict(clip_norm=1.0, noise_multiplier=1.0, vehicles_per_step=VPS, frames_per_vehicle=4)
    args.update(kw)
    return make_spec(dim=d, model="mlp", **args)


@pytest.fixture
def fed_in():
    """What each region fed into masking, recorded by the test-only hook inside the region."""
    seen: dict[str, np.ndarray] = {}

    def hook(point, **ctx):
        if point == "routed":
            seen[ctx["region"]] = ctx["vector"]

    secure_release.set_test_hook(hook)
    yield seen
    secure_release.set_test_hook(None)


def _transport(ctxs, spec, drop_after_masking=(), fed=None, tamper=None):
    """In-process delivery; `tamper(stage, region, reply) -> reply` alters a region's reply."""

    def send(stage, out, weights):
        got = {}
        for r, payload in out.items():
            if stage == "unmask" and r in drop_after_masking:
                continue
            try:
                got[r] = handle_stage(ctxs[r], stage, payload, spec, weights)
                if tamper is not None:
                    got[r] = tamper(stage, r, got[r])
            except Exception as e:  # a region's refusal: no reply
                (fed if fed is not None else {}).setdefault("errors", {})[r] = repr(e)
        return got

    return send


def test_secure_round_steps_the_model_by_the_noisy_sum(world, tmp_path, fed_in):
    weights, keys, ctxs = world
    spec = _spec(weights)
    fed = fed_in
    held: list[dict] = []
    res = run_secure_round(
        regions=list(REGIONS),
        region_keys=keys,
        spec=spec,
        run_id="run1",
        round_idx=1,
        threshold=default_threshold(3),
        weights=weights,
        server_lr=0.5,
        transport=_transport(ctxs, spec),
        run_dir=tmp_path / "agg",
        observer=lambda ev: None,
    )
    assert res.weights is not None, res.reason
    tr = res.transcript
    assert tr["advertised"] == tr["masked_input"] == tr["unmask_responders"] == list(REGIONS)
    line = json.loads((tmp_path / "agg" / "secagg_transcript.jsonl").read_text().splitlines()[-1])
    assert line["applied"] and line["summed"] == list(REGIONS)
    # The model moved by exactly −lr × (Σ of what the regions fed in) / (R × vehicles per step).
    assert sorted(fed) == list(REGIONS)
    total = sum(z.astype(np.float64) for z in fed.values())
    expected = flatten(weights) - 0.5 * total / (spec.scale * 3 * VPS)
    got = flatten(res.weights)
    assert not np.allclose(got, flatten(weights))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert res.sum_norm <= res.norm_bound
    del held
    for r, c in ctxs.items():
        rec = Ledger(c.ledger_path).releases()[-1]
        assert rec["trust_model"] == "distributed" and rec["round"] == 1
        assert 0 < rec["epsilon_distributed"] < rec["epsilon_own_noise"]
        # the round's secrets were deleted after unmasking
        assert not secure_release.state_path(c.ledger_path, "run1", 1).exists(), r


def test_region_dropped_after_masking_is_recovered(world, tmp_path):
    weights, keys, ctxs = world
    spec = _spec(weights)
    res = run_secure_round(
        regions=list(REGIONS),
        region_keys=keys,
        spec=spec,
        run_id="run1",
        round_idx=1,
        threshold=2,
        weights=weights,
        server_lr=1.0,
        transport=_transport(ctxs, spec, drop_after_masking=("us",)),
        run_dir=tmp_path / "agg",
    )
    assert res.weights is not None, res.reason
    assert res.transcript["recovered_after_masking"] == ["us"]
    assert res.transcript["summed"] == list(REGIONS)


def test_state_file_is_private_between_stages(world):
    weights, keys, ctxs = world
    spec = _spec(weights)
    seen = {}

    def send(stage, out, w):
        got = _transport(ctxs, spec)(stage, out, w)
        p = secure_release.state_path(ctxs["eu"].ledger_path, "run1", 1)
        if stage != "unmask":
            seen[stage] = stat.S_IMODE(p.stat().st_mode)
        return got

    run_secure_round(
        regions=list(REGIONS), region_keys=keys, spec=spec, run_id="run1", round_idx=1,
        threshold=2, weights=weights, server_lr=1.0, transport=send,
    )  # fmt: skip
    assert seen == {"setup": 0o600, "keys": 0o600, "routed": 0o600}


def test_regions_refuse_a_threshold_below_their_policy(world):
    weights, keys, ctxs = world
    for c in ctxs.values():
        c.policy = _policy(c.policy.region, t=3)
    spec = _spec(weights)
    fed: dict = {}
    res = run_secure_round(
        regions=list(REGIONS), region_keys=keys, spec=spec, run_id="run1", round_idx=1,
        threshold=2, weights=weights, server_lr=1.0, transport=_transport(ctxs, spec, fed=fed),
    )  # fmt: skip
    assert res.weights is None and "aborted" in res.reason
    assert set(fed["errors"]) == set(REGIONS)
    assert all("min_honest_regions" in e for e in fed["errors"].values())
    for c in ctxs.values():  # nothing was spent
        assert not c.ledger_path.exists() or not Ledger(c.ledger_path).releases()


def test_region_refuses_a_scale_other_than_its_own(world):
    weights, keys, ctxs = world
    spec = _spec(weights)
    bad = type(spec)(**{**spec.__dict__, "scale": spec.scale * 4})
    with pytest.raises(SecureRoundRefused, match="scale"):
        from fedfsd.secagg import AggregatorSession, RoundParams

        n = len(REGIONS)
        d = int(sum(v.size for v in weights.values()))
        p = RoundParams("run1", 1, REGIONS, 2, bad.quantizer(n).bit_width, d)
        handle_stage(ctxs["eu"], "setup", AggregatorSession(p, keys).setup_message(), bad, weights)


def test_budget_refusal_before_anything_is_released(world):
    weights, keys, ctxs = world
    for c in ctxs.values():
        c.policy = _policy(c.policy.region, budget=0.01)
    spec = _spec(weights)
    fed: dict = {}
    res = run_secure_round(
        regions=list(REGIONS), region_keys=keys, spec=spec, run_id="run1", round_idx=1,
        threshold=2, weights=weights, server_lr=1.0, transport=_transport(ctxs, spec, fed=fed),
    )  # fmt: skip
    assert res.weights is None
    assert all("budget" in e for e in fed["errors"].values())
    for c in ctxs.values():
        assert not Ledger(c.ledger_path).releases()


def test_unmasked_sum_matches_plain_sum_of_integer_vectors(world, monkeypatch, fed_in):
    weights, keys, ctxs = world
    spec = _spec(weights)
    fed = fed_in
    bits = spec.quantizer(3).bit_width
    captured = {}

    import fedfsd.aggregator.secure_round as sr

    real = sr.AggregatorSession.result

    def spy(self):
        out = real(self)
        captured["ring"] = out.copy()
        return out

    monkeypatch.setattr(sr.AggregatorSession, "result", spy)
    run_secure_round(
        regions=list(REGIONS), region_keys=keys, spec=spec, run_id="run1", round_idx=1,
        threshold=2, weights=weights, server_lr=1.0, transport=_transport(ctxs, spec),
    )  # fmt: skip
    np.testing.assert_array_equal(from_ring(captured["ring"], bits), sum(z for z in fed.values()))


def test_aggregator_side_loads_no_data_or_training_code():
    import subprocess
    import sys

    code = (
        "import sys; from fedfsd.aggregator.secure_round import make_spec;"
        "make_spec(dim=100, clip_norm=1.0, noise_multiplier=1.0, vehicles_per_step=4,"
        " frames_per_vehicle=4, model='mlp').quantizer(3);"
        "import fedfsd.privacy.signing;"
        "bad=[m for m in sys.modules if m.startswith(('fedfsd.data','fedfsd.privacy.dpsgd',"
        "'torch','opacus'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_secure_aggregation_needs_region_keys():
    from typer.testing import CliRunner

    from fedfsd.cli import app

    res = CliRunner().invoke(
        app, ["aggregator", "run", "--dir", "/nonexistent", "--secure-aggregation"]
    )
    assert res.exit_code != 0
    assert "--secure-aggregation needs --region-keys" in res.output


def test_routed_model_of_another_length_is_refused_before_any_spend(world):
    weights, keys, ctxs = world
    spec = _spec(weights)
    fed: dict = {}
    inner = _transport(ctxs, spec, fed=fed)
    first = sorted(weights)[0]

    def send(stage, out, w):  # the routed stage brings a model shorter than the setup said
        if w is not None:
            w = {k: v for k, v in w.items() if k != first}
        return inner(stage, out, w)

    res = run_secure_round(
        regions=list(REGIONS), region_keys=keys, spec=spec, run_id="run1", round_idx=1,
        threshold=2, weights=weights, server_lr=1.0, transport=send,
    )  # fmt: skip
    assert res.weights is None
    assert all("dim" in e for e in fed["errors"].values()), fed
    for c in ctxs.values():
        assert not Ledger(c.ledger_path).exists() or not Ledger(c.ledger_path).releases()


# ---- the signed bound check, receipts and epsilon.csv (issue 15, item 3) -------------------


def _resigned(ctxs, region, reply, edit):
    """`region`'s masked reply with its manifest edited by `edit(manifest, body)` and signed
    again with the region's own key: what a region that lies can send."""
    import msgpack

    from fedfsd import wire
    from fedfsd.region.egress import sign_manifest

    body = msgpack.unpackb(reply, raw=False)
    m = wire.manifest_from_bytes(body["manifest"])
    edit(m, body)
    body["manifest"] = sign_manifest(m, ctxs[region].signing_key).SerializeToString()
    return msgpack.packb(body, use_bin_type=True)


def _bad_signature(ctxs, region, reply):
    import msgpack

    from fedfsd import wire

    body = msgpack.unpackb(reply, raw=False)
    m = wire.manifest_from_bytes(body["manifest"])
    m.update_norm = m.update_norm / 2  # a smaller norm claimed after signing
    body["manifest"] = m.SerializeToString()
    return msgpack.packb(body, use_bin_type=True)


def _no_manifest(ctxs, region, reply):
    import msgpack

    body = msgpack.unpackb(reply, raw=False)
    del body["manifest"]
    return msgpack.packb(body, use_bin_type=True)


def _wrong_round(ctxs, region, reply):
    return _resigned(ctxs, region, reply, lambda m, b: setattr(m, "round", m.round + 1))


def _over_bound(ctxs, region, reply):
    return _resigned(
        ctxs, region, reply, lambda m, b: setattr(m, "update_norm", 2 * m.update_norm_bound)
    )


def _other_input(ctxs, region, reply):
    from fedfsd.secagg.round_spec import masked_digest

    other = masked_digest(b"another masked input")
    return _resigned(ctxs, region, reply, lambda m, b: setattr(m, "masked_sha256", other))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_bad_signature, "bad signature"),
        (_no_manifest, "no signed manifest"),
        (_wrong_round, "stale round"),
        (_over_bound, "exceeds the bound"),
        (_other_input, "another masked input"),
    ],
)
def test_a_bad_manifest_excludes_the_region_and_the_round_completes(
    world, tmp_path, fed_in, tamper, reason
):
    from fedfsd.aggregator import checkpoint as ck
    from fedfsd.aggregator.receipts import read_receipts
    from fedfsd.aggregator.secure_round import outcome_rows
    from fedfsd.aggregator.server_app import RoundOutcome, _log_round_problems

    weights, keys, ctxs = world
    spec = _spec(weights)

    def bad_us(stage, region, reply):
        return tamper(ctxs, region, reply) if (stage, region) == ("routed", "us") else reply

    run_dir = tmp_path / "agg"
    res = run_secure_round(
        regions=list(REGIONS), region_keys=keys, spec=spec, run_id="run1", round_idx=1,
        threshold=2, weights=weights, server_lr=0.5, run_dir=run_dir,
        transport=_transport(ctxs, spec, tamper=bad_us),
    )  # fmt: skip
    assert res.weights is not None, res.reason  # 2 ≥ t regions remain
    tr = res.transcript
    assert tr["masked_input"] == tr["summed"] == ["eu", "jp"], tr
    assert tr["excluded_at_masking"] == ["us"] and tr["dropped_before_masking"] == ["us"]
    assert reason in res.rejected["us"], res.rejected
    # us's pairwise masks were removed, its vector is not in the sum: the step is eu + jp only
    total = fed_in["eu"].astype(np.float64) + fed_in["jp"]
    expected = flatten(weights) - 0.5 * total / (spec.scale * 2 * VPS)
    np.testing.assert_allclose(flatten(res.weights), expected, rtol=0, atol=1e-6)
    # receipts for the used inputs only; the exclusion goes to rejected.jsonl as in a plain round
    assert [r["region"] for r in read_receipts(run_dir)] == ["eu", "jp"]
    out = RoundOutcome()
    outcome_rows(res, 1, out)
    _log_round_problems(run_dir, 1, out, True, [], {}, 2)
    rejected = [json.loads(x) for x in (run_dir / ck.REJECTED_JSONL).read_text().splitlines()]
    assert [(r["region"], reason in r["reason"]) for r in rejected] == [("us", True)]
    assert sorted(r for r, _, _ in out.accepted) == ["eu", "jp"]


def test_receipts_epsilon_rows_and_verify_after_a_secure_round(world, tmp_path):
    from typer.testing import CliRunner

    from fedfsd.aggregator import checkpoint as ck
    from fedfsd.aggregator.outcome import summarise
    from fedfsd.aggregator.receipts import read_receipts
    from fedfsd.aggregator.secure_round import outcome_rows
    from fedfsd.aggregator.server_app import RoundOutcome, append_epsilon
    from fedfsd.cli import app
    from fedfsd.privacy.report import build_report, to_json

    weights, keys, ctxs = world
    for c in ctxs.values():
        c.seed = None  # verify refuses fixed-seed noise
    spec = _spec(weights)
    run_dir = tmp_path / "agg"
    res = run_secure_round(
        regions=list(REGIONS), region_keys=keys, spec=spec, run_id="run1", round_idx=1,
        threshold=2, weights=weights, server_lr=0.5, run_dir=run_dir,
        transport=_transport(ctxs, spec),
    )  # fmt: skip
    assert res.weights is not None, res.reason
    receipts = read_receipts(run_dir)
    assert [r["region"] for r in receipts] == list(REGIONS)
    for r in receipts:
        m, line = r["manifest"], Ledger(ctxs[r["region"]].ledger_path).releases()[-1]
        assert r["key_source"] == "registered" and m["trust_model"] == "distributed"
        # The manifest signs "norm ≤ bound" only: the region's own norm stays on its ledger.
        assert line["update_norm"] <= m["update_norm"] == m["update_norm_bound"]
        assert m["epsilon_distributed"] == line["epsilon_distributed"]
        assert m["epsilon_own_noise"] == line["epsilon_own_noise"]
        assert m["sha256"] == line["update_sha256"] and m["round"] == 1
    out = RoundOutcome()
    outcome_rows(res, 1, out)
    append_epsilon(run_dir / ck.EPSILON_CSV, out.epsilon_rows, secure=True)
    rows = ck.read_csv(run_dir / ck.EPSILON_CSV)
    assert [r["region"] for r in rows] == list(REGIONS)
    for row in rows:
        assert row["trust_model"] == "distributed"
        assert float(row["epsilon_distributed"]) < float(row["epsilon_own_noise"])
        assert float(row["epsilon"]) > 0 and row["epsilon_rdp"] and row["delta"] == "0.001"
    ck.append_jsonl(run_dir / ck.ROUNDS_JSONL, {"round": 1, "status": "ok", "accepted": REGIONS})
    regions = summarise(run_dir, rounds_asked=1, fedfsd_run_id="run1")["regions"]
    assert regions["eu"]["epsilon"] == float(rows[0]["epsilon"])  # the existing readers work

    led = ctxs["eu"].ledger_path
    report = tmp_path / "epsilon-eu.json"
    report.write_text(to_json(build_report(led)))

    def verify(run):
        r = CliRunner().invoke(
            app, ["privacy", "verify", str(report), "--ledger", str(led), "--receipts", str(run)]
        )
        return r.exit_code, r.output

    code, text = verify(run_dir)
    assert code == 0, text
    # a receipt forged after the fact (ε under the distributed assumption lowered) fails
    forged = tmp_path / "forged"
    forged.mkdir()
    lines = (run_dir / "receipts.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    recs[0]["manifest"]["epsilon_distributed"] /= 2
    (forged / "receipts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    code, text = verify(forged)
    assert code != 0 and "bad signature" in text and "epsilon_distributed" in text, text


def test_an_aborted_round_uses_no_input_and_says_why(world, tmp_path):
    weights, keys, ctxs = world
    spec = _spec(weights)
    res = run_secure_round(
        regions=list(REGIONS), region_keys=keys, spec=spec, run_id="run1", round_idx=1,
        threshold=2, weights=weights, server_lr=0.5, run_dir=tmp_path / "agg",
        transport=_transport(ctxs, spec, drop_after_masking=("jp", "us")),
    )  # fmt: skip
    assert res.weights is None and "aborted" in res.reason
    assert sorted(res.manifests) == list(REGIONS)  # valid manifests: ε rows, no receipts
    assert set(res.rejected) == set(REGIONS)
    assert all("masked input not used" in why for why in res.rejected.values())
    assert not (tmp_path / "agg" / "receipts.jsonl").exists()


def test_region_over_its_bound_refuses_before_spending(world, monkeypatch):
    from fedfsd.secagg.round_spec import SecureRoundSpec

    weights, keys, ctxs = world
    spec = _spec(weights)
    monkeypatch.setattr(SecureRoundSpec, "region_norm_bound", lambda self, dim: 1e-6)
    fed: dict = {}
    res = run_secure_round(
        regions=list(REGIONS), region_keys=keys, spec=spec, run_id="run1", round_idx=1,
        threshold=2, weights=weights, server_lr=1.0, transport=_transport(ctxs, spec, fed=fed),
    )  # fmt: skip
    assert res.weights is None and not res.manifests
    assert all("exceeds the bound" in e for e in fed["errors"].values()), fed
    for c in ctxs.values():  # the check ran before the ledger line: nothing spent
        assert not Ledger(c.ledger_path).releases()
