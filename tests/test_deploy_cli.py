"""The deployment CLI: clear one-line errors, and the production entry points as real processes
(`fedfsd aggregator start`, `fedfsd aggregator register`, `fedfsd region start`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from private_dirs import private_dir
from typer.testing import CliRunner

from fedfsd.cli import app
from fedfsd.deploy.appbundle import app_digest
from fedfsd.deploy.processes import flower_env, free_ports, port_open, wait_until

POLICY = (
    'region = "eu"\nepsilon_budget = 8.0\ndelta = 1e-6\nmin_noise_multiplier = 0.8\n'
    "max_clip_norm = 1.0\nupdate_norm_bound = 5.0\n"
)


@pytest.mark.parametrize(
    "args, message",
    [
        (["region", "start", "--superlink", "nohost", "--policy", "p", "--data", "d",
          "--ledger", "l"], "--superlink must look like HOST:PORT"),
        (["aggregator", "run", "--dir", "/nonexistent/agg"], "no SuperLink connection"),
        (["deploy", "--data", "eu"], "REGION=PATH"),
        (["deploy", "--data", "eu=/nonexistent"], "not a fedfsd dataset"),
        (["aggregator", "register", "/nonexistent.pub", "--dir", "/nonexistent"],
         "no SuperLink connection"),
        (["region", "register", "/nonexistent.pub", "--dir", "/nonexistent"],
         "no SuperLink connection"),  # the deprecated alias runs the same command
        (["deploy", "keygen", "../evil"], "alphanumeric"),
    ],
)  # fmt: skip
def test_bad_input_is_one_red_line(args: list[str], message: str) -> None:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output


def test_region_register_is_a_deprecated_alias_that_says_where_it_moved() -> None:
    res = CliRunner().invoke(app, ["region", "register", "/nonexistent.pub", "--dir", "/x"])
    assert res.exit_code == 2
    assert "moved to `fedfsd aggregator register`" in res.output
    assert "run `fedfsd aggregator start --dir /x` first" in res.output  # the real command ran
    helps = CliRunner().invoke(app, ["region", "--help"]).output
    assert "deprecated" in helps
    assert "register" in CliRunner().invoke(app, ["aggregator", "--help"]).output


def test_region_start_rejects_bad_policy(tmp_path: Path) -> None:
    pol = tmp_path / "p.toml"
    pol.write_text(POLICY.replace("delta = 1e-6", "delta = 7"))
    res = CliRunner().invoke(
        app,
        ["region", "start", "--superlink", "127.0.0.1:1", "--policy", str(pol), "--data",
         str(tmp_path), "--ledger", str(tmp_path / "l.jsonl")],
    )  # fmt: skip
    assert res.exit_code == 2 and "delta" in res.output


def test_keygen_and_pki_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["deploy", "keygen", "eu", "--out", str(tmp_path)]).exit_code == 0
    assert (tmp_path / "eu").is_file() and (tmp_path / "eu.pub").is_file()
    res = runner.invoke(app, ["deploy", "pki", "--out", str(tmp_path / "pki"), "--san", "agg.lan"])
    assert res.exit_code == 0 and "agg.lan" in res.output


TINY = Path(__file__).parent / "apps" / "deploy_tiny"


def _fedfsd(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedfsd.cli", *args],
        env=env or flower_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


def _read_until(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line and proc.poll() is not None:
            break
        seen += line
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} not seen; output:\n{seen}")


@pytest.fixture
def private_tmp(request: pytest.FixtureRequest):
    with private_dir(request, "fedfsd-cli-") as path:
        yield path


@pytest.mark.slow
def test_production_entry_points(private_tmp: Path) -> None:
    tmp_path = private_tmp
    fleet, control, rt1, rt2 = free_ports(4)
    agg_dir = tmp_path / "agg"
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"region": "eu", "vehicles": 20}')
    pol = tmp_path / "eu.toml"
    pol.write_text(POLICY)
    procs: list[subprocess.Popen] = []
    try:
        agg = _fedfsd(
            "aggregator", "start", "--dir", str(agg_dir), "--fleet-address",
            f"127.0.0.1:{fleet}", "--control-port", str(control),
            "--allow-serverapp", app_digest(TINY),  # the tiny test app is this run's ServerApp
        )  # fmt: skip
        procs.append(agg)
        _read_until(agg, "register regions", 120)
        runner = CliRunner()
        keys = tmp_path / "keys"
        for name in ("eu", "rogue"):
            res = runner.invoke(app, ["deploy", "keygen", name, "--out", str(keys)])
            assert res.exit_code == 0
        res = runner.invoke(
            app, ["aggregator", "register", str(keys / "eu.pub"), "--dir", str(agg_dir)]
        )
        assert res.exit_code == 0, res.output
        assert "registered eu.pub" in res.output

        common = ["--superlink", f"127.0.0.1:{fleet}", "--ca", str(agg_dir / "pki" / "ca.crt"),
                  "--policy", str(pol), "--data", str(data)]  # fmt: skip
        rogue = _fedfsd(
            "region", "start", *common, "--key", str(keys / "rogue"),
            "--ledger", str(tmp_path / "rogue" / "l.jsonl"), "--runtime-port", str(rt1),
        )  # fmt: skip
        procs.append(rogue)
        out, _ = rogue.communicate(timeout=180)
        assert rogue.returncode == 1
        assert "refused this region" in out and "Traceback" not in out

        # A registered region serving the tiny test ClientApp (region-local --clientapp).
        good = _fedfsd(
            "region", "start", *common, "--key", str(keys / "eu"),
            "--ledger", str(tmp_path / "eu-ledger" / "l.jsonl"), "--runtime-port", str(rt2),
            "--clientapp", "deploy_tiny_app:client",
            env={**flower_env(), "PYTHONPATH": str(TINY)},
        )  # fmt: skip
        procs.append(good)
        _read_until(good, "connected to", 180)
        res = runner.invoke(
            app,
            ["aggregator", "run", "--dir", str(agg_dir), "--app", str(TINY), "--rounds", "1",
             "--min-regions", "1", "--node-wait", "60", "--round-timeout", "60",
             "--run-dir", str(tmp_path / "run")],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        assert "finished:completed" in res.output
        assert _stop(good) == 0  # Ctrl-C stops the SuperNode and executor ...
        wait_until(lambda: not port_open("127.0.0.1", rt2), 30, "runtime port to close")
        assert _stop(agg) == 0  # ... and the SuperLink
        wait_until(lambda: not port_open("127.0.0.1", fleet), 30, "fleet port to close")
    finally:
        for proc in procs:
            _stop(proc)
