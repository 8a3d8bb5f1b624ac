"""`flower-supernode` with a shorter idle poll of the SuperLink and faster object pulls.

Why: flwr 1.39's SuperNode sleeps a hard-coded 3 s after every empty pull from the Fleet API and
backs off 1 s, 2 s … when an instruction's objects are not uploaded yet. There is no flag for
either, so this launcher applies fedfsd's patches (`fedfsd.flower.supernode_poll`, idle poll
capped at ``FEDFSD_SUPERNODE_POLL`` seconds, default 0.5; `fedfsd.flower.pull_backoff`), then
runs the stock `flower-supernode` entry point with the same arguments. A patch that cannot be
applied is skipped with a warning and the stock behaviour remains.
"""

from __future__ import annotations

import os
import sys

from fedfsd.flower.pull_backoff import SUPERNODE_SITE, fast_object_pulls
from fedfsd.flower.supernode_poll import cap_idle_poll, run_flower_supernode


def apply_patches() -> list[str]:
    """Apply the SuperNode's patches; return a warning line for each one skipped."""
    skipped = []
    cap = float(os.environ.get("FEDFSD_SUPERNODE_POLL", "0.5"))
    try:
        cap_idle_poll(cap)
    except (ImportError, RuntimeError) as err:  # pragma: no cover - unexpected flwr layout
        skipped.append(f"fedfsd: SuperNode poll patch skipped: {err}")
    for site in fast_object_pulls((SUPERNODE_SITE,)):
        skipped.append(f"fedfsd: object-pull back-off patch skipped: {site}")
    return skipped


def main() -> None:
    """Patch the idle poll and the object pulls, then hand over to flwr's `flower-supernode`."""
    for line in apply_patches():
        print(line, file=sys.stderr)
    from fedfsd.deploy.watchdog import start_parent_watchdog

    start_parent_watchdog()  # stop with the fedfsd process that started us

    sys.argv[0] = "flower-supernode"
    run_flower_supernode()


if __name__ == "__main__":
    main()
