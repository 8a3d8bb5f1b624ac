"""Test-only ClientApps for the in-process simulation: honest, tampering and over-budget regions.

Partition 0 and 1 run the real region ClientApp. Partition 2 runs it too, then tampers with the
reply the way a broken or hostile region might, keeping the digest and manifest consistent so
that only the targeted rule can catch it (round 1: over the norm bound, 2: NaN, 3: wrong shape,
4: stale round, later rounds: digest mismatch). Partition 3 has a tiny ε budget and must refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedfsd import wire
from fedfsd.region.client_app import make_client_app

Tamper = Callable[[dict[str, np.ndarray], Any], None]


def _over_norm(u: dict[str, np.ndarray], m: Any) -> None:
    for k in u:
        u[k] = (u[k] + np.float32(1.0)) * np.float32(1000.0)


def _nan(u: dict[str, np.ndarray], m: Any) -> None:
    k = sorted(u)[0]
    u[k] = u[k].copy()
    u[k].flat[0] = np.nan


def _wrong_shape(u: dict[str, np.ndarray], m: Any) -> None:
    k = sorted(u)[0]
    u[k] = np.ascontiguousarray(u[k][:-1])


def _stale(u: dict[str, np.ndarray], m: Any) -> None:
    m.round = m.round - 1


TAMPER_BY_ROUND: dict[int, tuple[str, Tamper]] = {
    1: ("over-norm", _over_norm),
    2: ("nan", _nan),
    3: ("wrong-shape", _wrong_shape),
    4: ("stale-round", _stale),
}
EXPECTED_REASON = {
    1: "exceeds bound",
    2: "NaN or inf",
    3: "shape",
    4: "stale round",
    5: "digest mismatch",
}


def tamper_reply(message: Message, reply: Message, rnd: int) -> Message:
    """The honest reply with its update altered; digest and norm recomputed to match."""
    content = reply.content
    u = wire.arrays_from(content, wire.MANIFEST)
    m = wire.manifest_from_bytes(content.config_records[wire.MANIFEST][wire.MANIFEST_KEY])
    if rnd in TAMPER_BY_ROUND:
        TAMPER_BY_ROUND[rnd][1](u, m)
        m.sha256 = wire.array_digest(u)
    else:  # arrays changed after the manifest was made
        k = sorted(u)[0]
        u[k] = u[k] * np.float32(0.5)
    m.update_norm = wire.l2_norm(u)
    records = wire.packed_records(u, wire.MANIFEST, {wire.MANIFEST_KEY: m.SerializeToString()})
    return Message(
        RecordDict({**records, wire.METRICS: content.metric_records[wire.METRICS]}),
        reply_to=message,
    )


def make_test_client_app(sim: dict[str, Any]) -> ClientApp:
    """Partition 0/1 honest, 2 tampering, 3 over budget (see module doc)."""
    honest = make_client_app(sim)
    broke = make_client_app({**sim, "sim-epsilon-budget": 1e-3})
    app = ClientApp()

    def _pick(context: Context) -> ClientApp:
        return broke if int(context.node_config["partition-id"]) == 3 else honest

    @app.train()
    def train(message: Message, context: Context) -> Message:
        reply = _pick(context)(message, context)
        if int(context.node_config["partition-id"]) == 2 and reply.content.array_records:
            rnd = int(message.content.config_records[wire.CONFIG]["round"])
            reply = tamper_reply(message, reply, rnd)
        return reply

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return _pick(context)(message, context)

    @app.query()  # the aggregator's liveness ping before each round
    def query(message: Message, context: Context) -> Message:
        return _pick(context)(message, context)

    return app


def make_crash_resume_server_app(cfg: dict[str, Any], snapshot: str, stop: Any = None):
    """A ServerApp that emulates an aggregator crash and two restarts with `resume=true`.

    1. rounds 1-3; keep a copy of the round-3 checkpoint;
    2. restart, resume to round 4; copy run-dir to `snapshot`;
    3. crash emulation: put the round-3 checkpoint back, as if the aggregator died after the
       regions released round 4 but before its checkpoint was written (round-4 log rows stay);
    4. restart, resume: round 4 again;
    5. restart, resume to round 5 with `min-regions` 3, which the honest regions cannot meet;
    6. restart, resume to round 6 asking for 5 of the 4 nodes, with a 1 s bound on that wait.

    Each phase is a fresh `run_federation` call (new strategy object, state read back from
    disk), exactly what a restarted aggregator does; one simulation saves Ray start-ups.
    `stop` (a threading.Event) ends every phase early, so a failed simulation can be torn down.
    """
    import shutil
    from pathlib import Path

    from flwr.serverapp import Grid, ServerApp

    from fedfsd.aggregator.checkpoint import CHECKPOINT
    from fedfsd.aggregator.server_app import run_federation
    from fedfsd.aggregator.settings import parse_settings

    server = ServerApp()
    run_dir = Path(cfg["run-dir"])

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, parse_settings({**cfg, "num-server-rounds": 3}), run_dir, stop)
        kept = Path(snapshot + "-round3.npz")
        shutil.copy2(run_dir / CHECKPOINT, kept)
        resume = {**cfg, "resume": True}
        run_federation(grid, parse_settings({**resume, "num-server-rounds": 4}), run_dir, stop)
        shutil.copytree(run_dir, snapshot)
        shutil.copy2(kept, run_dir / CHECKPOINT)
        run_federation(grid, parse_settings({**resume, "num-server-rounds": 4}), run_dir, stop)
        last = {**resume, "num-server-rounds": 5, "min-regions": 3}
        run_federation(grid, parse_settings(last), run_dir, stop)
        more_nodes = {**resume, "num-server-rounds": 6, "min-regions": 5, "node-wait": 1.0}
        run_federation(grid, parse_settings(more_nodes), run_dir, stop)

    return server
