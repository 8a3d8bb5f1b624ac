"""A multi-host network on one machine: one aggregator host and N region hosts in namespaces.

Layout (everything lives inside namespaces this module creates; the host's own network and any
outside address are never touched or routed to; there is no default route):

    aggregator ns  br0 10.213.0.1/24 ──┬── veth ── region ns r0  eth0 10.213.0.11
                                       ├── veth ── region ns r1  eth0 10.213.0.12
                                       └── veth ── region ns r2  eth0 10.213.0.13

Each region namespace has an nftables firewall that lets out only TCP to the aggregator's Fleet
API port (and the replies back in); everything else is counted and dropped. IPv6 is off and the
neighbours are static, so the only frames a region's link can ever carry are that TCP traffic.
Namespace names carry the owner's pid: a new bed removes stale beds whose owner has died.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "fsdbed-"
SUBNET = "10.213.0"
AGG_ADDR = f"{SUBNET}.1"
AGG_MAC = "02:fd:00:00:00:01"
HERE = Path(__file__).resolve().parent


class NetBedUnavailable(RuntimeError):
    """The kernel or the user cannot build namespaces (tests skip with this reason)."""


def unavailable_reason() -> str | None:
    """Why a bed cannot be built here, or None when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the multi-host test bed needs root (ip netns, nftables)"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (.ci/run installs nftables and iproute2)"
    if not Path("/proc/self/ns/net").exists():
        return "the kernel lacks network namespaces"
    return None


def _sh(
    argv: Sequence[str], check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_pids(ns: str) -> None:
    """Kill every process still running inside namespace `ns` (TERM, then KILL)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        res = _sh(["ip", "netns", "pids", ns], check=False)
        pids = [int(p) for p in res.stdout.split() if p.strip().isdigit()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 3
        while time.time() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.05)


def list_namespaces() -> list[str]:
    """Names of all network namespaces (`ip netns list`)."""
    res = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def remove_stale() -> list[str]:
    """Delete beds left by dead owners (the owner pid is the second field of the name)."""
    removed = []
    for ns in list_namespaces():
        if not ns.startswith(PREFIX):
            continue
        try:
            owner = int(ns[len(PREFIX) :].split("-")[0])
        except ValueError:
            owner = -1
        if owner > 0 and _pid_alive(owner):
            continue
        _kill_ns_pids(ns)
        _sh(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    return removed


@dataclass
class Host:
    """One simulated machine: a namespace with one address."""

    role: str  # "agg" or "r0", "r1", ...
    ns: str
    addr: str
    iface: str  # the host's link to the network: br0 on the aggregator, eth0 on a region
    mac: str


@dataclass
class NetBed:
    """Build, drive and tear down the namespaces. Use as a context manager or call up()/down()."""

    n_regions: int = 3
    fleet_port: int = 9092
    workdir: Path = field(default_factory=lambda: Path("/tmp"))
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}")
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    _up: bool = False

    # ---- life cycle ----------------------------------------------------------------------
    def up(self) -> NetBed:
        """Create the namespaces, links, addresses and firewalls."""
        reason = unavailable_reason()
        if reason:
            raise NetBedUnavailable(reason)
        remove_stale()
        atexit.register(self.down)
        self._up = True
        try:
            self._build()
        except Exception:
            self.down()
            raise
        return self

    def _build(self) -> None:
        agg = Host("agg", f"{self.tag}-agg", AGG_ADDR, "br0", AGG_MAC)
        self.hosts["agg"] = agg
        for i in range(self.n_regions):
            role = f"r{i}"
            self.hosts[role] = Host(
                role,
                f"{self.tag}-{role}",
                f"{SUBNET}.{11 + i}",
                "eth0",
                f"02:fd:00:00:00:{16 + i:02x}",
            )
        for h in self.hosts.values():
            _sh(["ip", "netns", "add", h.ns])
            for key in ("all", "default"):
                self.sysctl(h, f"net.ipv6.conf.{key}.disable_ipv6", "1")
            _sh(["ip", "-n", h.ns, "link", "set", "lo", "up"])
        n = agg.ns
        _sh(["ip", "-n", n, "link", "add", "br0", "address", AGG_MAC, "type", "bridge",
             "mcast_snooping", "0"])  # fmt: skip
        _sh(["ip", "-n", n, "link", "set", "br0", "multicast", "off"])
        _sh(["ip", "-n", n, "addr", "add", f"{AGG_ADDR}/24", "dev", "br0"])
        _sh(["ip", "-n", n, "link", "set", "br0", "up"])
        # the aggregator host sends nothing unsolicited either (IGMP reports on link-up)
        self._nft(
            agg,
            "table inet fedfsd_bed_agg {\n chain output {\n"
            "  type filter hook output priority 0;\n  ip protocol igmp drop\n }\n}\n",
        )
        for h in self.regions():
            port = f"p{h.role}"
            _sh(["ip", "-n", n, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                 "netns", h.ns])  # fmt: skip
            _sh(["ip", "-n", n, "link", "set", port, "master", "br0", "up"])
            _sh(["ip", "-n", h.ns, "link", "set", "eth0", "address", h.mac])
            # no multicast: the kernel's own IGMP reports would otherwise cross the link
            _sh(["ip", "-n", h.ns, "link", "set", "eth0", "multicast", "off"])
            _sh(["ip", "-n", n, "link", "set", port, "multicast", "off"])
            _sh(["ip", "-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0"])
            _sh(["ip", "-n", h.ns, "link", "set", "eth0", "up"])
            # static neighbours: no ARP on the wire, so a capture shows only what fedfsd sends
            _sh(["ip", "-n", h.ns, "neigh", "replace", AGG_ADDR, "lladdr", AGG_MAC, "dev", "eth0",
                 "nud", "permanent"])  # fmt: skip
            _sh(["ip", "-n", n, "neigh", "replace", h.addr, "lladdr", h.mac, "dev", "br0",
                 "nud", "permanent"])  # fmt: skip
            for other in self.regions():
                if other.role != h.role:
                    _sh(["ip", "-n", h.ns, "neigh", "replace", other.addr, "lladdr", other.mac,
                         "dev", "eth0", "nud", "permanent"])  # fmt: skip
            self._firewall(h)

    def _firewall(self, h: Host) -> None:
        rules = f"""
table inet fedfsd_bed {{
  counter dropped_out {{}}
  counter dropped_in {{}}
  chain output {{
    type filter hook output priority 0; policy drop;
    oifname "lo" accept
    ip daddr {AGG_ADDR} tcp dport {self.fleet_port} accept
    counter name dropped_out drop
  }}
  chain input {{
    type filter hook input priority 0; policy drop;
    iifname "lo" accept
    ip saddr {AGG_ADDR} tcp sport {self.fleet_port} ct state established accept
    counter name dropped_in drop
  }}
}}
table arp fedfsd_bed_arp {{
  chain output {{ type filter hook output priority 0; policy drop; }}
  chain input {{ type filter hook input priority 0; policy drop; }}
}}
"""
        self._nft(h, rules)

    def _nft(self, h: Host, rules: str) -> None:
        res = subprocess.run(
            ["ip", "netns", "exec", h.ns, "nft", "-f", "-"], input=rules, capture_output=True,
            text=True, timeout=30,
        )  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError(f"nft rules for {h.ns} failed: {res.stderr.strip()}")

    def down(self) -> None:
        """Kill every process started in the bed and delete its namespaces. Idempotent."""
        if not self._up:
            return
        for p in self.procs:
            self.stop(p)
        for h in self.hosts.values():
            _kill_ns_pids(h.ns)
            _sh(["ip", "netns", "del", h.ns], check=False)
        self._up = False
        atexit.unregister(self.down)

    def __enter__(self) -> NetBed:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ---- hosts -----------------------------------------------------------------------------
    @property
    def agg(self) -> Host:
        return self.hosts["agg"]

    def regions(self) -> list[Host]:
        return [h for r, h in self.hosts.items() if r != "agg"]

    def host(self, role: str | Host) -> Host:
        return role if isinstance(role, Host) else self.hosts[role]

    def sysctl(self, host: str | Host, key: str, value: str) -> None:
        _sh(["ip", "netns", "exec", self.host(host).ns, "sysctl", "-qw", f"{key}={value}"])

    # ---- processes -------------------------------------------------------------------------
    def exec_argv(self, host: str | Host, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.host(host).ns, *argv]

    def run(self, host: str | Host, argv: Sequence[str], timeout: float = 60, **kw):
        """Run a command to completion inside a host (CompletedProcess, text mode)."""
        return subprocess.run(
            self.exec_argv(host, argv), capture_output=True, text=True, timeout=timeout, **kw
        )

    def popen(
        self, host: str | Host, argv: Sequence[str], log: Path | None = None,
        env: dict[str, str] | None = None, **kw,
    ) -> subprocess.Popen:  # fmt: skip
        """Start a long-lived process inside a host; the bed kills it at teardown."""
        full_env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        full_env.update(env or {})
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            fh = open(log, "ab")  # noqa: SIM115 - handed to the child
            kw.setdefault("stdout", fh)
            kw.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(
            self.exec_argv(host, argv), env=full_env, start_new_session=True, **kw
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 5.0) -> int | None:
        """Stop a process group started by popen(): `sig`, then SIGKILL after `grace` seconds."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        return proc.returncode

    # ---- firewall, link impairment, capture ------------------------------------------------
    def dropped(self, host: str | Host) -> dict[str, int]:
        """Packets the region firewall dropped so far: {"out": n, "in": n}."""
        res = self.run(host, ["nft", "list", "counters", "table", "inet", "fedfsd_bed"])
        counts: dict[str, int] = {}
        name = None
        for tok in res.stdout.split():
            if tok.startswith("dropped_"):
                name = tok.removeprefix("dropped_")
            elif name and tok.isdigit() and name not in counts:
                counts[name] = int(tok)  # first number after the name is `packets N`
        return counts

    def impair(self, host: str | Host, loss_pct: int = 0, rate_kbit: int | None = None) -> str:
        """Degrade one region's link. Uses `tc netem` when the kernel has it; otherwise random
        loss with nftables `numgen` and a slow link with `tc tbf` (delay by queueing).
        Returns which mechanism was used."""
        h = self.host(host)
        delay_ms = 0 if rate_kbit is None else 200
        netem = ["tc", "qdisc", "replace", "dev", h.iface, "root", "netem", "loss", f"{loss_pct}%"]
        if delay_ms:
            netem += ["delay", f"{delay_ms}ms", "rate", f"{rate_kbit}kbit"]
        if self.run(h, netem).returncode == 0:
            return "netem"
        if loss_pct:
            rules = f"""
table inet fedfsd_impair {{
  chain out {{ type filter hook output priority -10; numgen random mod 100 < {loss_pct} drop; }}
  chain in {{ type filter hook input priority -10; numgen random mod 100 < {loss_pct} drop; }}
}}
"""
            res = subprocess.run(
                self.exec_argv(h, ["nft", "-f", "-"]), input=rules, capture_output=True, text=True
            )
            if res.returncode != 0:
                raise RuntimeError(f"nft loss rules failed: {res.stderr.strip()}")
        if rate_kbit:
            tbf = ["tc", "qdisc", "replace", "dev", h.iface, "root", "tbf", "rate",
                   f"{rate_kbit}kbit", "burst", "16kb", "latency", "2s"]  # fmt: skip
            res = self.run(h, tbf)
            if res.returncode != 0:
                raise RuntimeError(f"tc tbf failed: {res.stderr.strip()}")
        return "nft-numgen+tbf"

    def clear_impairment(self, host: str | Host) -> None:
        h = self.host(host)
        self.run(h, ["tc", "qdisc", "del", "dev", h.iface, "root"])
        self.run(h, ["nft", "delete", "table", "inet", "fedfsd_impair"])

    @contextmanager
    def capture(self, host: str | Host, out: Path) -> Iterator[Path]:
        """Capture every frame on a host's link into `out` (pcap) for the duration of the block."""
        h = self.host(host)
        proc = self.popen(
            h, [sys.executable, str(HERE / "capture.py"), h.iface, str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        line = proc.stdout.readline().decode().strip() if proc.stdout else ""
        if line != "ready":
            err = proc.stderr.read().decode() if proc.stderr else ""
            self.stop(proc)
            raise RuntimeError(f"capture on {h.ns} did not start: {line!r} {err.strip()}")
        try:
            yield out
        finally:
            time.sleep(0.3)  # let the last replies reach the socket
            self.stop(proc)
