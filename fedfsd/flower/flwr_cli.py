"""What fedfsd borrows from the `flwr` command's own code (flwr 1.39 `flwr.cli`, non-public).

Why: a region's allow-list must hold the digest of exactly the bundle `flwr run` submits, and a
key the aggregator registers must be one `flwr supernode register` accepts; using Flower's own
builder and key loader keeps both identical to what Flower does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_fab_bytes(app_dir: Path) -> bytes:
    """The FAB bytes `flwr run <app_dir>` would submit (flwr's own deterministic builder)."""
    from flwr.cli.build import build_fab_from_disk

    return bytes(build_fab_from_disk(app_dir))


def load_node_public_key(path: Path) -> bytes:
    """The key bytes `flwr supernode register` would send for `path`; raises (an Exception or
    SystemExit, as flwr does) unless it is an OpenSSH NIST-curve EC public key."""
    from flwr.cli.supernode.register import try_load_public_key

    return bytes(try_load_public_key(path))


def flwr_cli_app() -> Any:
    """The typer app behind the `flwr` command (to resolve its sub-commands without running)."""
    from flwr.cli.app import app

    return app
