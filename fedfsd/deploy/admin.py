"""Shared pieces of the deployment CLI: errors, the aggregator's directory, default policies,
and blocking until Ctrl-C while child processes run.

Why: `fedfsd aggregator ...`, `fedfsd region ...` and `fedfsd deploy` must behave the same way
(one red line and a non-zero exit on bad input, every child stopped on exit) without importing
Flower or torch before a command actually runs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from fedfsd.errors import exit_for

DEV_WARNING = (
    "--insecure: NO TLS and NO SuperNode authentication. Development only: never use it "
    "across a network or with real fleet data."
)


def warn(msg: str) -> None:
    typer.secho(f"warning: {msg}", fg=typer.colors.YELLOW, err=True)


def need_file(path: Path | None, what: str) -> Path:
    if path is None:
        exit_for(f"{what} is required")
    if not Path(path).is_file():
        exit_for(f"{what}: {path} is not a file")
    return Path(path).resolve()


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        exit_for(f"{what} must look like HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class AggregatorDir:
    """Where `fedfsd aggregator start` keeps its state (one directory, admin side only)."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr_home"

    @property
    def database(self) -> Path:
        return self.root / "superlink-state.db"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def security_log(self) -> Path:
        return self.root / "security.jsonl"

    def require_started(self) -> None:
        if not (self.flwr_home / "config.toml").is_file():
            exit_for(
                f"{self.root} has no SuperLink connection: run `fedfsd aggregator start "
                f"--dir {self.root}` first"
            )


def default_policy_text(data_dir: Path, region: str | None, digests: list[str]) -> str:
    """A conservative policy for a dataset (used only when the operator gives none): δ an
    order of magnitude below 1/vehicles, ε budget 8, σ ≥ 0.8, C ≤ 1."""
    try:
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        exit_for(f"{data_dir}: cannot read manifest.json ({err}); is it a fedfsd dataset?")
    name = str(manifest.get("region") or region)
    vehicles = max(int(manifest.get("vehicles", 1)), 1)
    delta = 10.0 ** math.floor(math.log10(0.1 / vehicles))
    return (
        f'region = "{name}"\nepsilon_budget = 8.0\ndelta = {delta:g}\n'
        "min_noise_multiplier = 0.8\nmax_clip_norm = 1.0\nupdate_norm_bound = 5.0\n"
        'allowed_metrics = []\nweighting = "equal"\n'
        f"allowed_app_digests = {json.dumps(digests)}\n"
    )


def block_until_interrupted(procs: list, what: str) -> int:
    """Wait while all ``procs`` (ManagedProcess) live; 0 on Ctrl-C, 1 if one of them died."""
    try:
        while True:
            for proc in procs:
                if not proc.alive():
                    tail = proc.log_tail(600).strip().splitlines()
                    last = tail[-1] if tail else ""
                    typer.secho(
                        f"error: {proc.name} exited (code {proc.popen.returncode}): {last} "
                        f"(log {proc.log_path})",
                        fg=typer.colors.RED,
                        err=True,
                    )
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        typer.echo(f"\nstopping {what}")
        return 0
