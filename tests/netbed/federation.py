"""The deploy engineer's `LocalFederation`, spread over the test bed's hosts.

Same processes, same argv builders (fedfsd.deploy.federation): the SuperLink and every `flwr`
admin command run in the aggregator namespace (Control API on that host's own loopback, Fleet API
on 10.213.0.1), each region's SuperNode and executor run in that region's namespace and dial the
Fleet API across the veth link. Ports can be fixed because every namespace has its own stack.
Only what differs from one host is overridden: where a process is started and how readiness
is probed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from fedfsd.deploy.control import ControlClient
from fedfsd.deploy.federation import LocalFederation, RegionSpec, executor_argv
from fedfsd.deploy.processes import ManagedProcess, bin_path, wait_until

from .bed import AGG_ADDR, NetBed

CONTROL_PORT = 9091
RUNTIME_PORT = 9094
STARTUP_TIMEOUT = 90.0
_PROBE = (
    "import socket,sys\n"
    "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).close()\n"
    "except OSError:\n sys.exit(1)\n"
)


class NetControlClient(ControlClient):
    """`flwr` admin commands run on the aggregator host (the Control API is on its loopback)."""

    def __init__(self, bed: NetBed, flwr_home: Path, work_dir: Path) -> None:
        super().__init__(flwr_home, work_dir)
        self.bed = bed

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.bed.exec_argv("agg", [bin_path("flwr"), *args]), env=self.env,
            capture_output=True, text=True, timeout=timeout, cwd=self.work_dir,
        )  # fmt: skip


class NetFederation(LocalFederation):
    """A LocalFederation whose aggregator and regions live on separate namespace hosts.

    `placement` maps region name -> bed host role ("r0", "r1", ...).
    """

    def __init__(
        self,
        bed: NetBed,
        run_dir: str | Path,
        regions: dict[str, RegionSpec],
        placement: dict[str, str],
        tls: bool = True,
        unregistered: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(run_dir, regions, tls=tls, unregistered=unregistered,
                         server_names=[AGG_ADDR])  # fmt: skip
        self.bed = bed
        self.control = NetControlClient(bed, self.flwr_home, self.run_dir)
        self.env = self.control.env
        self.placement = dict(placement)
        self.fleet_port = bed.fleet_port
        self.control_port = CONTROL_PORT
        self.runtime_ports = {name: RUNTIME_PORT for name in regions}

    # ---- addresses ---------------------------------------------------------------------------
    @property
    def fleet_address(self) -> str:
        return f"{AGG_ADDR}:{self.fleet_port}"

    @property
    def control_address(self) -> str:
        return f"127.0.0.1:{self.control_port}"

    def superlink_argv(self) -> list[str]:
        argv = super().superlink_argv()
        argv[argv.index("--host") + 1] = "127.0.0.1"  # Control API: the aggregator's loopback
        return argv

    # ---- where processes run -----------------------------------------------------------------
    def port_open_in(self, role: str, host: str, port: int) -> bool:
        res = self.bed.run(role, [sys.executable, "-c", _PROBE, host, str(port)], timeout=20)
        return res.returncode == 0

    def wait_port_in(self, role: str, host: str, port: int, proc: ManagedProcess) -> None:
        wait_until(lambda: self.port_open_in(role, host, port), STARTUP_TIMEOUT,
                   f"{host}:{port} in {role}", proc, interval=0.3)  # fmt: skip

    def start_superlink(self) -> ManagedProcess:
        argv = self.bed.exec_argv("agg", self.superlink_argv())
        proc = self.group.start("superlink", argv, env=self.env)
        self.wait_port_in("agg", AGG_ADDR, self.fleet_port, proc)
        self.wait_port_in("agg", "127.0.0.1", self.control_port, proc)
        return proc

    def restart_superlink(self) -> ManagedProcess:
        wait_until(lambda: not self.port_open_in("agg", AGG_ADDR, self.fleet_port), 30,
                   "fleet port to close")  # fmt: skip
        return self.start_superlink()

    def start_region(self, name: str) -> None:
        role = self.placement[name]
        argv = self.bed.exec_argv(role, self.supernode_argv(name))
        node = self.group.start(f"supernode-{name}", argv, env=self.env)
        if name in self.unregistered:
            return
        self.wait_port_in(role, "127.0.0.1", RUNTIME_PORT, node)
        self.group.start(f"executor-{name}", self.bed.exec_argv(role, self.executor_argv(name)),
                         env=self.env)  # fmt: skip

    def restart_region(self, name: str) -> None:
        self.kill_region(name)
        role = self.placement[name]
        wait_until(lambda: not self.port_open_in(role, "127.0.0.1", RUNTIME_PORT), 30,
                   "runtime port to close")  # fmt: skip
        self.start_region(name)

    def start_raw_supernode(self, name: str, role: str, argv: list[str]) -> ManagedProcess:
        """Start an arbitrary (e.g. impostor) SuperNode argv on a region host."""
        return self.group.start(f"supernode-{name}", self.bed.exec_argv(role, argv), env=self.env)

    def executor_argv(self, name: str) -> list[str]:
        spec = self.regions[name]
        return executor_argv(
            runtime_port=RUNTIME_PORT,
            policy=spec.policy_path,
            clientapp=spec.clientapp,
            app_path=spec.app_path,
            decisions=self.region_dir(name) / "decisions.jsonl",
        )


def run_config(run_dir: Path, run_id: str, rounds: int = 2, **over: Any) -> dict[str, Any]:
    """A tiny aggregator run config: few steps, short timeouts (tests only)."""
    cfg = {
        "num-server-rounds": rounds,
        "local-steps": 2,
        "lr": 0.1,
        "noise-multiplier": 1.0,
        "clip-norm": 1.0,
        "vehicles-per-step": 2,
        "frames-per-vehicle": 4,
        "model": "mlp",
        "min-regions": 2,
        # generous: a loaded 2-core CI box needs tens of seconds for a first DP round; a dead
        # region ends its round early anyway (the SuperLink answers for it after missed pings)
        "round-timeout": 240.0,
        "node-wait": 120.0,  # bounds the liveness ping; ends as soon as a quorum answers
        "update-norm-bound": 5.0,
        "run-dir": str(run_dir),
        "run-id": run_id,
    }
    cfg.update(over)
    return cfg


def policy_toml(region: str, budget: float = 50.0, bound: float = 5.0) -> str:
    """A region-owned policy for tiny fleets (δ below 1/vehicles)."""
    import tomli_w

    return tomli_w.dumps(
        {
            "region": region,
            "epsilon_budget": budget,
            "delta": 1e-3,
            "min_noise_multiplier": 1.0,
            "max_clip_norm": 1.0,
            "update_norm_bound": bound,
            "max_local_steps": 5,
            "max_vehicles_per_step": 4,
            "max_frames_per_vehicle": 4,
            "allowed_metrics": ["loss", "ade", "fde", "accel_mae"],
            "weighting": "equal",
            "allowed_app_digests": [],
        }
    )
