"""One secure-aggregation round at the aggregator: drive the stages, unmask the sum, step the model.

Why a transport callable: the stage logic (AggregatorSession, the R×bound check, the model step,
the transcript) is the same whether the messages go over Flower's Grid (`grid_transport`) or,
in a test, straight to in-process region handlers; only the delivery differs. The aggregator
never holds an individual region's unmasked vector: it only ever sees masked inputs and the
unmasked sum (fedfsd.secagg.aggregator).

The release is DP-FedSGD (docs/privacy.md, "Distributed noise"): each region sends
round(s·Σ clipped vehicle gradients) + its Skellam share; the sum, divided by s and by the
expected number of sampled vehicles over the summed regions, is a noisy mean gradient g, and the
global model steps w ← w − lr·g.

Before a masked input touches the running sum, its signed manifest (the region's bound check,
fedfsd.region.secure_release.secure_manifest) must name this region, run and round, the digest
of exactly these masked bytes, a bound no larger than the round's per-region bound and a norm
within it, and carry a valid signature by the region's registered key on a ledger line that
extends the last one seen (fedfsd.aggregator.receipts). Otherwise the input is excluded (the
region counts as dropped, its pairwise masks are removed with the survivors' shares) and the
reason goes to rejected.jsonl. A region whose input went into an applied sum gets a receipt and
an epsilon.csv row; one whose valid input was not used (the round failed) gets the ε row and a
rejected.jsonl line saying so, so that `fedfsd privacy verify --receipts` can account for it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedfsd import wire
from fedfsd.aggregator.receipts import ReceiptBook
from fedfsd.secagg import AggregatorSession, RoundParams, SecAggAbort, SecAggRefused, from_ring
from fedfsd.secagg.round_spec import (
    PAYLOAD_KEY,
    REPLY_KEY,
    STAGE_KEY,
    SecureRoundSpec,
    default_cap,
    flatten,
    masked_digest,
    unflatten,
)

LOG = logging.getLogger("flwr.fedfsd.aggregator")
TRANSCRIPT = "secagg_transcript.jsonl"
TTL_MARGIN_S = 30.0

# (stage, region -> message bytes, global weights to attach or None) -> region -> reply bytes.
# A region that did not answer, or refused, is absent from the result.
Transport = Callable[[str, dict[str, bytes], Mapping[str, np.ndarray] | None], dict[str, bytes]]


class SumOutOfBound(SecAggAbort):
    """The unmasked sum is larger than R regions could produce: something cheated; not applied."""

    border_reason = "secure aggregation: sum out of bound"


@dataclass
class SecureRoundResult:
    """What one secure round did: the new model (None when the round failed) and why."""

    weights: dict[str, np.ndarray] | None
    transcript: dict[str, Any]
    reason: str = ""
    sum_norm: float = math.nan
    norm_bound: float = math.nan
    refusals: dict[str, str] = field(default_factory=dict)
    # region -> its verified signed manifest (the masked input was admitted to the sum)
    manifests: dict[str, wire.UpdateManifest] = field(default_factory=dict)
    # region -> why its masked input was excluded, or not used (rejected.jsonl)
    rejected: dict[str, str] = field(default_factory=dict)
    # regions whose masked input is in the applied sum (each has a receipt)
    used: list[str] = field(default_factory=list)


# Relative slack between the bound a region signs and the one the aggregator derives (both
# compute `SecureRoundSpec.region_norm_bound` in float64 from the same spec).
BOUND_RTOL = 1e-9


def check_secure_manifest(
    m: wire.UpdateManifest | None,
    *,
    region: str,
    run_id: str,
    round_idx: int,
    masked: bytes,
    bound: float,
) -> str | None:
    """None when the manifest may accompany this masked input, else the reason (no signature
    check here: `ReceiptBook.check` does that and the ledger head)."""
    if m is None:
        return "no signed manifest with the masked input"
    if m.schema != wire.MANIFEST_SCHEMA:
        return f"manifest schema {m.schema} is not {wire.MANIFEST_SCHEMA}"
    if m.region != region:
        return f"the manifest names region {m.region!r}, the masked input came from {region!r}"
    if m.run_id != run_id:
        return f"wrong run: manifest run {m.run_id!r} != {run_id!r}"
    if m.round != round_idx:
        return f"stale round: manifest round {m.round} != current round {round_idx}"
    if m.trust_model != "distributed" or m.refused_reason:
        return f"not a secure-round manifest (trust_model {m.trust_model!r})"
    if m.masked_sha256 != masked_digest(masked):
        return "digest mismatch: the manifest is for another masked input"
    if not m.update_norm_bound <= bound * (1 + BOUND_RTOL):
        return f"the signed bound {m.update_norm_bound:.6g} exceeds the round's {bound:.6g}"
    if not (math.isfinite(m.update_norm) and 0 <= m.update_norm <= m.update_norm_bound):
        return f"signed norm {m.update_norm:.6g} exceeds the bound {m.update_norm_bound:.6g}"
    return None


def default_threshold(n_regions: int) -> int:
    """The smallest threshold the protocol allows: t > n/2 and t ≥ 2."""
    return max(2, n_regions // 2 + 1)


def make_spec(
    *,
    dim: int,
    clip_norm: float,
    noise_multiplier: float,
    vehicles_per_step: int,
    frames_per_vehicle: int,
    model: str,
) -> SecureRoundSpec:
    """The round's spec; s is the scale every region recomputes and checks (`choose_scale`)."""
    from fedfsd.privacy.skellam import choose_scale  # numpy only: not the DP training code

    return SecureRoundSpec(
        scale=choose_scale(clip_norm, dim),
        cap=default_cap(vehicles_per_step),
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        vehicles_per_step=vehicles_per_step,
        frames_per_vehicle=frames_per_vehicle,
        model=model,
    )


def _deliver(
    agg: AggregatorSession,
    replies: Mapping[str, bytes],
    receive: Callable[[bytes], None],
    refusals: dict[str, str],
) -> None:
    for region, data in sorted(replies.items()):
        try:
            receive(data)
        except SecAggRefused as e:  # dropped and logged in the transcript
            refusals[region] = str(e)
            LOG.warning("secure round: refused a reply from %s: %s", region, e)


def run_secure_round(
    *,
    regions: list[str],
    region_keys: Mapping[str, Ed25519PublicKey],
    spec: SecureRoundSpec,
    run_id: str,
    round_idx: int,
    threshold: int,
    weights: Mapping[str, np.ndarray],
    server_lr: float,
    transport: Transport,
    run_dir: Path | None = None,
    observer: Callable[[str], None] | None = None,
    book: ReceiptBook | None = None,
) -> SecureRoundResult:
    """All four stages; the stepped model, or None with the reason (the transcript is written
    to `run_dir/secagg_transcript.jsonl` either way).

    `book` checks each masked input's signed manifest (signature by the registered key, ledger
    head) and receives the receipts of the regions whose input was used; by default one over
    `region_keys` writing to `run_dir` (nothing written without a run_dir)."""
    dim = int(sum(np.asarray(v).size for v in weights.values()))
    participants = tuple(sorted(regions))
    quant = spec.quantizer(len(participants))
    params = RoundParams(run_id, round_idx, participants, threshold, quant.bit_width, dim)
    book = book if book is not None else ReceiptBook(run_dir, region_keys)
    result = SecureRoundResult(None, {})
    bound = spec.region_norm_bound(dim)

    def admit(region: str, masked: bytes, attached: bytes | None) -> str | None:
        try:
            m = None if attached is None else wire.manifest_from_bytes(attached)
        except ValueError:
            m = None
        try:
            why = check_secure_manifest(
                m, region=region, run_id=run_id, round_idx=round_idx, masked=masked, bound=bound
            )
            if why is None:
                assert m is not None
                why = book.check(m)
        except Exception as e:  # hostile bytes must not end the round for everyone
            why = f"unusable manifest ({type(e).__name__})"
        if why is not None:
            result.rejected[region] = f"signed bound check refused: {why}"
            LOG.warning("secure round %d: excluded %s: %s", round_idx, region, why)
            return why
        assert m is not None
        result.manifests[region] = m
        return None

    agg = AggregatorSession(params, region_keys, observer=observer, admit=admit)
    refusals: dict[str, str] = {}
    costs: dict[str, dict[str, float]] = {}

    def stage(
        name: str, out: dict[str, bytes], w: Mapping[str, np.ndarray] | None
    ) -> dict[str, bytes]:
        t0 = time.monotonic()
        got = transport(name, out, w)
        costs[name] = {  # protocol bytes only (the model copy a stage carries is not counted)
            "seconds": round(time.monotonic() - t0, 4),
            "bytes_out": sum(len(b) for b in out.values()),
            "bytes_in": sum(len(b) for b in got.values()),
        }
        return got

    try:
        setup = agg.setup_message()
        got = stage("setup", {r: setup for r in participants}, None)
        _deliver(agg, got, agg.receive_advertisement, refusals)
        keys_msg = agg.keys_message()
        advertised = agg.transcript()["advertised"]
        got = stage("keys", {r: keys_msg for r in advertised}, None)
        _deliver(agg, got, agg.receive_shares, refusals)
        got = stage("routed", agg.routed_messages(), weights)
        _deliver(agg, got, agg.receive_masked_input, refusals)
        masked = agg.transcript()["masked_input"]
        req = agg.unmask_request()
        got = stage("unmask", {r: req for r in masked}, None)
        _deliver(agg, got, agg.receive_unmask, refusals)
        ring = agg.result()
        signed = from_ring(ring, quant.bit_width).astype(np.float64)
        result.sum_norm = float(np.linalg.norm(signed))
        result.norm_bound = spec.sum_norm_bound(len(masked), dim)
        if not result.sum_norm <= result.norm_bound:
            raise SumOutOfBound(
                f"the unmasked sum has norm {result.sum_norm:.4g} > {result.norm_bound:.4g}, "
                f"the most {len(masked)} regions can send; not applied"
            )
        grad = quant.decode_sum(ring, divisor=len(masked) * spec.vehicles_per_step)
        w = flatten(weights)
        result.weights = unflatten(w - server_lr * grad, weights)
    except SecAggAbort as e:
        result.reason = str(e)
        LOG.error("secure round %d failed: %s", round_idx, e)
    result.used = sorted(agg.transcript()["summed"]) if result.weights is not None else []
    for region in sorted(result.manifests):
        if region in result.used:
            book.record(result.manifests[region], round_idx)
        else:  # ε spent (the manifest says so), the input not used: say why
            result.rejected[region] = (
                f"masked input not used: {result.reason or 'the round did not sum it'}"
            )
    result.refusals = {r: why for r, why in refusals.items() if r not in result.rejected}
    result.transcript = {
        **agg.transcript(),
        "reply_refusals": refusals,
        "signed_bound_checks": {
            r: {"norm_at_most": m.update_norm_bound, "ledger_seq": m.ledger_seq}
            for r, m in sorted(result.manifests.items())
        },
        "region_norm_bound": bound,
        "receipts": result.used,
        "sum_norm": None if math.isnan(result.sum_norm) else result.sum_norm,
        "sum_norm_bound": None if math.isnan(result.norm_bound) else result.norm_bound,
        "scale": spec.scale,
        "stages": costs,
        "applied": result.weights is not None,
        "failure": result.reason,
    }
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / TRANSCRIPT, "a") as f:
            f.write(json.dumps(result.transcript, sort_keys=True) + "\n")
    return result


def stage_config(
    run_id: str, round_idx: int, stage: str, payload: bytes, spec: SecureRoundSpec
) -> dict[str, Any]:
    """The config record of one stage message."""
    return {
        "run-id": run_id,
        "round": round_idx,
        STAGE_KEY: stage,
        PAYLOAD_KEY: payload,
        **spec.to_config(),
    }


def grid_transport(
    grid: Any,
    region_nodes: Mapping[str, int],
    run_id: str,
    round_idx: int,
    spec: SecureRoundSpec,
    timeout: float,
    stop: threading.Event | None = None,
) -> Transport:
    """A transport over Flower's Grid: one QUERY message per region, replies within `timeout`."""
    from fedfsd.aggregator.server_app import exchange

    def send(
        stage: str, out: dict[str, bytes], weights: Mapping[str, np.ndarray] | None
    ) -> dict[str, bytes]:
        msgs: list[Message] = []
        node_region: dict[int, str] = {}
        for region, payload in out.items():
            node = region_nodes[region]
            node_region[node] = region
            values = stage_config(run_id, round_idx, stage, payload, spec)
            content = RecordDict(
                wire.packed_records(weights, wire.CONFIG, values)
                if weights is not None
                else {wire.CONFIG: ConfigRecord(values)}
            )
            msgs.append(
                Message(
                    content=content,
                    dst_node_id=node,
                    message_type=MessageType.QUERY,
                    group_id=f"secagg-{round_idx}-{stage}",
                    ttl=timeout + TTL_MARGIN_S,
                )
            )
        t0 = time.monotonic()
        replies = exchange(grid, msgs, timeout, stop)
        got: dict[str, bytes] = {}
        for reply in replies:
            src = node_region.get(reply.metadata.src_node_id)
            if src is None or reply.has_error():
                continue
            rec = reply.content.config_records.get(REPLY_KEY)
            data = rec.get("payload") if rec else None
            if isinstance(data, bytes):
                got[src] = data
            elif rec is not None:
                LOG.warning(
                    "secure round %d: %s refused stage %s: %s",
                    round_idx,
                    src,
                    stage,
                    rec.get("refused_reason", "?"),
                )
        LOG.info(
            "secure round %d stage %s: %d/%d replies in %.1f s",
            round_idx,
            stage,
            len(got),
            len(out),
            time.monotonic() - t0,
        )
        return got

    return send


def flower_round(
    grid: Any,
    s: Any,
    state: Any,
    rnd: int,
    nodes: list[int],
    node_regions: Mapping[int, str],
    run_dir: Path,
    stop: threading.Event | None = None,
    book: ReceiptBook | None = None,
) -> tuple[Any, str, dict[str, np.ndarray] | None]:
    """One secure round of `run_federation` (RunSettings `s`, checkpoint `state`): the
    (RoundOutcome, note, new weights or None). The participants are the answering regions whose
    names the liveness ping learnt and whose long-term keys `region-keys` registers. `book`:
    the run's receipts (signature and ledger-head checks, receipts.jsonl)."""
    from fedfsd.aggregator.server_app import RoundOutcome
    from fedfsd.privacy.signing import load_region_keys

    out = RoundOutcome()
    if not s.region_keys:
        return out, "not sent: secure-aggregation needs region-keys", None
    keys = load_region_keys(s.region_keys)
    region_nodes = {node_regions[n]: n for n in nodes if node_regions.get(n) in keys}
    n = len(region_nodes)
    if n < max(2, s.min_regions):
        note = f"not sent: {n} registered region(s) answer, a secure round needs {s.min_regions}"
        LOG.error("round %d %s", rnd, note)
        return out, note, None
    dim = int(sum(np.asarray(v).size for v in state.weights.values()))
    spec = make_spec(
        dim=dim,
        clip_norm=s.clip_norm,
        noise_multiplier=s.noise_multiplier,
        vehicles_per_step=s.vehicles_per_step,
        frames_per_vehicle=s.frames_per_vehicle,
        model=s.model,
    )
    res = run_secure_round(
        regions=sorted(region_nodes),
        region_keys=keys,
        spec=spec,
        run_id=state.run_id,
        round_idx=rnd,
        threshold=s.secagg_threshold or default_threshold(n),
        weights=state.weights,
        server_lr=s.server_lr,
        transport=grid_transport(
            grid, region_nodes, state.run_id, rnd, spec, s.round_timeout, stop
        ),
        run_dir=run_dir,
        book=book,
    )
    outcome_rows(res, rnd, out)
    out.missing = n - len(res.transcript.get("summed", []))
    if res.weights is None:
        out.errors.append(("secure-aggregation", res.reason))
    return out, "", res.weights


def epsilon_row(rnd: int, m: wire.UpdateManifest) -> tuple[Any, ...]:
    """The epsilon.csv row of a secure round's signed manifest: ε (enforced, as on its ledger
    line), RDP, budget, δ, then the trust model and both ε (server_app.EPSILON_COLUMNS)."""
    return (
        rnd,
        m.region,
        m.epsilon,
        m.epsilon_rdp,
        m.epsilon_budget,
        m.delta,
        m.trust_model,
        m.epsilon_distributed,
        m.epsilon_own_noise,
    )


def outcome_rows(res: SecureRoundResult, rnd: int, out: Any) -> None:
    """Fill a RoundOutcome: used regions count as accepted (no individual update exists: the
    arrays are empty), excluded or unused inputs as rejected, ε rows from every valid manifest."""
    used = set(res.used)
    out.accepted = [(r, {}, 1.0) for r in sorted(used)]
    out.rejected = sorted(res.rejected.items())
    out.refused = sorted(res.refusals.items())
    out.epsilon_rows = [epsilon_row(rnd, res.manifests[r]) for r in sorted(res.manifests)]
