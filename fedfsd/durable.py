"""Small durability helpers shared by the region's ledger and the aggregator's checkpoints.

Both sides promise that what they report is on disk before anything depends on it; the directory
entry of a new or renamed file is only durable once its directory is fsync'd too.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so that files created or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
