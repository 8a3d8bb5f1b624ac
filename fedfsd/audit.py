"""The fedfsd security log: one JSON object per line for every refusal that matters to an audit.

Why: refused bundles, refused runs, budget refusals and rejected updates were visible only in
Flower's logs or spread over several files. Each side now appends them to one `security.jsonl`
(the region: next to its executor's decisions.jsonl; the aggregator: in the run dir), naming
regions, never node ids. Appends are fsync'd: the log is evidence, not a debug trace.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SECURITY_LOG = "security.jsonl"


def log_event(path: str | Path, side: str, event: str, **fields: Any) -> None:
    """Append one event (`side`: "region" or "aggregator") to the security log at `path`."""
    record = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "side": side,
        "event": event,
        **fields,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """All events of a security log (empty when there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
