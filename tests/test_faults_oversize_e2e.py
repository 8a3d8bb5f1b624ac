"""Issue 20, item 5, end to end: a real oversized train message against a real region.

Real processes on loopback: `fedfsd aggregator start` (SuperLink), `fedfsd region start`
(SuperNode + the region's executor) and a ServerApp (tests/apps/oversize_app) that sends 96 MiB
of zeros in one train message. The executor must refuse it with code 4131 having pulled only
its headers: its peak RSS (VmHWM) grows by far less than the message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from private_dirs import private_dir
from test_deploy_cli import POLICY, _fedfsd, _read_until, _stop

from fedfsd.deploy.appbundle import app_digest
from fedfsd.deploy.processes import descendants, flower_env, free_ports, wait_until
from fedfsd.region.executor import MESSAGE_TOO_LARGE_ERROR_CODE

pytestmark = pytest.mark.slow

APPS = Path(__file__).parent / "apps"
PAD_MIB = 96


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _executor_pid(parent: int) -> int:
    for pid in descendants(parent):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fedfsd.region.executor" in cmd:
            return pid
    raise AssertionError("executor process not found")


@pytest.fixture
def private_tmp(request: pytest.FixtureRequest):
    with private_dir(request, "fedfsd-oversize-") as path:
        yield path


def test_an_oversized_train_message_is_refused_before_it_is_pulled(private_tmp: Path) -> None:
    from fedfsd.deploy.admin import AggregatorDir
    from fedfsd.deploy.control import ControlClient

    tmp = private_tmp
    fleet, control, rt = free_ports(3)
    data = tmp / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"region": "eu", "vehicles": 20}')
    pol = tmp / "eu.toml"
    pol.write_text(POLICY)  # no allow-list, default max_message_bytes (8 MiB)
    ledger = tmp / "eu" / "ledger.jsonl"
    procs = []
    try:
        agg = _fedfsd(
            "aggregator", "start", "--dir", str(tmp / "agg"), "--insecure",
            "--fleet-address", f"127.0.0.1:{fleet}", "--control-port", str(control),
            "--allow-serverapp", app_digest(APPS / "oversize_app"),  # this test's ServerApp
        )  # fmt: skip
        procs.append(agg)
        _read_until(agg, "SuperLink up", 120)
        region = _fedfsd(
            "region", "start", "--insecure", "--superlink", f"127.0.0.1:{fleet}",
            "--policy", str(pol), "--data", str(data), "--ledger", str(ledger),
            "--runtime-port", str(rt), "--clientapp", "deploy_tiny_app:client",
            env={**flower_env(), "PYTHONPATH": str(APPS / "deploy_tiny")},
        )  # fmt: skip
        procs.append(region)
        _read_until(region, "connected to", 180)
        executor_log = ledger.parent / "logs" / "executor.log"
        wait_until(lambda: "executor ready" in executor_log.read_text(), 120, "executor ready")
        executor = _executor_pid(region.pid)
        before = _vm_hwm_kib(executor)

        d = AggregatorDir((tmp / "agg").resolve())
        ctl = ControlClient(d.flwr_home, d.root)
        result = tmp / "result.json"
        cfg = {"pad-mib": PAD_MIB, "result-path": str(result), "round-timeout": 120.0}
        status = ctl.wait_run(ctl.start_run(cfg, APPS / "oversize_app"), 400, poll=2.0)
        assert status == "finished:completed", status

        out = json.loads(result.read_text())
        assert out["nodes"] == 1 and out["ok"] == 0, out
        (err,) = out["errors"]
        assert err.startswith(f"{MESSAGE_TOO_LARGE_ERROR_CODE}:") and "max_message_bytes" in err
        decisions = (ledger.parent / "logs" / "decisions.jsonl").read_text().splitlines()
        last = json.loads(decisions[-1])
        assert last["decision"] == "refused" and "before pulling" in last["reason"], last
        grown_mib = (_vm_hwm_kib(executor) - before) / 1024
        # Measured: +0.2 MiB for the bounded pull; draining the refused message one object at a
        # time (so the SuperNode can drop it) holds one 5 MiB chunk, about +25 MiB with copies.
        assert grown_mib < 40, f"executor peak RSS grew by {grown_mib:.1f} MiB"
        print(f"executor peak RSS grew by {grown_mib:.1f} MiB for a {PAD_MIB} MiB message")
    finally:
        for proc in reversed(procs):
            _stop(proc)
