"""Tiny ServerApp + ClientApp for deployment tests: w ← w + 1 per region per round (mean).

The ServerApp drives the Grid itself with a bounded wait for nodes and a fast reply poll, and
writes what it saw (per-round replies, errors, timings) to the run config's `result-path`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    w = msg.content["arrays"].to_numpy_ndarrays()[0]
    region = str(context.node_config.get("region", "?"))
    content = RecordDict(
        {
            "arrays": ArrayRecord([w + 1.0]),
            "metrics": MetricRecord({"num-examples": 1}),
            "manifest": ConfigRecord({"region": region}),
        }
    )
    return Message(content, reply_to=msg)


def _send(grid: Grid, msgs: list[Message], timeout: float) -> list[Message]:
    ids = set(grid.push_messages(msgs))
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while ids and time.monotonic() < deadline:
        got = list(grid.pull_messages(ids))
        out += got
        ids -= {m.metadata.reply_to_message_id for m in got}
        time.sleep(0.05)
    return out


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    rounds, quorum = int(cfg["num-server-rounds"]), int(cfg["min-regions"])
    timeout, node_wait = float(cfg["round-timeout"]), float(cfg["node-wait"])
    w = np.zeros(4, dtype=np.float32)
    result: dict = {"rounds": []}
    for rnd in range(1, rounds + 1):
        t0 = time.monotonic()
        deadline = time.monotonic() + node_wait
        nodes = list(grid.get_node_ids())
        while len(nodes) < quorum and time.monotonic() < deadline:
            time.sleep(0.1)
            nodes = list(grid.get_node_ids())
        msgs = [
            Message(
                RecordDict({"arrays": ArrayRecord([w]), "config": ConfigRecord({"round": rnd})}),
                dst_node_id=n,
                message_type="train",
            )
            for n in nodes
        ]
        replies = _send(grid, msgs, timeout) if msgs else []
        ok = [r for r in replies if not r.has_error()]
        errors = [f"{r.error.code}:{r.error.reason}" for r in replies if r.has_error()]
        if len(ok) >= quorum:
            w = np.mean([r.content["arrays"].to_numpy_ndarrays()[0] for r in ok], axis=0)
        result["rounds"].append(
            {
                "round": rnd,
                "nodes": len(nodes),
                "ok": len(ok),
                "errors": errors,
                "regions": sorted(str(r.content["manifest"]["region"]) for r in ok),
                "seconds": time.monotonic() - t0,
            }
        )
    result["final"] = w.tolist()
    if cfg["result-path"]:
        Path(str(cfg["result-path"])).write_text(json.dumps(result))
