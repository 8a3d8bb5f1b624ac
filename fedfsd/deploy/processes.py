"""Start and stop fedfsd's child processes (SuperLink, SuperNodes, executors).

Why: a federation on one machine is a handful of long-lived processes. Each one gets its own
process group (so its own children, e.g. the SuperLink's SuperExec and ServerApp, die with it),
a log file in the run directory, Flower's telemetry and update check switched off, and is
stopped on normal exit, on exceptions and on SIGINT/SIGTERM. Readiness is always an explicit
wait with a timeout (a port that accepts, or a line in a log), never a fixed sleep.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedfsd.errors import EnvironmentFault

# Environment every process fedfsd starts inherits (DESIGN.md: never phone home, never `uv sync`).
QUIET_FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # SuperExec (SuperLink side) polls for ServerApp tasks every 1 s by default.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
    "PYTHONUNBUFFERED": "1",
    # Never import from the working directory: a `fedfsd/` (or `flwr/`) folder there would
    # replace the installed package in every Python process fedfsd starts (issue 20).
    "PYTHONSAFEPATH": "1",
}


class ProcessError(EnvironmentFault, RuntimeError):
    """A child process failed to start or to become ready."""


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment plus fedfsd's Flower settings (and ``extra``)."""
    env = dict(os.environ)
    env.update(QUIET_FLOWER_ENV)
    # Flower starts its helpers (flower-superexec, flwr-serverapp) by name: use this venv's.
    env["FEDFSD_PARENT_PID"] = str(os.getpid())  # see fedfsd.deploy.watchdog
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    if extra:
        env.update(extra)
    return env


def python_safe() -> list[str]:
    """This interpreter with `-P`: `python -m ...` does not put the working directory first on
    sys.path, so a `fedfsd/` folder where the operator happens to stand cannot shadow fedfsd."""
    return [sys.executable, "-P"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for tests and local deployments)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports (held open together so they cannot collide)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def bin_path(name: str) -> str:
    """Path of a console script installed next to the running interpreter (the venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class ManagedProcess:
    """One child process with its own process group and log file."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen
    _log_fh: object = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n_chars: int = 2000) -> str:
        """The end of this process' log, for error messages."""
        try:
            data = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return data[-n_chars:]

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the whole process group, wait, then SIGKILL what is left. Returns the code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Children of the leader (SuperExec, ServerApp) may outlive it: always sweep the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        if self._log_fh is not None:
            with contextlib.suppress(Exception):
                self._log_fh.close()  # type: ignore[attr-defined]
        return self.popen.returncode

    def kill(self) -> int | None:
        """Hard kill (SIGKILL) of the process group: a crash, for fault tests."""
        return self.stop(timeout=5.0, sig=signal.SIGKILL)


_LIVE_GROUPS: weakref.WeakSet[ProcessGroup] = weakref.WeakSet()
_HANDLERS_INSTALLED = False
_HANDLER_LOCK = threading.Lock()


def _stop_all_groups() -> None:
    for group in list(_LIVE_GROUPS):
        group.stop_all()


def _install_handlers() -> None:
    """atexit + SIGINT/SIGTERM handlers that stop every live group, then chain the old one."""
    global _HANDLERS_INSTALLED
    with _HANDLER_LOCK:
        if _HANDLERS_INSTALLED:
            return
        _HANDLERS_INSTALLED = True
    atexit.register(_stop_all_groups)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)

        def handler(num: int, frame: object, _prev: object = previous) -> None:
            _stop_all_groups()
            if callable(_prev):
                _prev(num, frame)
            elif num == signal.SIGINT:
                raise KeyboardInterrupt
            else:
                raise SystemExit(128 + num)

        signal.signal(signum, handler)


class ProcessGroup:
    """The set of child processes of one deployment; stop_all() stops them in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, ManagedProcess] = {}
        _LIVE_GROUPS.add(self)
        _install_handlers()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` in a new session, stdout+stderr appended to ``<log_dir>/<name>.log``."""
        old = self.procs.get(name)
        if old is not None and old.alive():
            raise ProcessError(f"process {name!r} is already running (pid {old.pid})")
        log_path = self.log_dir / f"{name}.log"
        fh = open(log_path, "ab")  # noqa: SIM115 - closed in ManagedProcess.stop
        fh.write(f"\n==== start {time.strftime('%H:%M:%S')}: {' '.join(argv)}\n".encode())
        fh.flush()
        popen = subprocess.Popen(
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else flower_env(),
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
        proc = ManagedProcess(name=name, argv=list(argv), log_path=log_path, popen=popen)
        proc._log_fh = fh
        self.procs[name] = proc
        return proc

    def stop(self, name: str, timeout: float = 10.0) -> None:
        proc = self.procs.get(name)
        if proc is not None:
            proc.stop(timeout=timeout)

    def stop_all(self, timeout: float = 10.0) -> None:
        for name in reversed(list(self.procs)):
            self.procs[name].stop(timeout=timeout)


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    proc: ManagedProcess | None = None,
    interval: float = 0.1,
) -> None:
    """Poll ``predicate`` until true; raise ProcessError on timeout or if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if proc is not None and not proc.alive():
            raise ProcessError(
                f"{proc.name} exited (code {proc.popen.returncode}) before {what}; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        if time.monotonic() > deadline:
            tail = f"; log {proc.log_path}:\n{proc.log_tail()}" if proc else ""
            raise ProcessError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    """True if a TCP connection to host:port succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float, proc: ManagedProcess | None = None) -> None:
    """Wait until host:port accepts TCP connections."""
    wait_until(lambda: port_open(host, port), timeout, f"{host}:{port} to accept", proc)


def wait_for_log(proc: ManagedProcess, needle: str, timeout: float) -> None:
    """Wait until ``needle`` appears in the process' log."""
    wait_until(lambda: needle in proc.log_tail(1_000_000), timeout, f"{needle!r} in log", proc)


def _parent_pids() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, state letter) of every process (Linux /proc; no psutil here)."""
    out: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # the process ended while we looked
            out[int(entry.name)] = (int(fields[1]), fields[0])
    return out


def descendants(root: int) -> set[int]:
    """Process ids below `root` (children, grandchildren, …), not `root` itself.

    Needed where Flower or Ray start daemons that outlive their parent's group (Ray's GCS and
    raylet, Flower's SuperExec): tests and experiments stop and measure whole process trees.
    """
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in _parent_pids().items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def terminate(pids: set[int], grace: float = 5.0) -> None:
    """SIGTERM `pids`, wait up to `grace` seconds for them to end, then SIGKILL what is left."""
    left = set(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            running = {p for p, (_, state) in _parent_pids().items() if state not in "ZX"}
            left &= running  # a zombie has ended; only its parent's wait() is missing
            if left:
                time.sleep(0.1)
        if not left:
            return
