"""docker/compose.yaml: real command lines, volume and network isolation, control ports private.

Why: the compose file is what regional operators deploy. Its commands must be the same fedfsd /
Flower command lines the installed package accepts (checked here by parsing them with the real
CLI, and by running the PKI, aggregator and registration commands for real on loopback), each
region's data/key/ledger volumes must stay with that region, and no region may reach the
SuperLink's Control API. A second test builds the image and runs one round when a container
engine is available.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from netbed.require import skip_or_fail

from fedfsd.deploy.processes import descendants

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
VENV_BIN = Path(sys.executable).parent
REGIONS = ("cn", "eu", "us")
CONTAINER_SRV = "/srv/fedfsd"
PKI_SCRIPT = "/opt/fedfsd/docker/pki_init.py"
# The executables a service may run (in the image: /opt/venv/bin and the copied PKI script).
PROGRAMS = {"fedfsd", "flwr", "flower-superlink", "flower-supernode"}

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's ${VAR:-default} with the defaults (deterministic: the environment is ignored)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()))


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def region_of(svc: dict[str, Any]) -> str | None:
    return (svc.get("labels") or {}).get("fedfsd.region")


def option_value(cmd: list[str], option: str) -> str:
    return cmd[cmd.index(option) + 1]


def named_mounts(svc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of the service's named-volume mounts (not bind mounts)."""
    out = []
    for spec in svc.get("volumes", []):
        parts = spec.split(":")
        if parts[0].startswith((".", "/")):
            continue
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def host_argv(cmd: list[str]) -> list[str]:
    """The container command line as it runs from this checkout's virtualenv."""
    argv = list(cmd)
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] in PROGRAMS:
        argv[0] = str(VENV_BIN / argv[0])
    return [str(REPO / a.removeprefix("/opt/fedfsd/")) if a == PKI_SCRIPT else a for a in argv]


def parse_fully(cmd: list[str]) -> list[str]:
    """Parse a command line with the installed CLI (types, required options, unknown options)
    without running it; returns the resolved sub-command path."""
    import click
    import typer

    if cmd[0] in ("flower-superlink", "flower-supernode"):
        return [cmd[0]]  # argparse programs: the --help run checks their options
    if cmd[0] in ("fedfsd", "flwr"):
        if cmd[0] == "fedfsd":
            from fedfsd.cli import app
        else:
            from fedfsd.flower.flwr_cli import flwr_cli_app

            app = flwr_cli_app()

        group: click.Command = typer.main.get_command(app)
        args, path = cmd[1:], [cmd[0]]
    else:
        assert cmd[:2] == ["python", PKI_SCRIPT], f"not a fedfsd/Flower command line: {cmd}"
        import importlib.util

        spec = importlib.util.spec_from_file_location("fedfsd_pki_init", DOCKER / "pki_init.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        tapp = typer.Typer(add_completion=False)
        tapp.command()(mod.main)
        group, args, path = typer.main.get_command(tapp), cmd[2:], ["pki_init.py"]
    ctx = group.make_context(path[0], list(args))
    while isinstance(ctx.command, click.Group):
        rest = [*ctx.protected_args, *ctx.args]
        assert rest, f"{' '.join(path)} needs a sub-command"
        sub = ctx.command.get_command(ctx, rest[0])
        assert sub is not None, f"{' '.join(path)} has no sub-command {rest[0]!r}"
        path.append(rest[0])
        ctx = sub.make_context(rest[0], rest[1:], parent=ctx)
    return path


# ---- every service command is a real command line of the installed package ------------------


def test_compose_has_the_roles(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    assert {"pki", "aggregator", "launcher"} <= set(svcs)
    for r in REGIONS:
        assert {f"region-{r}", f"register-{r}", f"data-{r}"} <= set(svcs)
        assert region_of(svcs[f"region-{r}"]) == r
    assert svcs["aggregator"]["command"][:3] == ["fedfsd", "aggregator", "start"]
    assert svcs["launcher"]["command"][:3] == ["fedfsd", "aggregator", "run"]
    for r in REGIONS:
        assert svcs[f"region-{r}"]["command"][:3] == ["fedfsd", "region", "start"]
        assert svcs[f"register-{r}"]["command"][:3] == ["fedfsd", "aggregator", "register"]
    for name, svc in svcs.items():
        assert str(svc.get("user", "")).split(":")[0] not in ("", "0", "root"), name


_HELP_CACHE: dict[tuple[str, ...], subprocess.CompletedProcess[str]] = {}


def help_of(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """`<cmd> --help` in a real process. --help is eager, so values do not change the outcome:
    command lines that differ only in file paths share one run (the three regions)."""
    key = tuple(a for a in cmd if not a.startswith(CONTAINER_SRV))
    if key not in _HELP_CACHE:
        env = dict(os.environ, COLUMNS="400", NO_COLOR="1", TERM="dumb")
        _HELP_CACHE[key] = subprocess.run(
            [*host_argv(cmd), "--help"], capture_output=True, text=True, timeout=120, env=env
        )
    return _HELP_CACHE[key]


@pytest.mark.parametrize(
    "name",
    sorted(interpolate(yaml.safe_load(COMPOSE.read_text()))["services"]),
)
def test_service_command_is_accepted(compose: dict[str, Any], name: str) -> None:
    """`<command> --help` exits 0 in a real process and lists every option the command uses;
    the installed CLI also parses the full command line (types, required options)."""
    cmd = [str(a) for a in services(compose)[name]["command"]]
    assert cmd[0] in PROGRAMS or cmd[:2] == ["python", PKI_SCRIPT], cmd
    res = help_of(cmd)
    assert res.returncode == 0, res.stdout + res.stderr
    for opt in (a for a in cmd if a.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", res.stdout), (
            f"{name}: {opt} not in the help of {' '.join(cmd[:4])}"
        )
    parse_fully(cmd)


def test_parse_fully_rejects_bad_command_lines() -> None:
    """The parser used above does fail on what the real CLI refuses."""
    import click

    good = ["fedfsd", "aggregator", "start", "--dir", "/x", "--control-port", "8000"]
    assert parse_fully(good) == ["fedfsd", "aggregator", "start"]
    assert parse_fully(["flwr", "supernode", "list", "fedfsd"]) == ["flwr", "supernode", "list"]
    for bad in (
        ["fedfsd", "aggregator", "start", "--control-port", "eight"],
        ["fedfsd", "aggregator", "start", "--no-such-option"],
        ["fedfsd", "region", "start", "--superlink", "a:1"],  # --policy/--data/--ledger missing
        ["fedfsd", "region", "no-such-command"],
        ["flwr", "supernode", "list", "--no-such-option"],
    ):
        with pytest.raises((click.UsageError, AssertionError)):
            parse_fully(bad)


# ---- volumes: each region's data, key and ledger stay with that region -----------------------


def test_region_volumes_are_mounted_only_by_their_region(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    declared = set(compose["volumes"])
    for r in REGIONS:
        for kind in ("data", "key", "state"):
            assert f"{r}-{kind}" in declared
    for name, svc in svcs.items():
        mine = region_of(svc)
        for source, _target, _ro in named_mounts(svc):
            assert source in declared, f"{name} mounts undeclared volume {source}"
            owner = next((r for r in REGIONS if source.startswith(f"{r}-")), None)
            if owner is None:
                if mine is not None:  # a region may share only the public CA certificate
                    assert (source, _ro) == ("trust", True), f"{name} mounts {source}"
                continue
            if source == f"{owner}-key" and name == "pki":
                continue  # the one-shot PKI writes the region's key pair, then exits
            assert mine == owner, f"{source} of region {owner} is mounted by {name}"


def test_region_services_mount_their_own_data_policy_and_key(compose: dict[str, Any]) -> None:
    from fedfsd.config import load_policy

    for r in REGIONS:
        svc = services(compose)[f"region-{r}"]
        cmd = svc["command"]
        mounts = {t: (s, ro) for s, t, ro in named_mounts(svc)}
        binds = {
            spec.split(":")[1]: spec.split(":")[0]
            for spec in svc["volumes"]
            if spec.startswith((".", "/"))
        }
        data = Path(option_value(cmd, "--data"))
        assert mounts[str(data.parent)] == (f"{r}-data", True)  # read-only
        assert mounts[str(Path(option_value(cmd, "--key")).parent)] == (f"{r}-key", True)
        assert mounts[str(Path(option_value(cmd, "--ledger")).parent)] == (f"{r}-state", False)
        assert mounts[str(Path(option_value(cmd, "--ca")).parent)] == ("trust", True)
        assert Path(option_value(cmd, "--key")).name == r
        policy_src = DOCKER / binds[option_value(cmd, "--policy")]
        assert load_policy(policy_src).region == r
        data_cmd = services(compose)[f"data-{r}"]["command"]
        assert option_value(data_cmd, "--region") == r
        # The seeding service writes the dataset the region reads, inside the volume and not at
        # its root (generate renames a sibling directory into place; a mount point cannot be).
        out = Path(option_value(data_cmd, "--out"))
        assert out == data
        assert named_mounts(services(compose)[f"data-{r}"]) == [
            (f"{r}-data", str(out.parent), False)
        ]


# ---- networks: regions reach the Fleet API and nothing else ----------------------------------


def test_networks_keep_regions_apart_and_control_ports_private(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    agg = svcs["aggregator"]["command"]
    fleet_port = int(option_value(agg, "--fleet-address").rpartition(":")[2])
    control_port = int(option_value(agg, "--control-port"))
    assert "--host" not in agg and "--insecure" not in agg  # Control API stays on 127.0.0.1
    for r in REGIONS:
        net = compose["networks"][f"region-{r}"]
        assert net.get("internal") is True, f"region-{r} network must be internal"
        on_net = {n for n, s in svcs.items() if f"region-{r}" in (s.get("networks") or [])}
        assert on_net == {"aggregator", f"region-{r}"}, on_net
    for name, svc in svcs.items():
        published = [str(p) for p in svc.get("ports", [])] + [str(p) for p in svc.get("expose", [])]
        if region_of(svc) is not None:
            assert not published, f"region service {name} publishes {published}"
            assert svc.get("network_mode") in (None, "none"), name
            nets = svc.get("networks") or []
            assert nets == [f"region-{region_of(svc)}"] or svc.get("network_mode") == "none"
            if "--superlink" in svc["command"]:
                assert option_value(svc["command"], "--superlink") == f"aggregator:{fleet_port}"
        elif name != "aggregator":
            assert not published, f"{name} publishes {published}"
            assert svc.get("network_mode") in ("none", "service:aggregator"), name
        for p in published:
            container_port = int(p.split("/")[0].rpartition(":")[2])
            assert container_port == fleet_port, f"{name} publishes port {container_port}"
            assert container_port != control_port
        hc = " ".join(map(str, (svc.get("healthcheck") or {}).get("test", [])))
        assert "0.0.0.0" not in hc


# ---- the compose command lines, run for real on loopback -------------------------------------


def _listeners_of(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets in LISTEN state owned by ``pids`` (from /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            addr_hex, port_hex = f[1].split(":")
            raw = bytes.fromhex(addr_hex)
            if width == 8:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                addr = socket.inet_ntop(socket.AF_INET6, words)
            out.append((addr, int(port_hex, 16)))
    return out


def _loopback(addr: str) -> bool:
    return addr in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def container_root(svc: dict[str, Any], root: Path, volumes: Path) -> Path:
    """A host directory laid out like the service's container: each compose mount target under
    ``root`` is a symlink to its volume (``volumes/<name>``) or bind-mounted file (docker/)."""
    root.mkdir(parents=True, exist_ok=True)
    for spec in svc.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith((".", "/")):
            real = (DOCKER / source).resolve()
        else:
            real = volumes / source
            real.mkdir(parents=True, exist_ok=True)
        link = root / target.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(real)
    return root


def mapped(cmd: list[str], root: Path) -> list[str]:
    """``host_argv`` with every container path under /srv/fedfsd moved under ``root``
    (never the real /srv: a path the mounts do not cover stays inside the test directory)."""
    return [
        str(root) + a if a == CONTAINER_SRV or a.startswith(CONTAINER_SRV + "/") else a
        for a in host_argv([str(x) for x in cmd])
    ]


class Procs:
    """Long-lived commands of a test, each in its own session, all stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[subprocess.Popen, Any]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.procs.append((proc, log))
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait(self, pred, timeout: float, what: str, proc: subprocess.Popen, name: str) -> None:
        """Poll ``pred``; fail with the process' log if it exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while not pred():
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited {proc.returncode}" if proc.poll() is not None else "timed out"
                pytest.fail(f"{what}: {name} {why}; log:\n{self.log(name)[-3000:]}")
            time.sleep(0.5)

    def stop_all(self) -> None:
        for proc, log in reversed(self.procs):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            log.close()


@pytest.fixture
def procs():
    # A private directory, not tmp_path: other pytest sessions on this machine prune
    # /tmp/pytest-of-<user>/ while these processes still use it.
    root = Path(tempfile.mkdtemp(prefix="fedfsd-docker-"))
    group = Procs(root)
    try:
        yield group
    finally:
        group.stop_all()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_compose_commands_run_on_loopback(compose: dict[str, Any], procs: Procs) -> None:
    """Run the pki, aggregator, register-cn and region-cn commands of compose.yaml, each with
    its own compose mounts mapped to host directories (free ports, loopback): keys land only
    where the volumes say, the SuperLink listens beyond loopback on the Fleet API port alone,
    the region key registers through the loopback Control API, and region-cn connects over
    TLS + node auth with the key and CA its volumes hold, listening on loopback only."""
    from fedfsd.deploy.pki import server_sans
    from fedfsd.deploy.processes import free_ports

    svcs = services(compose)
    fleet, control, runtime = free_ports(3)
    vols = procs.logs / "volumes"

    def root(name: str) -> Path:
        return container_root(svcs[name], procs.logs / "containers" / name, vols)

    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")

    # pki: secrets stay in their volumes, only public files are copied out; idempotent
    pki_cmd = mapped(svcs["pki"]["command"], root("pki"))
    res = subprocess.run(pki_cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (vols / "trust").iterdir()) == ["ca.crt"]
    pubs = sorted(p.name for p in (vols / "aggregator-pubkeys").iterdir())
    assert pubs == [f"{r}.pub" for r in REGIONS]
    for r in REGIONS:
        assert sorted(p.name for p in (vols / f"{r}-key").iterdir()) == [r, f"{r}.pub"]
        assert (vols / f"{r}-key" / r).stat().st_mode & 0o077 == 0
        assert b"PRIVATE KEY" in (vols / f"{r}-key" / r).read_bytes()
    assert {"ca.key", "server.key"} <= {p.name for p in (vols / "aggregator-pki").iterdir()}
    dialled = option_value(svcs["region-cn"]["command"], "--superlink").rpartition(":")[0]
    assert dialled in server_sans(vols / "aggregator-pki" / "server.pem")
    before = {r: (vols / f"{r}-key" / r).read_bytes() for r in REGIONS}
    res = subprocess.run(pki_cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert before == {r: (vols / f"{r}-key" / r).read_bytes() for r in REGIONS}  # kept

    # aggregator: only the Fleet API listens beyond loopback
    agg_cmd = [str(a) for a in svcs["aggregator"]["command"]]
    agg_cmd[agg_cmd.index("--fleet-address") + 1] = f"0.0.0.0:{fleet}"
    agg_cmd[agg_cmd.index("--control-port") + 1] = str(control)
    agg = procs.start("aggregator", mapped(agg_cmd, root("aggregator")), env)
    listeners: list[tuple[str, int]] = []

    def superlink_up() -> bool:
        nonlocal listeners
        listeners = _listeners_of({agg.pid} | descendants(agg.pid))
        return {fleet, control} <= {p for _, p in listeners}

    procs.wait(superlink_up, 120, "the SuperLink's ports", agg, "aggregator")
    exposed = {(a, p) for a, p in listeners if not _loopback(a)}
    assert exposed and {p for _, p in exposed} == {fleet}, listeners
    assert all(_loopback(a) for a, p in listeners if p == control), listeners

    # register-cn, through the Control API on loopback
    reg = mapped(svcs["register-cn"]["command"], root("register-cn"))
    res = subprocess.run(reg, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "registered cn.pub" in res.stdout

    # region-cn: its own key, CA and policy from its mounts; a dataset stand-in (no round runs)
    region_root = root("region-cn")
    (vols / "cn-data" / "fleet").mkdir(parents=True)
    (vols / "cn-data" / "fleet" / "manifest.json").write_text('{"region": "cn", "vehicles": 30}')
    region_cmd = [str(a) for a in svcs["region-cn"]["command"]]
    region_cmd[region_cmd.index("--superlink") + 1] = f"127.0.0.1:{fleet}"
    region_cmd += ["--runtime-port", str(runtime)]  # several SuperNodes share this host
    region = procs.start("region-cn", mapped(region_cmd, region_root), env)
    connected = lambda: "region cn connected" in procs.log("region-cn")  # noqa: E731
    procs.wait(connected, 240, "region-cn to connect", region, "region-cn")
    rlisten = _listeners_of({region.pid} | descendants(region.pid))
    assert runtime in {p for _, p in rlisten}, rlisten
    assert all(_loopback(a) for a, _ in rlisten), f"region-cn listens beyond loopback: {rlisten}"
    assert (vols / "cn-state" / "logs" / "supernode.log").is_file()  # state volume in use


# ---- the image itself ------------------------------------------------------------------------


def test_dockerfile_is_slim_non_root_and_quiet() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert re.search(r"^ARG TORCH_SPEC=torch==2\.13\.0$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert "FLWR_TELEMETRY_ENABLED=0" in text and "FLWR_DISABLE_UPDATE_CHECK=1" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    ignored = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for path in (".venv", ".git", "runs", "data"):
        assert path in ignored
    # Everything the Dockerfile copies from the context exists and is not excluded from it.
    sources = [
        src
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
        for src in line.split()[:-1]
    ]
    assert sources, "no COPY from the build context"
    for src in sources:
        assert (REPO / src).exists(), src
        for pattern in ignored:
            assert not fnmatch.fnmatch(src, pattern.removeprefix("**/")), (src, pattern)
            assert not src.startswith(pattern.rstrip("/") + "/"), (src, pattern)


def test_pki_init_refuses_bad_input(tmp_path: Path) -> None:
    """One red line and exit 2 for a bad region name or a certificate that lacks a needed SAN."""
    base = [sys.executable, str(DOCKER / "pki_init.py")]
    dirs = ["--pki", "p", "--trust", "t", "--pubkeys", "k", "--keys", "keys"]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *dirs, *extra], capture_output=True, text=True, cwd=tmp_path, timeout=60
        )

    bad = run("--region", "e u")
    assert bad.returncode == 2 and "--region must be alphanumeric" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "p").exists()
    assert run("--region", "eu", "--san", "agg.example").returncode == 0
    missing = run("--region", "eu", "--san", "other.example")
    assert missing.returncode == 2 and "lacks SANs ['other.example']" in missing.stderr


# ---- with a container engine: build the image and run one round ------------------------------

# Under CI (.ci/run sets it) a missing engine fails these tests instead of skipping them.
REQUIRE_ENGINE = os.environ.get("FEDFSD_REQUIRE_ENGINE") == "1"
BUILD_LOCAL = DOCKER / "build-local.sh"
TEST_IMAGE = "fedfsd:0.1.0"


def _compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) where present, else Debian's `docker-compose` (1.29)."""
    for cli in (["docker", "compose"], ["docker-compose"]):
        try:
            ok = subprocess.run([*cli, "version"], capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return cli
    return None


def _engine_problem() -> str | None:
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"no docker client ({err})"
    if info.returncode != 0:
        return (
            "no container engine: `docker info` failed: "
            + (info.stderr.strip().splitlines() or ["?"])[-1][:200]
        )
    if _compose_cli() is None:
        return "neither `docker compose` nor `docker-compose` runs"
    return None


def _need_engine() -> list[str]:
    """The compose command line; skip without an engine, or fail under FEDFSD_REQUIRE_ENGINE=1
    or FEDFSD_REQUIRE_NETBED=1 (both set by .ci/run)."""
    problem = _engine_problem()
    if problem:
        if REQUIRE_ENGINE:
            pytest.fail(f"FEDFSD_REQUIRE_ENGINE=1 but {problem} (.ci/run starts dockerd)")
        skip_or_fail(problem)
    cli = _compose_cli()
    assert cli is not None
    return cli


def _docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, f"docker {' '.join(args)}:\n{res.stdout}{res.stderr}"
    return res.stdout


def test_engine_required_under_ci_fails_instead_of_skipping() -> None:
    """With FEDFSD_REQUIRE_ENGINE=1 and no reachable engine, the engine tests fail (not skip)."""
    env = dict(os.environ, FEDFSD_REQUIRE_ENGINE="1", DOCKER_HOST="unix:///nonexistent.sock")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header",
         f"{__file__}::test_image_is_built_locally_without_build_inputs"],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    assert "1 failed" in res.stdout and "FEDFSD_REQUIRE_ENGINE=1 but" in res.stdout, res.stdout


def _build_image() -> str:
    """docker/build-local.sh: base image made (or reused) from Debian packages, image built."""
    env = dict(os.environ, FEDFSD_IMAGE=TEST_IMAGE)
    res = subprocess.run(
        ["bash", str(BUILD_LOCAL)], capture_output=True, text=True, env=env, timeout=2400
    )
    assert res.returncode == 0, f"build-local.sh:\n{res.stdout}\n{res.stderr[-6000:]}"
    assert res.stdout.startswith(f"{TEST_IMAGE} "), res.stdout
    return res.stdout


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_image_is_built_locally_without_build_inputs() -> None:
    """The image builds from a locally made base; the host's CA bundle, pip.conf and torch wheel
    reached the build stage only, the service user is not root, and fedfsd runs in it."""
    _need_engine()
    _build_image()
    assert sorted(p.name for p in (DOCKER / "build-extra").iterdir()) == ["README.md"]
    probe = (
        "import os, sys, torch, fedfsd; "
        "gone = [p for p in ('/tmp/build-extra', '/tmp/build-extra/ca.pem') if os.path.exists(p)]; "
        "whl = [f for top in ('/opt', '/tmp', '/home', '/srv', '/root', '/usr', '/var') "
        "for _, _, fs in os.walk(top) for f in fs if f.startswith('torch') and '.whl' in f]; "
        "print(os.getuid(), torch.__version__, gone, whl, os.environ.get('PIP_CONFIG_FILE'))"
    )
    out = _docker("run", "--rm", "--network", "none", TEST_IMAGE, "python", "-c", probe)
    uid, version, leftovers, wheels, pipconf = out.split(maxsplit=4)
    assert uid == "10001" and version.startswith("2.13.0"), out
    assert (leftovers, wheels, pipconf.strip()) == ("[]", "[]", "None"), out
    history = _docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", TEST_IMAGE)
    assert "build-extra" not in history and "ca.pem" not in history, history
    assert _docker("run", "--rm", "--network", "none", TEST_IMAGE, "fedfsd", "--help")


_PROBE = """
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, int(port)))
        print(target, "open")
    except ConnectionRefusedError:
        print(target, "refused")
    except OSError as err:
        print(target, "blocked", type(err).__name__)
    finally:
        s.close()
"""


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_compose_federation_runs_one_round() -> None:
    """Build the image, seed tiny fleets, bring the federation up, register the regions and run
    one round through the launcher; the aggregator's run directory gets a checkpoint and each
    region's ledger one release. Then what only containers show: a region reaches the
    aggregator on its own network and nothing on another region's network, no region publishes
    a port, data/key/trust/policy mounts are read-only, and the services run as uid 10001."""
    cli = _need_engine()
    from fedfsd.deploy.processes import free_ports

    _build_image()
    project = f"fedfsd-test-{os.getpid()}"
    fleet_port = free_ports(1)[0]
    env = dict(
        os.environ,
        FEDFSD_IMAGE=TEST_IMAGE,
        FEDFSD_ROUNDS="1",
        FEDFSD_LOCAL_STEPS="2",
        FEDFSD_VEHICLES="60",
        FEDFSD_EPISODES="4",
        FLEET_BIND="127.0.0.1",
        FLEET_PORT=str(fleet_port),
    )
    base = [*cli, "-p", project, "-f", str(COMPOSE)]

    def dc(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([*base, *args], capture_output=True, text=True, env=env,
                             timeout=timeout)  # fmt: skip
        assert res.returncode == 0, f"compose {' '.join(args)}:\n{res.stdout}{res.stderr}"
        return res

    def container(service: str) -> str:
        cid = dc("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def inspect(cid: str) -> dict[str, Any]:
        import json

        return json.loads(_docker("inspect", cid))[0]

    def wait_healthy(service: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = inspect(container(service))["State"]
            if state.get("Health", {}).get("Status") == "healthy":
                return
            if not state["Running"] or time.monotonic() > deadline:
                logs = dc("logs", "--no-color", service).stdout[-3000:]
                pytest.fail(f"{service} not healthy: {state.get('Status')}\n{logs}")
            time.sleep(2)

    try:
        for r in REGIONS:
            dc("run", "-T", "--rm", f"data-{r}")
        dc("up", "-d", "aggregator")
        wait_healthy("aggregator", 180)
        for r in REGIONS:
            dc("run", "-T", "--rm", f"register-{r}")
        dc("up", "-d", *(f"region-{r}" for r in REGIONS))
        out = dc("run", "-T", "--rm", "launcher", timeout=1800).stdout
        assert "finished:completed" in out, out[-3000:]
        for r in REGIONS:
            ledger = dc("exec", "-T", f"region-{r}", "cat", "/srv/fedfsd/state/ledger.jsonl").stdout
            assert sum('"kind": "release"' in ln for ln in ledger.splitlines()) == 1, ledger
        ck = dc("exec", "-T", "aggregator", "sh", "-c", "ls /srv/fedfsd/aggregator/runs/*/")
        assert "checkpoint.npz" in ck.stdout

        # ---- what only containers show -----------------------------------------------------
        agg = inspect(container("aggregator"))
        agg_ip = {
            net.removeprefix(f"{project}_"): cfg["IPAddress"]
            for net, cfg in agg["NetworkSettings"]["Networks"].items()
        }
        assert set(agg_ip) == {"region-cn", "region-eu", "region-us", "fleet-edge"}, agg_ip
        bindings = agg["HostConfig"]["PortBindings"]
        assert bindings == {"9092/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(fleet_port)}]}
        regions = {r: inspect(container(f"region-{r}")) for r in REGIONS}
        for r, info in regions.items():
            # no published port, only its own network
            assert not info["HostConfig"]["PortBindings"], info["HostConfig"]["PortBindings"]
            assert not any(info["NetworkSettings"]["Ports"].values()), info["NetworkSettings"]
            assert list(info["NetworkSettings"]["Networks"]) == [f"{project}_region-{r}"]
            # mounts: read-only inputs, writable state, only its own volumes
            mounts = {m["Destination"]: m for m in info["Mounts"]}
            ro = {"/srv/fedfsd/data", "/srv/fedfsd/key", "/srv/fedfsd/trust",
                  "/srv/fedfsd/policy.toml"}  # fmt: skip
            assert set(mounts) == ro | {"/srv/fedfsd/state"}, sorted(mounts)
            assert all(not mounts[d]["RW"] for d in ro), {d: mounts[d]["RW"] for d in ro}
            assert mounts["/srv/fedfsd/state"]["RW"]
            assert mounts["/srv/fedfsd/data"]["Name"] == f"{project}_{r}-data"
            assert mounts["/srv/fedfsd/key"]["Name"] == f"{project}_{r}-key"
            cid = info["Id"]
            denied = _docker("exec", cid, "sh", "-c",
                             "touch /srv/fedfsd/data/x 2>&1; touch /srv/fedfsd/key/x 2>&1; id -u",
                             check=False)  # fmt: skip
            assert denied.count("Read-only file system") == 2 and denied.split()[-1] == "10001", (
                denied
            )
            assert _docker("exec", cid, "ls", "/srv/fedfsd/key").split() == [r, f"{r}.pub"]
            # reach: its own side of the aggregator only
            own = f"{agg_ip[f'region-{r}']}:9092"
            others = [f"{agg_ip[n]}:9092" for n in agg_ip if n != f"region-{r}"]
            others += [
                f"{next(iter(o['NetworkSettings']['Networks'].values()))['IPAddress']}:9094"
                for q, o in regions.items()
                if q != r
            ]
            probe = _docker("exec", cid, "python", "-c", _PROBE, own, *others, timeout=120)
            result = dict(line.split(" ", 1) for line in probe.splitlines())
            assert result[own] == "open", probe
            for target in others:
                assert result[target].startswith("blocked"), (r, target, probe)
    finally:
        subprocess.run([*base, "--profile", "seed", "--profile", "admin", "down", "-v",
                        "--remove-orphans"], env=env, timeout=300,
                       capture_output=True)  # fmt: skip
