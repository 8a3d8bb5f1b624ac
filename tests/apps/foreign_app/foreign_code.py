"""An app bundle that no region has approved. Its ClientApp writes a marker file: if that file
ever exists, a region ran code pushed by the aggregator side."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    Path(str(msg.content["config"]["marker-path"])).write_text("foreign code ran here")
    return Message(RecordDict({"config": ConfigRecord({"pwned": True})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    deadline = time.monotonic() + float(cfg["node-wait"])
    nodes = list(grid.get_node_ids())
    while len(nodes) < int(cfg["min-regions"]) and time.monotonic() < deadline:
        time.sleep(0.1)
        nodes = list(grid.get_node_ids())
    msgs = [
        Message(
            RecordDict({"config": ConfigRecord({"marker-path": str(cfg["marker-path"])})}),
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
        "replies": [
            {"error": f"{r.error.code}:{r.error.reason}" if r.has_error() else None}
            for r in replies
        ],
    }
    Path(str(cfg["result-path"])).write_text(json.dumps(out))
