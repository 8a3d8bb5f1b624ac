"""Stop a child process when the fedfsd process that started it disappears.

Why: children run in their own process groups (so a group can be stopped as a whole), which
also means a SIGKILL of the parent (an OOM kill, a hard test timeout) would orphan them. A
child started with ``FEDFSD_PARENT_PID`` in its environment sends itself SIGTERM, and so shuts
down through its normal handlers, once that process is gone.
"""

from __future__ import annotations

import os
import signal
import threading

PARENT_ENV = "FEDFSD_PARENT_PID"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_parent_watchdog(interval: float = 1.0) -> threading.Thread | None:
    """If ``FEDFSD_PARENT_PID`` is set, SIGTERM this process once that pid no longer exists
    (or this process was re-parented). Returns the daemon thread, or None when not set."""
    raw = os.environ.get(PARENT_ENV)
    if not raw or not raw.isdigit():
        return None
    parent = int(raw)
    original_ppid = os.getppid()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval):
            if not _alive(parent) or (original_ppid == parent and os.getppid() != parent):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="fedfsd-parent-watchdog", daemon=True)
    thread.start()
    return thread
