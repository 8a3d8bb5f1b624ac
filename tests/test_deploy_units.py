"""Fast unit tests of fedfsd.deploy: PKI formats Flower accepts, process supervision, helpers."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from fedfsd.deploy import pki
from fedfsd.deploy.appbundle import PACKAGED_APP_DIR, app_digest
from fedfsd.deploy.federation import node_config_arg, supernode_argv
from fedfsd.deploy.processes import (
    ProcessError,
    ProcessGroup,
    flower_env,
    free_ports,
    wait_for_log,
    wait_for_port,
)


def test_server_cert_has_sans_and_chains_to_ca(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    paths = pki.create_server_pki(tmp_path, ["agg.example.org", "10.1.2.3"])
    sans = pki.server_sans(paths.server_cert)
    for name in ["localhost", "127.0.0.1", "agg.example.org", "10.1.2.3"]:
        assert name in sans
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert os.stat(paths.server_key).st_mode & 0o077 == 0  # private key owner-only


def test_node_keys_load_with_flowers_own_loaders(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    from fedfsd.flower.flwr_cli import load_node_public_key

    keys = pki.create_node_keys(tmp_path, "eu")
    assert load_node_public_key(keys.public_key)  # what `flwr supernode register` does
    priv = load_ssh_private_key(keys.private_key.read_bytes(), password=None)
    assert priv.curve.name == "secp384r1"
    other = pki.create_node_keys(tmp_path, "us")
    assert other.public_key.read_bytes() != keys.public_key.read_bytes()


def test_flower_env_turns_off_telemetry_and_dependency_install() -> None:
    env = flower_env({"X": "1"})
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["X"] == "1"


def test_free_ports_are_distinct() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5


_CHILD = """
import socket, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("grandchild", child.pid, flush=True)
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("listening", flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); treat it as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_group_stop_kills_children_and_grandchildren(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "logs")
    port = free_ports(1)[0]
    try:
        proc = group.start("child", [sys.executable, "-c", _CHILD, str(port)], env=flower_env())
        wait_for_port("127.0.0.1", port, 30, proc)
        wait_for_log(proc, "listening", 10)
        grandchild = int(proc.log_tail().split("grandchild ")[1].split()[0])
        assert proc.alive()
    finally:
        group.stop_all(timeout=5)
    assert not proc.alive()
    deadline = time.monotonic() + 10
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(grandchild)
    assert "==== start" in (tmp_path / "logs" / "child.log").read_text()


def test_readiness_wait_reports_early_exit_with_log(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path)
    try:
        proc = group.start("boom", [sys.executable, "-c", "print('bad flag'); raise SystemExit(3)"])
        with pytest.raises(ProcessError, match="(?s)exited \\(code 3\\).*\\nbad flag"):
            wait_for_port("127.0.0.1", free_ports(1)[0], 30, proc)
    finally:
        group.stop_all()


def test_readiness_wait_times_out(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path)
    try:
        proc = group.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
        with pytest.raises(ProcessError, match="timed out"):
            wait_for_port("127.0.0.1", free_ports(1)[0], 0.5, proc)
    finally:
        group.stop_all()
    assert proc.popen.returncode == -signal.SIGTERM


def test_node_config_and_supernode_argv() -> None:
    arg = node_config_arg({"region": "eu", "data-dir": "/d/eu", "k": 3, "b": True})
    assert arg == 'region="eu" data-dir="/d/eu" k=3 b=true'
    with pytest.raises(ValueError, match="spaces"):
        node_config_arg({"data-dir": "/a b"})
    argv = supernode_argv("127.0.0.1:9092", 9094, {"region": "eu"}, "/ca.crt", "/k")
    assert argv[argv.index("--isolation") + 1] == "process"
    assert "--insecure" not in argv
    assert argv[argv.index("--auth-supernode-private-key") + 1] == "/k"
    insecure = supernode_argv("h:1", 2, {}, None, None)
    assert "--insecure" in insecure and "--auth-supernode-private-key" not in insecure


def test_packaged_app_digest_is_stable_and_code_free() -> None:
    import io
    import zipfile

    from fedfsd.deploy.appbundle import build_fab

    assert app_digest() == app_digest(PACKAGED_APP_DIR)
    names = zipfile.ZipFile(io.BytesIO(build_fab())).namelist()
    assert not [n for n in names if n.endswith(".py")]


_ORPHAN = """
import os, subprocess, sys, time
env = dict(os.environ, FEDFSD_PARENT_PID=str(os.getpid()))
code = ("from fedfsd.deploy.watchdog import start_parent_watchdog as w; import time; "
        "w(0.1); time.sleep(60)")
child = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_watchdog_stops_a_child_whose_parent_was_killed() -> None:
    import subprocess

    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())  # type: ignore[union-attr]
    try:
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child)
    finally:
        if not _gone(child):
            os.kill(child, signal.SIGKILL)


def test_descendants_and_terminate_stop_a_whole_tree_even_one_ignoring_sigterm() -> None:
    import subprocess
    import time

    from fedfsd.deploy.processes import descendants, terminate

    # bash → a sleep, and a sleep that ignores SIGTERM (SIG_IGN survives the exec)
    script = "sleep 60 & (trap '' TERM; sleep 60) & wait"
    proc = subprocess.Popen(["bash", "-c", script])
    try:
        deadline = time.monotonic() + 10
        while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = descendants(proc.pid)
        assert len(tree) >= 2 and proc.pid not in tree
        t0 = time.monotonic()
        terminate(tree | {proc.pid}, grace=0.5)
        assert time.monotonic() - t0 < 5
        proc.wait(timeout=5)
        assert not (descendants(proc.pid) & tree)
        for pid in tree:  # gone, or a zombie waiting for init to reap it
            stat = Path(f"/proc/{pid}/stat")
            assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    finally:
        if proc.poll() is None:
            proc.kill()
