"""Sends each node one train message carrying `pad-mib` MiB of zeros (a few MiB of unique
chunks on the wire, many more once inflated) and records the replies to `result-path`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()  # never run by a fedfsd region: its executor runs only local code


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    deadline = time.monotonic() + float(cfg["node-wait"])
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.1)
        nodes = list(grid.get_node_ids())
    pad = np.zeros((int(cfg["pad-mib"]), 1 << 18), np.float32)  # 1 MiB per row
    msgs = [
        Message(
            RecordDict({"arrays": ArrayRecord([pad]), "config": ConfigRecord({"round": 1})}),
            dst_node_id=n,
            message_type="train",
        )
        for n in nodes
    ]
    ids = set(grid.push_messages(msgs))
    replies: list[Message] = []
    end = time.monotonic() + float(cfg["round-timeout"])
    while ids and time.monotonic() < end:
        got = list(grid.pull_messages(ids))
        replies += got
        ids -= {m.metadata.reply_to_message_id for m in got}
        time.sleep(0.05)
    out = {
        "nodes": len(nodes),
        "errors": [f"{r.error.code}:{r.error.reason}" for r in replies if r.has_error()],
        "ok": sum(not r.has_error() for r in replies),
    }
    Path(str(cfg["result-path"])).write_text(json.dumps(out))
