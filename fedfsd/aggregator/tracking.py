"""TensorBoard event files for a run: the per-round numbers the ML team already reads there.

The aggregator writes `run-dir/tensorboard/` beside metrics.csv and metrics.png: per round the
accepted/rejected/refused/missing region counts, each accepted update's L2 norm, each region's
ε as its manifest stated it, the round time, and whatever evaluation or train metrics the
regions released (only DP-released numbers ever reach the aggregator). `tensorboard --logdir
RUN_DIR` opens it. On resume, events after the checkpoint's round are purged (they are run
again). Tracking never stops a run: a writer that fails is logged and switched off.

`log_document` logs a results document (experiments/) the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

LOG = logging.getLogger("fedfsd.aggregator")
TB_DIR = "tensorboard"
MAX_DOC_SCALARS = 20_000


def _writer(log_dir: Path, purge_step: int | None = None) -> Any:
    from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm over every array of an update (what the egress guard clips)."""
    return float(
        math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in update.values()))
    )


class RunTracker:
    """Per-round scalars of one run, in `run_dir/tensorboard/`."""

    def __init__(self, run_dir: Path, last_round: int = 0) -> None:
        self.log_dir = Path(run_dir) / TB_DIR
        self._w: Any = None
        try:
            self._w = _writer(self.log_dir, purge_step=last_round + 1 if last_round else None)
        except Exception as e:  # noqa: BLE001 - tracking must never stop a run
            LOG.warning("TensorBoard tracking off: %s", e)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if value is not None and math.isfinite(float(value)):
            self._w.add_scalar(tag, float(value), step)

    def log_round(self, summary: Mapping[str, Any], outcome: Any, eval_rows: Iterable) -> None:
        """One round: counts, update norms, ε per region, round time, released metrics."""
        if self._w is None:
            return
        rnd = int(summary["round"])
        try:
            for key in ("accepted", "rejected", "refused", "errors"):
                self._scalar(f"regions/{key}", len(summary.get(key, [])), rnd)
            self._scalar("regions/missing", summary.get("missing", 0), rnd)
            self._scalar("regions/nodes", summary.get("nodes", 0), rnd)
            self._scalar("round/ok", 1.0 if summary.get("status") == "ok" else 0.0, rnd)
            self._scalar("round/seconds", summary.get("seconds", float("nan")), rnd)
            for region, update, _ in getattr(outcome, "accepted", []):
                if update:  # a secure round accepts a region without any update of its own
                    self._scalar(f"update_norm/{region}", update_norm(update), rnd)
            for row in getattr(outcome, "epsilon_rows", []):
                _, region, eps, eps_rdp = row[:4]
                self._scalar(f"epsilon/{region}", eps, rnd)
                self._scalar(f"epsilon_rdp/{region}", eps_rdp, rnd)
            for _, region, metric, value in getattr(outcome, "metrics_rows", []):
                self._scalar(f"train/{metric}/{region}", value, rnd)
            for _, region, metric, value in eval_rows:
                self._scalar(f"eval/{metric}/{region}", value, rnd)
            text = "; ".join(
                f"{k}: {', '.join(summary.get(k, [])) or '-'}"
                for k in ("accepted", "rejected", "refused")
            )
            self._w.add_text("regions", text, rnd)
            self._w.flush()
        except Exception as e:  # noqa: BLE001
            LOG.warning("TensorBoard tracking off after an error: %s", e)
            self.close()

    def close(self) -> None:
        if self._w is not None:
            try:
                self._w.close()
            except Exception:  # noqa: BLE001
                pass
            self._w = None


def _leaves(doc: Any, tag: str, step: int) -> Iterable[tuple[str, float, int]]:
    """(tag, value, step) of every finite number; rows with a round/step use it as the step."""
    if isinstance(doc, bool) or doc is None:
        return
    if isinstance(doc, int | float | np.generic):
        v = float(doc)
        if math.isfinite(v):
            yield tag, v, step
        return
    if isinstance(doc, Mapping):
        for k, v in doc.items():
            yield from _leaves(v, f"{tag}/{k}" if tag else str(k), step)
        return
    if isinstance(doc, list | tuple):
        for i, v in enumerate(doc):
            at = next(
                (int(v[k]) for k in ("round", "step") if isinstance(v, Mapping) and k in v), None
            )
            if at is None:
                yield from _leaves(v, f"{tag}/{i}", step)
            else:
                rest = {k: x for k, x in v.items() if k not in ("round", "step")}
                yield from _leaves(rest, tag, at)


def log_document(log_dir: Path, name: str, doc: Mapping[str, Any]) -> int:
    """Every number of a results document as a TensorBoard scalar under `name/`; returns count."""
    w = _writer(Path(log_dir))
    n = 0
    try:
        for tag, value, step in _leaves(doc, name, 0):
            if n >= MAX_DOC_SCALARS:
                break
            w.add_scalar(tag, value, step)
            n += 1
    finally:
        w.close()
    return n
