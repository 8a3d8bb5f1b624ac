"""The aggregator's Flower ServerApp: rounds with a quorum and timeouts, verification, checkpoints.

The round loop drives the `Grid` itself instead of using `Strategy.start`, for two reasons found
in Flower 1.39 (docs/notes/flower-1.39.md): `sample_nodes` waits forever for a dead node,
and a train reply without arrays (a region refusing over budget) makes the stock strategies
exit. Here every wait is bounded (`node-wait`, `round-timeout`), a refusal is an ordinary
outcome, every update is verified before it counts, and a round without quorum is logged as
failed while the run goes on.

Files in `run-dir` (see fedfsd.aggregator.checkpoint): checkpoint.npz (every round),
metrics.csv, epsilon.csv, rejected.jsonl, rounds.jsonl, receipts.jsonl and ledger_heads.json
(fedfsd.aggregator.receipts), tensorboard/ (fedfsd.aggregator.tracking), and at the end
global_model.npz, its global_model.json sidecar and metrics.png.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedfsd import wire
from fedfsd.aggregator import checkpoint as ck
from fedfsd.aggregator.initial_model import load_initial_model
from fedfsd.aggregator.liveness import alive_nodes
from fedfsd.aggregator.model_meta import write_global_model_meta
from fedfsd.aggregator.outcome import summarise, write_summary
from fedfsd.aggregator.plots import ALL_REGIONS, EVALUATED, plot_run
from fedfsd.aggregator.receipts import ReceiptBook
from fedfsd.aggregator.settings import RunSettings, parse_settings
from fedfsd.aggregator.strategy import ServerOptimizer, make_server_optimizer
from fedfsd.aggregator.tracking import RunTracker
from fedfsd.aggregator.update_checks import Expectation, verify_update
from fedfsd.errors import InputError

LOG = logging.getLogger("flwr.fedfsd.aggregator")
MAX_NUM_EXAMPLES = 1 << 30
TTL_MARGIN_S = 30.0  # a coarse bucket is a power of two far below this


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def registry_weights(s: RunSettings) -> dict[str, np.ndarray]:
    """The registry model's weights with a fixed seed (the MLP's residual starts at zero)."""
    from fedfsd.models import build_model, get_weights

    kw: dict[str, Any] = {"seed": s.model_seed}
    if s.model == "bev_cnn":
        kw["in_channels"] = s.bev_channels
    return get_weights(build_model(s.model, s.n_features, s.n_labels, **kw))


def initial_model(s: RunSettings) -> tuple[dict[str, np.ndarray], str]:
    """(round-0 weights, sha256 of the initial-model file or "" when built from the registry)."""
    reference = registry_weights(s)
    if not s.initial_model:
        return reference, ""
    return load_initial_model(s.initial_model, reference, f"model {s.model!r}")


def initial_weights(s: RunSettings) -> dict[str, np.ndarray]:
    """The round-0 global model: `initial-model`'s weights, or the registry model's."""
    return initial_model(s)[0]


def exchange(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    stop: threading.Event | None = None,
    poll: float = 0.5,
) -> list[Message]:
    """Push messages, then pull replies until all arrived, `timeout` passed or `stop` is set.

    The same loop as `Grid.send_and_receive`, with two differences: a shutdown can interrupt
    it, and it polls every 0.5 s (Flower's gRPC/HTTP grid sleeps a fixed 3 s between pulls).
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() >= deadline:
            break
        if stop is not None and stop.wait(poll):
            break
        if stop is None:
            time.sleep(poll)
    return replies


@dataclass
class RoundOutcome:
    """What happened to the train messages of one round."""

    accepted: list[tuple[str, dict[str, np.ndarray], float]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (region, reason)
    refused: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    missing: int = 0
    metrics_rows: list[tuple[int, str, str, float]] = field(default_factory=list)
    epsilon_rows: list[tuple[int, str, float, float, float, float]] = field(default_factory=list)


def _num_examples(content: RecordDict) -> float | str:
    """The reply's weight, or a reason why it is unacceptable."""
    rec = content.metric_records.get(wire.METRICS)
    if rec is None or wire.NUM_EXAMPLES not in rec:
        return f"no {wire.NUM_EXAMPLES} in the reply's metrics"
    n = rec[wire.NUM_EXAMPLES]
    if isinstance(n, list) or not np.isfinite(n) or n < 1 or n > MAX_NUM_EXAMPLES:
        return f"{wire.NUM_EXAMPLES} must be a number in [1, {MAX_NUM_EXAMPLES}], got {n!r}"
    if int(n) != n or int(n) & (int(n) - 1):
        return f"{wire.NUM_EXAMPLES} must be 1 or a power-of-two bucket, got {n!r}"
    return float(n)


def _manifest(content: RecordDict) -> wire.UpdateManifest | None:
    rec = content.config_records.get(wire.MANIFEST)
    raw = rec.get(wire.MANIFEST_KEY) if rec is not None else None
    if not isinstance(raw, bytes):
        return None
    try:
        return wire.manifest_from_bytes(raw)
    except ValueError:
        return None


def judge_train_reply(
    reply: Message,
    exp: Expectation,
    node_regions: dict[int, str],
    out: RoundOutcome,
    book: ReceiptBook | None = None,
) -> None:
    """Sort one train reply into accepted / rejected / refused / error.

    With a `book`, an update also needs a valid signature and a ledger head that extends the
    region's last one; each accepted manifest becomes a receipt.
    """
    node = reply.metadata.src_node_id
    region = node_regions.get(node, f"node-{node}")
    if reply.has_error():
        out.errors.append((region, f"{reply.error.code}: {reply.error.reason}"))
        return
    content = reply.content
    manifest = _manifest(content)
    if manifest is not None and manifest.region:
        bound_to = node_regions.setdefault(node, manifest.region)
        if bound_to != manifest.region:  # one node, one region, for the whole run
            out.rejected.append((region, f"node claims region {manifest.region!r}"))
            return
        region = manifest.region
        if any(r == region for r, _, _ in out.accepted):
            out.rejected.append((region, "a second update for this region in this round"))
            return
    if manifest is not None and manifest.refused_reason:
        if content.array_records:
            out.rejected.append((region, "refused manifest but arrays were sent"))
        else:
            out.refused.append((region, manifest.refused_reason))
            out.epsilon_rows.append(_eps_row(exp.round_idx, region, manifest, refused=True))
        return
    if set(content.array_records) != {wire.ARRAYS}:
        out.rejected.append((region, f"expected one ArrayRecord {wire.ARRAYS!r}"))
        return
    if manifest is None:  # the layout travels next to the manifest: nothing to unpack
        out.rejected.append((region, "missing manifest"))
        return
    try:
        update = wire.arrays_from(content, wire.MANIFEST, expected=exp.shapes)
    except wire.LayoutError as e:
        out.rejected.append((region, f"packed arrays refused: {e}"))
        return
    except Exception as e:  # hostile bytes must not crash the aggregator
        out.rejected.append((region, f"undecodable arrays: {type(e).__name__}"))
        return
    weight = _num_examples(content)
    reason = weight if isinstance(weight, str) else verify_update(update, manifest, exp)
    if reason is None and book is not None:
        assert manifest is not None
        reason = book.check(manifest)
    if reason is not None:
        out.rejected.append((region, reason))
        return
    assert manifest is not None and not isinstance(weight, str)
    if book is not None:
        book.record(manifest, exp.round_idx)
    out.accepted.append((region, update, weight))
    out.epsilon_rows.append(_eps_row(exp.round_idx, region, manifest))
    train_metrics = content.metric_records[wire.METRICS]
    for k, v in train_metrics.items():
        if k != wire.NUM_EXAMPLES and isinstance(v, int | float) and np.isfinite(v):
            out.metrics_rows.append((exp.round_idx, region, f"train_{k}", float(v)))


def _eps_row(rnd: int, region: str, m: wire.UpdateManifest, refused: bool = False) -> tuple:
    """One epsilon.csv row; a refusal's unknown RDP ε (sent as 0) is left empty, not a fake 0."""
    rdp = None if refused and not m.epsilon_rdp > 0 else m.epsilon_rdp
    return (rnd, region, m.epsilon, rdp, m.epsilon_budget, m.delta)


# A secure run's epsilon.csv adds the trust model and both ε of each signed manifest after the
# usual columns (readers go by column name); a plain run writes the usual columns only.
EPSILON_COLUMNS = (*ck.EPSILON_HEADER, "trust_model", "epsilon_distributed", "epsilon_own_noise")


def append_epsilon(path: Path, rows: list[tuple], secure: bool) -> None:
    """Append ε rows under the file's own header (one it already has wins: a run resumed from
    files of another version keeps its columns), padding or cutting rows to fit."""
    header: tuple[str, ...] = EPSILON_COLUMNS if secure else ck.EPSILON_HEADER
    if path.exists() and path.stat().st_size > 0:
        with open(path, encoding="utf-8") as f:
            header = tuple(f.readline().strip().split(","))
    n = len(header)
    ck.append_csv(path, header, [(*row, *[""] * (n - len(row)))[:n] for row in rows])


def last_known_epsilon(run_dir: Path) -> dict[str, tuple]:
    """Each region's last epsilon.csv row (ε never decreases; refusals may not know it)."""
    known: dict[str, tuple] = {}
    for r in ck.read_csv(run_dir / ck.EPSILON_CSV):
        with contextlib.suppress(KeyError, ValueError):
            known[r["region"]] = (
                int(r["round"]),
                r["region"],
                float(r["epsilon"]),
                float(r["epsilon_rdp"]) if r["epsilon_rdp"] else None,
                float(r["epsilon_budget"]),
                float(r["delta"]),
            )
    return known


def keep_known_epsilon(
    rows: list[tuple], refused: set[str], known: dict[str, tuple]
) -> list[tuple]:
    """A refusal's manifest may carry ε 0.0 (the region could not read its ledger): record the
    region's last known ε instead of a fall to zero. Updates `known` with the rows kept."""
    out = []
    for row in rows:
        prev = known.get(row[1])
        if row[1] in refused and prev is not None and not row[2] >= prev[2]:
            rdp = max((v for v in (prev[3], row[3]) if v is not None), default=None)
            row = (row[0], row[1], prev[2], rdp, row[4], row[5])
        known[row[1]] = row
        out.append(row)
    return out


def _messages(
    nodes: list[int],
    kind: str,
    weights: Mapping[str, np.ndarray],
    cfg: dict,
    rnd: int,
    timeout: float,
) -> list[Message]:
    """One message per node; it expires shortly after the round stops waiting for it.

    Flower's default TTL is 12 h: a region that comes back after an outage would otherwise work
    through every queued train message, spending privacy budget on rounds nobody waits for.
    """
    ttl = float(timeout) + TTL_MARGIN_S
    msgs = []
    for node in nodes:
        content = RecordDict(wire.packed_records(weights, wire.CONFIG, cfg))
        msgs.append(
            Message(
                content=content, dst_node_id=node, message_type=kind, group_id=str(rnd), ttl=ttl
            )
        )
    return msgs


def evaluate_round(
    grid: Grid,
    nodes: list[int],
    weights: Mapping[str, np.ndarray],
    cfg: dict,
    rnd: int,
    timeout: float,
    node_regions: dict[int, str],
    stop: threading.Event | None = None,
) -> list[tuple[int, str, str, float]]:
    """Per-region metrics of the global model on each region's held-out episodes."""
    rows: list[tuple[int, str, str, float]] = []
    replies = exchange(
        grid, _messages(nodes, MessageType.EVALUATE, weights, cfg, rnd, timeout), timeout, stop
    )
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            name = node_regions.get(node, f"node-{node}")
            LOG.warning("round %d: evaluate error from %s: %s", rnd, name, reply.error.reason)
            continue
        info = reply.content.config_records.get(wire.REGION)
        region = str(info.get("name")) if info and info.get("name") else None
        region = region or node_regions.get(node, f"node-{node}")
        node_regions.setdefault(node, region)
        if info and info.get("refused_reason"):
            LOG.warning("round %d: %s refused evaluation: %s", rnd, region, info["refused_reason"])
        metrics: Mapping[str, Any] = reply.content.metric_records.get(wire.METRICS, {})
        for k, v in metrics.items():
            if k != wire.NUM_EXAMPLES and isinstance(v, int | float) and np.isfinite(v):
                rows.append((rnd, region, k, float(v)))
    return rows


class RunRefused(InputError, RuntimeError):
    """The run cannot start or end safely in this run-dir (one line says why)."""


def _server_optimizer(s: RunSettings) -> ServerOptimizer:
    if s.server_optimizer == "fedadam" and s.server_lr >= 0.5:
        LOG.warning(
            "fedadam with server-lr %g: FedAdam moves each coordinate by up to about server-lr "
            "per round (m/√v is O(1)); a much smaller server-lr (e.g. 0.01-0.1) is usual",
            s.server_lr,
        )
    return make_server_optimizer(
        s.server_optimizer,
        server_lr=s.server_lr,
        momentum=s.server_momentum,
        beta1=s.server_beta1,
        beta2=s.server_beta2,
        tau=s.server_tau,
    )


def _start_state(
    s: RunSettings, run_dir: Path, model: Mapping[str, np.ndarray]
) -> tuple[ck.Checkpoint, ServerOptimizer]:
    """Resume only from a verified checkpoint; start fresh only in a run-dir without a run.

    Starting a new run where one was (its checkpoint lost or corrupt) would send round 1 again:
    every region would spend ε a second time on rounds it already released.
    """
    strategy = _server_optimizer(s)
    try:
        prev = ck.load_checkpoint(run_dir)
        if prev is not None:
            ck.check_same_layout(prev.weights, model, f"{run_dir / ck.CHECKPOINT} weights")
    except ck.CheckpointError as err:
        raise RunRefused(str(err)) from None
    if not s.resume:
        if existing := ck.holds_a_run(run_dir):
            raise RunRefused(
                f"{run_dir} already holds a run ({', '.join(existing)}); "
                "pass resume=true to continue it or choose a new run-dir"
            )
        run_id = s.run_id or uuid.uuid4().hex[:12]
        weights, sha = initial_model(s)
        if sha:
            LOG.info("round-0 model from %s (sha256 %s)", s.initial_model, sha)
        meta = {"server_optimizer": s.server_optimizer, "initial_model_sha256": sha}
        return ck.Checkpoint(round=0, run_id=run_id, weights=weights, meta=meta), strategy
    if prev is None:
        raise RunRefused(
            f"resume=true but {run_dir / ck.CHECKPOINT} is missing: refusing to start a new run "
            "there (its rounds would spend the regions' privacy budget again)"
        )
    was = prev.meta.get("server_optimizer", "fedavg")
    if was != s.server_optimizer:
        raise RunRefused(
            f"{run_dir}: the run used server-optimizer {was!r}, not "
            f"{s.server_optimizer!r}; resume with the same optimiser"
        )
    strategy.load_state_dict(prev.strategy_state)
    ck.truncate_after_round(run_dir, prev.round)
    LOG.info("resuming run %s after round %d", prev.run_id, prev.round)
    return prev, strategy


def run_federation(
    grid: Grid,
    s: RunSettings,
    run_dir: Path,
    stop: threading.Event | None = None,
    flower_run_id: int | None = None,
) -> ck.Checkpoint:
    """All rounds of one run; returns the final state (also on disk).

    Setting `stop` ends the run after the current round (its checkpoint is written), e.g. on
    shutdown; the run can then continue with `resume=true`.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    model = initial_weights(s)
    state, strategy = _start_state(s, run_dir, model)
    book = ReceiptBook.from_settings(run_dir, s.region_keys, s.allow_unsigned)
    book.drop_after(state.round)  # receipts of rounds after the checkpoint come again
    (run_dir / ck.REJECTED_JSONL).touch()  # always present: empty means nothing was rejected
    node_regions: dict[int, str] = {
        int(k): v for k, v in state.meta.get("node_regions", {}).items()
    }
    failed_list = failed_rounds(state)
    run_refused: dict[str, str] = dict(state.meta.get("run_refused", {}))
    ended = ""
    model_round = _last_model_round(run_dir)  # the round that last changed the global model
    known_eps = last_known_epsilon(run_dir)
    run_meta = {
        "server_optimizer": s.server_optimizer,
        "initial_model_sha256": str(state.meta.get("initial_model_sha256", "")),
    }
    tracker = RunTracker(run_dir, state.round)  # run-dir/tensorboard/
    for rnd in range(state.round + 1, s.num_server_rounds + 1):
        if stop is not None and stop.is_set():
            LOG.warning("stop requested: ending the run after round %d", state.round)
            break
        t0 = time.monotonic()
        cfg = {
            **s.train_request(),
            "run-id": state.run_id,
            "round": rnd,
            wire.ROUNDS_KEY: s.num_server_rounds,  # for the regions' budget pre-flight
        }
        if run_meta["initial_model_sha256"]:  # sent only when set: older regions ignore no key
            cfg["initial-model-sha256"] = run_meta["initial_model_sha256"]
        nodes, listed = alive_nodes(
            grid,
            grid.get_node_ids,
            s.min_regions,
            s.node_wait_s,
            rnd,
            node_regions,
            stop,
            not_counted=run_refused,
        )
        secure_w: dict[str, np.ndarray] | None = None
        if s.secure_aggregation:  # one DP-FedSGD step from the regions' unmasked noisy sum
            from fedfsd.aggregator import secure_round

            out, note, secure_w = secure_round.flower_round(
                grid, s, state, rnd, nodes, node_regions, run_dir, stop, book
            )
        else:
            out, note = _train_round(
                grid, s, state, cfg, rnd, (nodes, listed), node_regions, book, stop, run_refused
            )
        if not note:  # a quorum answered: the round (and its evaluation) went to every region
            nodes = listed
        out.epsilon_rows = keep_known_epsilon(
            out.epsilon_rows, {r for r, _ in out.refused}, known_eps
        )
        # Regions score only a global model they received for training in this run and round
        # (fedfsd.privacy.metrics): evaluation is of the model this round started from.
        sent = state.weights
        sent_from = model_round
        ok = secure_w is not None or len(out.accepted) >= s.min_regions
        if ok:
            model_round = rnd
            state.weights = (
                secure_w
                if secure_w is not None
                else strategy.step(state.weights, [(u, w) for _, u, w in out.accepted])
            )
        _log_round_problems(run_dir, rnd, out, ok, nodes, node_regions, s.min_regions)
        security_events(run_dir, state.run_id, rnd, out)
        evaluated = bool(nodes) and s.evaluates_after(rnd)
        eval_rows = (
            evaluate_round(grid, nodes, sent, cfg, rnd, s.evaluate_timeout_s, node_regions, stop)
            if evaluated
            else []
        )
        ck.append_csv(
            run_dir / ck.METRICS_CSV,
            ck.METRICS_HEADER,
            [*out.metrics_rows, *eval_rows, *evaluation_marks(rnd, evaluated, sent_from)],
        )
        append_epsilon(run_dir / ck.EPSILON_CSV, out.epsilon_rows, s.secure_aggregation)
        summary = _round_summary(rnd, ok, len(nodes), out, eval_rows, t0, run_meta, note)
        ck.append_jsonl(run_dir / ck.ROUNDS_JSONL, summary)
        tracker.log_round(summary, out, eval_rows)
        if not ok:
            failed_list.append(rnd)
        _save_round(run_dir, state, strategy, rnd, node_regions, failed_list, run_meta, run_refused)
        LOG.info(
            "round %d %s: accepted %s, rejected %s, refused %s, missing %d (%.1f s)",
            rnd,
            summary["status"],
            summary["accepted"],
            summary["rejected"],
            summary["refused"],
            out.missing,
            summary["seconds"],
        )
        left = {node_regions.get(n, f"node-{n}") for n in listed} - set(run_refused)
        if run_refused and len(left) < s.min_regions:
            ended = (
                f"ended after round {rnd}: {', '.join(sorted(run_refused))} refused the run "
                f"up front and {len(left)} region(s) remain, quorum is {s.min_regions}"
            )
            LOG.error("run %s %s", state.run_id, ended)
            break
    tracker.close()
    summary_doc = summarise(
        run_dir,
        rounds_asked=s.num_server_rounds,
        fedfsd_run_id=state.run_id,
        flower_run_id=flower_run_id,
        ended=ended,
        run_refused=run_refused,
    )
    write_summary(run_dir, summary_doc)
    state.meta["ok"] = summary_doc["ok"]
    try:  # never replace the global model with one that lacks or reshapes a layer
        ck.check_same_layout(state.weights, model, "the final global model")
    except ck.CheckpointError as err:
        raise RunRefused(f"{err}; {run_dir / ck.GLOBAL_MODEL} left as it was") from None
    ck.save_global_model(run_dir, state.weights)
    write_global_model_meta(run_dir, s, state.weights, state.run_id)
    plot_run(run_dir, s.plot_metric)
    return state


def _train_round(
    grid: Grid,
    s: RunSettings,
    state: ck.Checkpoint,
    cfg: dict[str, Any],
    rnd: int,
    alive: tuple[list[int], list[int]],
    node_regions: dict[int, str],
    book: ReceiptBook,
    stop: threading.Event | None,
    run_refused: dict[str, str],
) -> tuple[RoundOutcome, str]:
    """Send the train messages and judge every reply; below the quorum nothing is sent.

    `alive`: the nodes that answered the liveness ping, and the nodes the SuperLink lists. The
    quorum counts answering regions that did not refuse the run up front. When it is there, the
    train message goes to every listed region: a slow one still trains, one that refused the
    run refuses again (spending nothing), a dead one costs only the round's timeout. Returns the
    outcome and a note when nothing was sent; regions that refuse the whole run are added to
    `run_refused`.
    """
    answered, listed = alive
    out = RoundOutcome()
    able = [n for n in answered if node_regions.get(n) not in run_refused]
    if len(able) < s.min_regions:
        note = (
            f"not sent: {len(able)} of {len(listed)} connected region(s) answer and take "
            f"part ({_names(able, node_regions)}), quorum is {s.min_regions}"
        )
        LOG.error("round %d %s", rnd, note)
        return out, note
    exp = Expectation.from_weights(
        state.weights, norm_bound=s.update_norm_bound, run_id=state.run_id, round_idx=rnd
    )
    msgs = _messages(listed, MessageType.TRAIN, state.weights, cfg, rnd, s.round_timeout)
    replies = exchange(grid, msgs, s.round_timeout, stop)
    out.missing = len(listed) - len(replies)
    for reply in replies:
        judge_train_reply(reply, exp, node_regions, out, book)
    for region, reason in out.refused:
        if reason.startswith(wire.RUN_REFUSED_PREFIX):
            run_refused[region] = reason
    return out, ""


def _log_round_problems(
    run_dir: Path,
    rnd: int,
    out: RoundOutcome,
    ok: bool,
    nodes: list[int],
    node_regions: Mapping[int, str],
    quorum: int,
) -> None:
    """Rejected updates go to rejected.jsonl; refusals, errors and a missed quorum to the log."""
    for region, reason in out.rejected:
        LOG.warning("round %d: REJECTED update from %s: %s", rnd, region, reason)
        ck.append_jsonl(
            run_dir / ck.REJECTED_JSONL,
            {"round": rnd, "region": region, "reason": reason, "time": _now()},
        )
    for region, reason in out.refused:
        LOG.warning("round %d: %s refused the round: %s", rnd, region, reason)
    for region, reason in out.errors:
        LOG.warning("round %d: %s replied with an error: %s", rnd, region, reason)
    if not ok:
        LOG.error(
            "round %d FAILED: %d accepted update(s) from %d region(s) (%s), quorum is %d",
            rnd,
            len(out.accepted),
            len(nodes),
            _names(nodes, node_regions),
            quorum,
        )


def _round_summary(
    rnd: int,
    ok: bool,
    n_nodes: int,
    out: RoundOutcome,
    eval_rows: list,
    t0: float,
    run_meta: dict[str, str],
    note: str = "",
) -> dict[str, Any]:
    """The rounds.jsonl line of one round (reasons by region; `note` when nothing was sent)."""
    summary: dict[str, Any] = {
        "round": rnd,
        "status": "ok" if ok else "failed",
        "nodes": n_nodes,
        "accepted": sorted(r for r, _, _ in out.accepted),
        "rejected": sorted(r for r, _ in out.rejected),
        "refused": sorted(r for r, _ in out.refused),
        "errors": sorted(r for r, _ in out.errors),
        "missing": out.missing,
        "refused_reasons": dict(out.refused),
        "rejected_reasons": dict(out.rejected),
        "error_reasons": dict(out.errors),
        "epsilon": {row[1]: row[2] for row in out.epsilon_rows},
        "metrics": {f"{r}/{k}": v for _, r, k, v in eval_rows},
        "seconds": round(time.monotonic() - t0, 3),
        "time": _now(),
    }
    if note:
        summary["note"] = note
    if run_meta["initial_model_sha256"]:
        summary["initial_model_sha256"] = run_meta["initial_model_sha256"]
    return summary


def _save_round(
    run_dir: Path,
    state: ck.Checkpoint,
    strategy: ServerOptimizer,
    rnd: int,
    node_regions: dict[int, str],
    failed_list: list[int],
    run_meta: dict[str, str],
    run_refused: dict[str, str],
) -> None:
    """Checkpoint after the round: the next start (or a resume) continues from here."""
    state.round = rnd
    state.strategy_state = strategy.state_dict()
    state.meta = {
        "node_regions": {str(k): v for k, v in node_regions.items()},
        "failed_rounds": failed_list,
        "run_refused": run_refused,
    }
    state.meta.update(run_meta)
    ck.save_checkpoint(run_dir, state)


def security_events(run_dir: Path, run_id: str, rnd: int, out: RoundOutcome) -> None:
    """Rejected updates and refusals of this round into the run's security.jsonl (fedfsd.audit)."""
    from fedfsd.audit import SECURITY_LOG, log_event

    for kind, items in (("update_rejected", out.rejected), ("task_refused", out.refused)):
        for region, reason in items:
            run_level = kind == "task_refused" and reason.startswith(wire.RUN_REFUSED_PREFIX)
            log_event(
                run_dir / SECURITY_LOG,
                "aggregator",
                "run_refused" if run_level else kind,
                region=region,
                run_id=run_id,
                round=rnd,
                reason=reason,
            )


def evaluation_marks(rnd: int, evaluated: bool, model_round: int) -> list[tuple]:
    """metrics.csv rows (region "*") that say what a round's scores are, or that it has none.

    `evaluated` 0: no evaluation after this round (the schedule skipped it, or no region
    answered), so no score of this round is missing by accident. `model_from_round` k < round:
    the model scored was last changed in round k (a failed round leaves it as it was), so equal
    numbers are the same model scored again, not a model that did not improve.
    """
    marks: list[tuple] = []
    if not evaluated:
        marks.append((rnd, ALL_REGIONS, EVALUATED, 0.0))
    elif model_round < rnd - 1:
        marks.append((rnd, ALL_REGIONS, "model_from_round", float(model_round)))
    return marks


def _last_model_round(run_dir: Path) -> int:
    """The last round of rounds.jsonl that changed the global model (0: none)."""
    path = run_dir / ck.ROUNDS_JSONL
    last = 0
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                rec = json.loads(line)
                if rec["status"] == "ok":
                    last = int(rec["round"])
    return last


def _names(nodes: list[int], node_regions: Mapping[int, str]) -> str:
    """Region names of nodes (a node not yet named shows as node-<id>)."""
    return ", ".join(sorted(node_regions.get(n, f"node-{n}") for n in nodes)) or "none"


def failed_rounds(state: ck.Checkpoint) -> list[int]:
    """Rounds of this run (across resumes) that did not reach quorum."""
    return [int(r) for r in state.meta.get("failed_rounds", [])]


def make_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is `defaults` overridden by the Flower run config.

    `flwr run` passes `[tool.flwr.app.config]` (plus `--run-config`); in-process simulation
    (`flwr.simulation.run_simulation`) passes an empty run config, so tests supply `defaults`.
    """
    server = ServerApp()
    base = dict(defaults or {})

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        from fedfsd.flower.pull_backoff import SERVERAPP_SITE, fast_object_pulls

        for site in fast_object_pulls((SERVERAPP_SITE,)):
            LOG.warning("object-pull back-off patch skipped: %s", site)
        s = parse_settings({**base, **dict(context.run_config)})
        run_dir = Path(s.run_dir) if s.run_dir else Path.cwd() / "runs" / f"flwr-{context.run_id}"
        state = run_federation(grid, s, run_dir, flower_run_id=context.run_id)
        failed = failed_rounds(state)
        if failed or not state.meta.get("ok", True):
            # Flower then reports the run `finished:failed` and `fedfsd aggregator run` exits 1.
            raise RunRefused(
                f"{len(failed)} of {state.round} round(s) failed (no quorum): {failed}, "
                f"{s.num_server_rounds} asked; see {run_dir / 'summary.json'}"
            )

    return server


app = make_server_app()
