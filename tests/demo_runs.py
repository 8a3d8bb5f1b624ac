"""Run `fedfsd demo` as a user would, in a private root (no tests here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_demo(root: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`fedfsd demo ARGS --out root/runs --data-cache root/data`; (process, its run directory)."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "fedfsd.cli", "demo", *args]
        + ["--out", str(root / "runs"), "--data-cache", str(root / "data")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    runs = sorted((root / "runs").iterdir()) if (root / "runs").exists() else []
    return proc, (runs[-1] if runs else root / "runs" / "missing")
