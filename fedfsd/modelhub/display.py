"""Rich progress and the validation table shared by `region finetune` and `model pretrain`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class SelectionView:
    """A progress bar over training steps plus the (step, val FDE) rows the selection saw."""

    def __init__(self, console: Console, total: int, title: str) -> None:
        self.console, self.total, self.title = console, total, title
        self.rows: list[tuple[int, dict[str, float], bool]] = []
        self._prog: Progress | None = None
        self._task: Any = None

    @contextlib.contextmanager
    def running(self) -> Iterator[SelectionView]:
        with Progress(
            TextColumn(f"[bold]{self.title}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps · best val FDE {task.fields[best]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        ) as prog:
            self._prog = prog
            self._task = prog.add_task(self.title, total=max(self.total, 1), best="-")
            yield self
        self._prog = None

    @property
    def on_step(self) -> Callable[[int, int], None]:
        def cb(step: int, total: int) -> None:
            if self._prog is not None:
                self._prog.update(self._task, completed=step)

        return cb

    @property
    def on_eval(self) -> Callable[[int, dict[str, float], bool], None]:
        def cb(step: int, metrics: dict[str, float], best: bool) -> None:
            self.rows.append((step, metrics, best))
            if best and self._prog is not None:
                self._prog.update(self._task, best=f"{metrics['fde']:.3f} m")

        return cb

    def table(self, selected: int) -> Table:
        t = Table(title=f"{self.title}: validation episodes (lower is better)")
        for col in ("step", "val ADE (m)", "val FDE@3s (m)", "val accel MAE", ""):
            t.add_column(col, justify="right" if col else "left")
        for step, m, _ in self.rows:
            mark = "← selected" if step == selected else ""
            t.add_row(
                str(step) + (" (start)" if step == 0 else ""),
                _fmt(m.get("ade")),
                _fmt(m.get("fde")),
                _fmt(m.get("accel_mae")),
                mark,
            )
        return t


def _fmt(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"
