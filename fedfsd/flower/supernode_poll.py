"""A shorter idle poll for flwr 1.39's SuperNode, and the stock `flower-supernode` entry point.

Why: flwr 1.39's SuperNode sleeps a hard-coded 3 s after every empty pull from the Fleet API
(`time.sleep(3)` in `flwr/supernode/start_client_internal.py`), which alone adds up to 3 s per
message and round. There is no flag or environment variable for it, so the module's global
`time` is swapped for a proxy whose `sleep` is capped. Non-public flwr 1.39 internals (flwr is
pinned `<1.40`): if the module layout changes the patch is not applied and the caller is told.
"""

from __future__ import annotations

import time
import types

POLL_MODULE = "flwr.supernode.start_client_internal"
DEFAULT_POLL_CAP_S = 0.5


class CappedTime(types.ModuleType):
    """`time` with sleep() capped (every other attribute is the real module's)."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self.cap = cap

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def cap_idle_poll(cap: float = DEFAULT_POLL_CAP_S) -> None:
    """Cap every `time.sleep` of the SuperNode's main loop at `cap` seconds (idempotent).

    Raises ImportError when flwr's layout has no such module, RuntimeError when its `time`
    is neither the stock module nor ours (someone else patched it)."""
    import importlib

    sci = importlib.import_module(POLL_MODULE)
    current = getattr(sci, "time", None)
    if isinstance(current, CappedTime):
        current.cap = cap
        return
    if current is not time:
        raise RuntimeError(f"{POLL_MODULE}.time is {current!r}, not the time module")
    vars(sci)["time"] = CappedTime(cap)  # the name Flower's loop looks up at each sleep


def idle_poll_cap() -> float | None:
    """The cap in effect on the SuperNode's idle poll (None: Flower's stock 3 s sleep)."""
    import importlib

    current = getattr(importlib.import_module(POLL_MODULE), "time", None)
    return current.cap if isinstance(current, CappedTime) else None


def run_flower_supernode() -> None:
    """Run flwr's own `flower-supernode` entry point with this process's sys.argv."""
    from flwr.supernode.cli import flower_supernode

    flower_supernode()
