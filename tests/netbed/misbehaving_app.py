"""A misbehaving region's ClientApp (test only): trains honestly, then sends bad updates.

Round 1: an oversized update (norm ×1000 and an extra 4 MiB array the model does not have).
Round 2 and later: a malformed update (a packed array whose bytes are not a valid array at all).
The manifest digest is recomputed where possible, so only the aggregator's own checks can stop it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedfsd import wire
from fedfsd.region.client_app import make_client_app

honest = make_client_app()
app = ClientApp()


def _bad_reply(message: Message, reply: Message, rnd: int) -> Message:
    content = reply.content
    u = wire.arrays_from(content, wire.MANIFEST)
    m = wire.manifest_from_bytes(content.config_records[wire.MANIFEST][wire.MANIFEST_KEY])
    if rnd <= 1:
        u = {k: (v + np.float32(1.0)) * np.float32(1000.0) for k, v in u.items()}
        u["zz.extra"] = np.ones(1 << 20, np.float32)  # 4 MiB the model does not have
        m.sha256 = wire.array_digest(u)
        m.update_norm = wire.l2_norm(u)
        records = wire.packed_records(u, wire.MANIFEST, {wire.MANIFEST_KEY: m.SerializeToString()})
    else:  # the packed array's bytes are not an array at all; its layout is honest
        records = wire.packed_records(u, wire.MANIFEST, {wire.MANIFEST_KEY: m.SerializeToString()})
        total = sum(v.size for v in u.values())
        records[wire.ARRAYS] = ArrayRecord(
            {wire.PACKED: Array(dtype="float32", shape=(total,), stype="numpy.ndarray",
                                data=b"\x93NUMPY garbage" * 7)}
        )  # fmt: skip
    return Message(
        RecordDict({**records, wire.METRICS: content.metric_records[wire.METRICS]}),
        reply_to=message,
    )


@app.train()
def train(message: Message, context: Context) -> Message:
    reply = honest(message, context)
    if reply.content.array_records:
        rnd = int(message.content.config_records[wire.CONFIG]["round"])
        reply = _bad_reply(message, reply, rnd)
    return reply


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return honest(message, context)
