"""The app bundle (FAB) fedfsd submits, and its digest for the regions' allow-lists.

Why: a region agrees to serve only bundles whose sha256 it lists in `allowed_app_digests`.
`flwr run` builds the FAB deterministically (fixed zip timestamps), so the digest of a directory
can be computed ahead of a run and published to the region operators.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGED_APP_DIR = Path(__file__).resolve().parent.parent / "flwr_app"


def build_fab(app_dir: str | Path = PACKAGED_APP_DIR) -> bytes:
    """The FAB bytes `flwr run <app_dir>` would submit (flwr's own builder)."""
    from fedfsd.flower.flwr_cli import build_fab_bytes

    return build_fab_bytes(Path(app_dir).resolve())


def app_digest(app_dir: str | Path = PACKAGED_APP_DIR) -> str:
    """sha256 hex digest of the bundle built from ``app_dir`` (what the executor checks)."""
    return hashlib.sha256(build_fab(app_dir)).hexdigest()
