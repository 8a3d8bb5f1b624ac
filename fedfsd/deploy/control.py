"""The admin side's client of the SuperLink Control API: `flwr` CLI with a private FLWR_HOME.

Why: `flwr run`, `flwr ls` and `flwr supernode register` are Flower's public, supported way to
start runs and register region keys. fedfsd drives them with `--format json` against a
connection config it owns (never the user's ~/.flwr), so tests and deployments cannot leak
into each other.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import tomli_w

from fedfsd.deploy.processes import bin_path, flower_env
from fedfsd.errors import EnvironmentFault, FedfsdError

CONNECTION_NAME = "fedfsd"


class RunFailed(FedfsdError, RuntimeError):
    """A federation run ended in a state other than finished:completed, or timed out."""


class ControlError(EnvironmentFault, RuntimeError):
    """The Control API refused a request (e.g. registration) or `flwr` failed."""


def json_from_output(text: str) -> Any:
    """The JSON document `flwr ... --format json` printed (it may be preceded by other lines)."""
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON in flwr output: {text[-500:]}")
    return json.loads(text[start:])


def write_connection_config(flwr_home: Path, control_address: str, ca: Path | None) -> Path:
    """A private `$FLWR_HOME/config.toml` whose default connection is this SuperLink's Control
    API. ``ca=None`` means an insecure (development) connection."""
    conn: dict[str, Any] = {"address": control_address}
    if ca is not None:
        conn["root-certificates"] = str(Path(ca).resolve())
    else:
        conn["insecure"] = True
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    doc = {"superlink": {"default": CONNECTION_NAME, CONNECTION_NAME: conn}}
    path.write_text(tomli_w.dumps(doc))
    return path


class ControlClient:
    """`flwr` against the connection in ``flwr_home`` (see write_connection_config)."""

    def __init__(self, flwr_home: Path, work_dir: Path) -> None:
        self.flwr_home = Path(flwr_home).resolve()
        self.work_dir = Path(work_dir).resolve()
        self.env = flower_env({"FLWR_HOME": str(self.flwr_home)})

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [bin_path("flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.work_dir,
        )

    def register(self, public_key: Path) -> int:
        """`flwr supernode register`: allow this region key on the SuperLink; node id."""
        res = self.flwr(
            "supernode", "register", str(public_key), CONNECTION_NAME, "--format", "json"
        )
        try:
            doc = json_from_output(res.stdout)
        except ValueError as err:
            raise ControlError(f"register failed: {(res.stdout + res.stderr)[-800:]}") from err
        if not doc.get("success"):
            raise ControlError(f"register failed: {doc.get('error-message', doc)}")
        return int(doc["node-id"])

    def start_run(self, run_config: dict[str, Any], app_dir: Path) -> int:
        """`flwr run app_dir` with run-config overrides (written to a TOML file); run id."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        overrides = self.work_dir / f"run-config-{time.time_ns()}.toml"
        overrides.write_text(tomli_w.dumps(run_config))
        res = self.flwr(
            "run",
            str(Path(app_dir).resolve()),
            CONNECTION_NAME,
            "--run-config",
            str(overrides),
            "--format",
            "json",
        )
        try:
            doc = json_from_output(res.stdout)
        except ValueError as err:
            raise RunFailed(f"flwr run failed: {(res.stdout + res.stderr)[-800:]}") from err
        if not doc.get("success"):
            raise RunFailed(f"flwr run failed: {doc.get('error-message', doc)}")
        return int(doc["run-id"])

    def run_status(self, run_id: int) -> str:
        """Status text of a run as `flwr ls` reports it, e.g. 'finished:completed'."""
        res = self.flwr("ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json")
        try:
            doc = json_from_output(res.stdout)
        except ValueError as err:
            raise RunFailed(f"flwr ls failed: {(res.stdout + res.stderr)[-800:]}") from err
        runs = doc.get("runs", [])
        if not runs:
            raise RunFailed(f"run {run_id} not listed: {doc.get('error-message', doc)}")
        return str(runs[0]["status"])

    def wait_run(self, run_id: int, timeout: float, poll: float = 1.0) -> str:
        """Wait until the run is finished; its status text (RunFailed on timeout)."""
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            status = self.run_status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(poll)
        raise RunFailed(f"run {run_id} still {status!r} after {timeout:.0f}s")
