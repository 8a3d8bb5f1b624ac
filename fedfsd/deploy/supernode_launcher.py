"""`flower-supernode` with a shorter idle poll of the SuperLink.

Why: flwr 1.39's SuperNode sleeps a hard-coded 3 s after every empty pull from the Fleet API
(`flwr/supernode/start_client_internal.py`), which alone adds up to 3 s per message and round.
There is no flag or environment variable for it, so this launcher swaps the module's `time` for
a proxy whose `sleep` is capped at ``FEDFSD_SUPERNODE_POLL`` seconds (default 0.5), then runs the
stock `flower-supernode` entry point with the same arguments. Non-public flwr 1.39 internals:
flwr is pinned `<1.40`; if the module layout changes the patch is skipped with a warning and the
stock behaviour remains.
"""

from __future__ import annotations

import os
import sys
import time
import types


class _FastTime(types.ModuleType):
    """`time` with sleep() capped (every other attribute is the real module's)."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self._cap = cap

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap))


def main() -> None:
    """Patch the idle poll, then hand over to flwr's `flower-supernode`."""
    cap = float(os.environ.get("FEDFSD_SUPERNODE_POLL", "0.5"))
    try:
        import flwr.supernode.start_client_internal as sci

        if getattr(sci, "time", None) is time:
            sci.time = _FastTime(cap)
    except ImportError as err:  # pragma: no cover - only on an unexpected flwr layout
        print(f"fedfsd: SuperNode poll patch skipped: {err}", file=sys.stderr)
    from fedfsd.deploy.latency import fast_object_pulls

    for site in fast_object_pulls(("flwr.supernode.start_client_internal",)):
        print(f"fedfsd: object-pull back-off patch skipped: {site}", file=sys.stderr)
    from flwr.supernode.cli import flower_supernode

    from fedfsd.deploy.watchdog import start_parent_watchdog

    start_parent_watchdog()  # stop with the fedfsd process that started us

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
