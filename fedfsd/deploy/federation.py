"""A whole TLS federation on one machine: PKI, SuperLink, registration, SuperNodes, executors.

Why: tests, `fedfsd deploy` and `fedfsd demo` all need the same real deployment (separate
processes talking Flower's gRPC Fleet API with TLS and SuperNode authentication), started in the
right order with readiness waits, and torn down completely, whatever happens.

Ports (all on loopback here): the SuperLink's Fleet API (gRPC, the only port regions dial), its
Control/Runtime API (HTTPS, admin side only: `flwr run`, registration), and one Runtime API per
SuperNode (local to the region, polled by the region's own executor).
"""

from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfsd.deploy import pki
from fedfsd.deploy.appbundle import PACKAGED_APP_DIR
from fedfsd.deploy.control import (  # noqa: F401  (errors re-exported for callers)
    ControlClient,
    ControlError,
    RunFailed,
    write_connection_config,
)
from fedfsd.deploy.processes import (
    ManagedProcess,
    ProcessGroup,
    bin_path,
    free_ports,
    port_open,
    python_safe,
    wait_for_port,
    wait_until,
)

STARTUP_TIMEOUT = 60.0


@dataclass
class RegionSpec:
    """How one region runs: its data, its own policy and ledger, and its local ClientApp."""

    data_dir: str | Path
    policy_path: str | Path
    ledger_path: str | Path
    clientapp: str = "fedfsd.region.client_app:app"
    app_path: str | Path | None = None  # prepended to the executor's sys.path (test apps)
    node_config: dict[str, Any] = field(default_factory=dict)  # extra node-config entries


def node_config_arg(values: dict[str, Any]) -> str:
    """Flower's `--node-config` string: space-separated TOML `key=value` pairs."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int | float):
            parts.append(f"{key}={value}")
        else:
            text = str(value)
            if '"' in text or " " in text:
                raise ValueError(f"node-config value for {key!r} may not contain spaces or quotes")
            parts.append(f'{key}="{text}"')
    return " ".join(parts)


class LocalFederation:
    """Context manager for a local federation. See module docstring for the topology."""

    def __init__(
        self,
        run_dir: str | Path,
        regions: dict[str, RegionSpec],
        tls: bool = True,
        unregistered: set[str] | frozenset[str] = frozenset(),
        app_dir: str | Path | None = None,
        server_names: list[str] | None = None,
        host: str = "127.0.0.1",
        serverapp_digests: list[str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.regions = dict(regions)
        self.tls = tls
        self.unregistered = set(unregistered)
        self.app_dir = Path(app_dir).resolve() if app_dir else PACKAGED_APP_DIR
        self.server_names = list(server_names or [])
        self.host = host
        self.serverapp_digests = serverapp_digests  # None: any ServerApp bundle runs
        self.security_log = self.run_dir / "security.jsonl"
        self.logs = self.run_dir / "logs"
        self.flwr_home = self.run_dir / "flwr_home"
        self.group = ProcessGroup(self.logs)
        self.control = ControlClient(self.flwr_home, self.run_dir)
        self.env = self.control.env
        self.last_status = ""
        self.server: pki.ServerPKI | None = None
        self.node_keys: dict[str, pki.NodeKeys] = {}
        self.node_ids: dict[str, int] = {}
        n = 2 + len(self.regions)
        ports = free_ports(n, host)
        self.fleet_port, self.control_port = ports[0], ports[1]
        self.runtime_ports = dict(zip(self.regions, ports[2:], strict=True))

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """PKI → SuperLink → `flower` connection config → registration → SuperNodes+executors."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.server = pki.create_server_pki(self.run_dir / "pki", self.server_names)
            for name in self.regions:
                self.node_keys[name] = pki.create_node_keys(self.run_dir / "keys", name)
        self.write_region_keys()
        self._write_flwr_config()
        self.start_superlink()
        for name in self.regions:
            if self.tls and name not in self.unregistered:
                self.node_ids[name] = self.register(self.node_keys[name].public_key)
        for name in self.regions:
            self.start_region(name)

    def stop(self) -> None:
        """Stop every process this federation started (executors, SuperNodes, SuperLink)."""
        self.group.stop_all()

    # -- aggregator side -------------------------------------------------------------------------
    @property
    def fleet_address(self) -> str:
        return f"{self.host}:{self.fleet_port}"

    @property
    def control_address(self) -> str:
        return f"{self.host}:{self.control_port}"

    def _write_flwr_config(self) -> None:
        write_connection_config(
            self.flwr_home, self.control_address, self.server.ca_cert if self.server else None
        )

    def superlink_argv(self) -> list[str]:
        return superlink_argv(
            fleet_address=self.fleet_address,
            control_host=self.host,
            control_port=self.control_port,
            database=self.run_dir / "superlink-state.db",
            server=self.server if self.tls else None,
            serverapp_digests=self.serverapp_digests,
            security_log=self.security_log,
        )

    def start_superlink(self) -> ManagedProcess:
        proc = self.group.start("superlink", self.superlink_argv(), env=self.env)
        wait_for_port(self.host, self.fleet_port, STARTUP_TIMEOUT, proc)
        wait_for_port(self.host, self.control_port, STARTUP_TIMEOUT, proc)
        return proc

    def kill_superlink(self) -> None:
        """Crash the aggregator (SIGKILL of the SuperLink and its ServerApp)."""
        self.group.procs["superlink"].kill()

    def restart_superlink(self) -> ManagedProcess:
        """Start the SuperLink again on the same ports and state database."""
        wait_until(lambda: not port_open(self.host, self.fleet_port), 30, "fleet port to close")
        return self.start_superlink()

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the `flwr` CLI against this federation's private FLWR_HOME."""
        return self.control.flwr(*args, timeout=timeout)

    def register(self, public_key: Path) -> int:
        """`flwr supernode register`: allow this region key on the SuperLink; node id."""
        return self.control.register(public_key)

    # -- regions ---------------------------------------------------------------------------------
    def region_dir(self, name: str) -> Path:
        path = self.run_dir / "regions" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def supernode_argv(self, name: str) -> list[str]:
        spec = self.regions[name]
        cfg = {
            "region": name,
            "data-dir": str(Path(spec.data_dir).resolve()),
            "policy": str(Path(spec.policy_path).resolve()),
            "ledger": str(Path(spec.ledger_path).resolve()),
            **spec.node_config,
        }
        return supernode_argv(
            superlink=self.fleet_address,
            runtime_port=self.runtime_ports[name],
            node_config=cfg,
            ca=self.server.ca_cert if self.server else None,
            key=self.node_keys[name].private_key if name in self.node_keys else None,
        )

    def executor_argv(self, name: str) -> list[str]:
        spec = self.regions[name]
        return executor_argv(
            runtime_port=self.runtime_ports[name],
            policy=spec.policy_path,
            clientapp=spec.clientapp,
            app_path=spec.app_path,
            decisions=self.region_dir(name) / "decisions.jsonl",
        )

    def start_region(self, name: str) -> None:
        """Start the SuperNode and, once its Runtime API is up, the region's executor.

        An ``unregistered`` region only gets its SuperNode: the SuperLink must refuse it.
        """
        node = self.group.start(f"supernode-{name}", self.supernode_argv(name), env=self.env)
        if name in self.unregistered:
            return
        wait_for_port(self.host, self.runtime_ports[name], STARTUP_TIMEOUT, node)
        self.group.start(f"executor-{name}", self.executor_argv(name), env=self.env)

    def kill_region(self, name: str) -> None:
        """Crash a region: SIGKILL its SuperNode and executor."""
        for proc in (f"executor-{name}", f"supernode-{name}"):
            if proc in self.group.procs:
                self.group.procs[proc].kill()

    def restart_region(self, name: str) -> None:
        self.kill_region(name)
        wait_until(
            lambda: not port_open(self.host, self.runtime_ports[name]), 30, "runtime port to close"
        )
        self.start_region(name)

    def supernode_connected(self, name: str) -> bool:
        """True once the region's SuperNode logged its node id (it passed TLS and node auth)."""
        proc = self.group.procs.get(f"supernode-{name}")
        return proc is not None and "SuperNode ID:" in proc.log_tail(1_000_000)

    def wait_refused(self, name: str, timeout: float = STARTUP_TIMEOUT) -> str:
        """Wait until the SuperNode of ``name`` gave up (refused by the SuperLink); its log."""
        proc = self.group.procs[f"supernode-{name}"]
        wait_until(lambda: not proc.alive(), timeout, f"region {name} to be refused")
        return proc.log_tail(1_000_000)

    def wait_connected(
        self, names: list[str] | None = None, timeout: float = STARTUP_TIMEOUT
    ) -> None:
        for name in names or list(self.regions):
            wait_until(
                functools.partial(self.supernode_connected, name),
                timeout,
                f"region {name} to connect",
                self.group.procs[f"supernode-{name}"],
            )

    # -- runs ------------------------------------------------------------------------------------
    def start_run(self, run_config: dict[str, Any], app_dir: str | Path | None = None) -> int:
        """`flwr run` the app (default: the packaged app) with run-config overrides; run id.

        The aggregator gets the regions' signing keys (`region-keys`) unless the run config
        names its own or the app does not declare the key.
        """
        app = Path(app_dir) if app_dir else self.app_dir
        declared = (
            (app / "pyproject.toml").read_text() if (app / "pyproject.toml").is_file() else ""
        )
        if "region-keys" not in run_config and "region-keys" in declared:
            run_config = {**run_config, "region-keys": str(self.region_keys_path)}
        return self.control.start_run(run_config, app)

    @property
    def region_keys_path(self) -> Path:
        return self.run_dir / "region-keys.json"

    def write_region_keys(self) -> Path:
        """Give each region its Ed25519 ledger key (next to its ledger, created if absent) and
        write the aggregator's mapping region -> public key (the out-of-band registration)."""
        from fedfsd.config import load_policy
        from fedfsd.privacy import signing

        keys: dict[str, str] = {}
        for name, spec in self.regions.items():
            if name in self.unregistered:  # the global team registers no key for it
                continue
            region = name
            try:
                region = load_policy(spec.policy_path).region
            except Exception:  # a test region without a usable policy keeps its name
                pass
            key = signing.load_or_create_key(signing.ledger_key_path(spec.ledger_path))
            keys.setdefault(region, signing.public_hex(key.public_key()))
        self.region_keys_path.parent.mkdir(parents=True, exist_ok=True)
        self.region_keys_path.write_text(json.dumps(keys, indent=1, sort_keys=True) + "\n")
        return self.region_keys_path

    def run_status(self, run_id: int) -> str:
        """Status text of a run as `flwr ls` reports it, e.g. 'finished:completed'."""
        return self.control.run_status(run_id)

    def wait_run(self, run_id: int, timeout: float, poll: float = 1.0) -> str:
        """Wait until the run is finished; return its status text (raise RunFailed on timeout)."""
        return self.control.wait_run(run_id, timeout, poll)

    def run(
        self,
        run_config: dict[str, Any],
        timeout: float = 300.0,
        app_dir: str | Path | None = None,
        check: bool = True,
    ) -> int:
        """Start a run and wait for it to finish; returns the run id."""
        run_id = self.start_run(run_config, app_dir)
        status = self.wait_run(run_id, timeout)
        self.last_status = status
        if check and status != "finished:completed":
            raise RunFailed(f"run {run_id} ended {status!r}; logs in {self.logs}")
        return run_id


def superlink_argv(
    fleet_address: str,
    control_host: str,
    control_port: int,
    database: Path,
    server: pki.ServerPKI | None,
    serverapp_digests: list[str] | None = None,
    security_log: Path | None = None,
) -> list[str]:
    """`flower-superlink`: Fleet API (gRPC) for regions, Control/Runtime API (HTTPS) for admins,
    TLS + SuperNode authentication unless ``server`` is None (development only).

    ``serverapp_digests`` (not None): started through fedfsd.flower.superlink_launcher, so only
    those ServerApp bundles run; ``security_log`` (not None): the same launcher logs refused
    bundles and refused SuperNode keys there."""
    launcher = [bin_path("flower-superlink")]
    if serverapp_digests is not None or security_log is not None:
        launcher = [*python_safe(), "-m", "fedfsd.flower.superlink_launcher"]
        if serverapp_digests is not None:
            launcher += ["--fedfsd-serverapp-digests", ",".join(serverapp_digests)]
        if security_log is not None:  # refused bundles and refused SuperNode keys
            launcher += ["--fedfsd-security-log", str(security_log)]
    argv = [
        *launcher,
        "--fleet-api-address",
        fleet_address,
        "--host",
        control_host,
        "--port",
        str(control_port),
        "--database",
        str(database),
        "--disable-runtime-dependency-installation",
    ]
    if server is not None:
        argv += [
            "--ssl-ca-certfile",
            str(server.ca_cert),
            "--ssl-certfile",
            str(server.server_cert),
            "--ssl-keyfile",
            str(server.server_key),
            "--enable-supernode-auth",
        ]
    else:
        argv.append("--insecure")
    return argv


def supernode_argv(
    superlink: str,
    runtime_port: int,
    node_config: dict[str, Any],
    ca: str | Path | None,
    key: str | Path | None,
    runtime_host: str = "127.0.0.1",
    fast_poll: bool = True,
) -> list[str]:
    """`flower-supernode` in process isolation: it never starts app code itself.

    ``fast_poll`` starts it through fedfsd.deploy.supernode_launcher (idle poll 0.5 s, not 3 s).
    """
    launcher = (
        [*python_safe(), "-m", "fedfsd.deploy.supernode_launcher"]
        if fast_poll
        else [bin_path("flower-supernode")]
    )
    argv = [
        *launcher,
        "--superlink",
        superlink,
        "--isolation",
        "process",
        "--host",
        runtime_host,
        "--port",
        str(runtime_port),
        "--node-config",
        node_config_arg(node_config),
    ]
    if ca is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(ca)]
        if key is not None:
            argv += ["--auth-supernode-private-key", str(key)]
    return argv


def executor_argv(
    runtime_port: int,
    policy: str | Path | None,
    clientapp: str,
    app_path: str | Path | None,
    decisions: str | Path | None,
    runtime_host: str = "127.0.0.1",
) -> list[str]:
    """The region's own executor (fedfsd.region.executor) for one SuperNode."""
    argv = [
        *python_safe(),
        "-m",
        "fedfsd.region.executor",
        "--runtime-api-address",
        f"{runtime_host}:{runtime_port}",
        "--clientapp",
        clientapp,
    ]
    if policy:
        argv += ["--policy", str(Path(policy).resolve())]
    if app_path:
        argv += ["--app-path", str(Path(app_path).resolve())]
    if decisions:
        argv += ["--decisions", str(decisions)]
    return argv
