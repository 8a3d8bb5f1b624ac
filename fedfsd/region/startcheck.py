"""Checks `fedfsd region start` makes before it starts anything.

Why: a region started with a new dataset and an old ledger connected without complaint and
would only refuse at its first train message (where `train-local` refuses the same pair at
once), and a second region on one host died with "supernode exited (code 1)" because its local
Runtime API port was taken, with nothing pointing at `--runtime-port`.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from fedfsd.errors import EnvironmentFault, InputError


class LedgerMismatch(InputError, ValueError):
    """The ledger was opened for another region, fleet or δ than this dataset and policy."""


class PortTaken(EnvironmentFault, OSError):
    """A local port fedfsd must listen on is in use."""


def check_ledger_matches(ledger: Path, data: Path, policy: Any) -> None:
    """Refuse a ledger of another region/fleet/δ, with the ledger's own message (as train-local).

    The dataset's region and fleet id come from its manifest.json (cheap; no frame is read).
    A ledger that does not exist yet is fine: the first round opens it for this dataset.
    """
    from fedfsd.privacy.ledger import Ledger, LedgerError

    lg = Ledger(ledger)
    if not lg.exists() or lg.is_unopened():
        return
    try:
        manifest = json.loads((Path(data) / "manifest.json").read_text(encoding="utf-8"))
        region = str(manifest["region"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LedgerMismatch(f"{data}/manifest.json: unreadable ({err})") from None
    fleet_id = str(manifest.get("fleet_id") or f"{region}-unnamed")
    try:
        lg.check_matches(region=region, fleet_id=fleet_id, private=True, delta=policy.delta)
    except LedgerError as err:
        raise LedgerMismatch(str(err)) from None


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on (host, port) and it can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_runtime_port(port: int, flag: str = "--runtime-port") -> None:
    """Refuse a taken local Runtime API port, naming it and the flag, with a free one to use."""
    if port_free(port):
        return
    from fedfsd.deploy.processes import free_ports

    (suggest,) = free_ports(1)
    raise PortTaken(
        f"the local Runtime API port 127.0.0.1:{port} is taken (another region or SuperNode "
        f"on this host?); give each region on one host its own with {flag}, e.g. "
        f"{flag} {suggest}"
    )
