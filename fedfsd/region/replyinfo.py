"""Whether a ClientApp reply is a refusal, and why: for the executor's decisions.jsonl.

Why: the executor logged "accepted" for every task whose bundle it accepted, also when the
ClientApp then refused the task (budget, pre-flight, policy); an audit read that as work done.
A refusal is a train reply whose manifest carries a refused_reason, or an evaluate reply whose
"region" record does.
"""

from __future__ import annotations

from typing import Any

from fedfsd import wire


def refusal_of(reply: Any) -> str | None:
    """The reason a reply refuses its task, or None when it does not (or cannot be read)."""
    try:
        if reply.has_error():
            return None
        content = reply.content
        rec = content.config_records.get(wire.MANIFEST)
        if rec is not None and isinstance(rec.get(wire.MANIFEST_KEY), bytes):
            reason = wire.manifest_from_bytes(rec[wire.MANIFEST_KEY]).refused_reason
            if reason:
                return str(reason)
        info = content.config_records.get(wire.REGION)
        if info is not None and info.get("refused_reason"):
            return str(info["refused_reason"])
    except Exception:  # an unreadable reply is the aggregator's to judge, not the log's
        return None
    return None
