"""docs/deploy-local.md's walkthrough, followed verbatim in a real shell (issue 14).

Every ```bash block of the doc carries a marker on the line before it: `<!-- walkthrough -->`
(this test runs it) or `<!-- walkthrough: skip: REASON -->`. The marked blocks run in order, as
one `bash -e` script in an empty temporary directory, with `fedfsd` and `python` of this
checkout on PATH. The only substitutions are the ones the doc names: its port variables, set
here to free ports. Then the outcomes the doc promises are checked from the files it says
they are in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[1] / "docs" / "deploy-local.md"
MARKER = re.compile(r"^<!-- walkthrough(?:: skip: (?P<why>.+?))? -->$")
PORT_VARS = (
    "FLEET_PORT",
    "CONTROL_PORT",
    "EU_RUNTIME_PORT",
    "US_RUNTIME_PORT",
    "IMPOSTOR_RUNTIME_PORT",
)


def blocks(text: str) -> list[tuple[str | None, str]]:
    """(skip reason or None, body) of every ```bash block, in order; a block without a marker
    fails (a new command in the doc must say whether the walkthrough runs it)."""
    lines = text.splitlines()
    out: list[tuple[str | None, str]] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            marker = MARKER.match(lines[i - 1].strip()) if i else None
            assert marker, f"{DOC.name}:{i + 1}: ```bash block without a walkthrough marker"
            end = lines.index("```", i + 1)
            out.append((marker.group("why"), "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return out


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_every_bash_block_is_marked() -> None:
    found = blocks(DOC.read_text(encoding="utf-8"))
    run = [body for why, body in found if why is None]
    assert len(run) >= 5 and all(why.strip() for why, _ in found if why is not None)
    script = "\n".join(run)
    for var in PORT_VARS:  # the doc defines every variable this test substitutes
        assert f"${{{var}:=" in script


def test_walkthrough_runs_verbatim() -> None:
    script = "\n\n".join(body for why, body in blocks(DOC.read_text(encoding="utf-8")) if not why)
    # Not pytest's tmp_path: other pytest sessions on this machine prune /tmp/pytest-of-<user>/.
    work = Path(tempfile.mkdtemp(prefix="fedfsd-walkthrough-"))
    (work / "walkthrough.sh").write_text(script + "\n", encoding="utf-8")
    bindir = str(Path(sys.executable).parent)
    ports = dict(zip(PORT_VARS, map(str, _free_ports(len(PORT_VARS))), strict=True))
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        **ports,
    }
    proc = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "walkthrough.sh"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its background commands die with it if this test fails
    )
    try:
        out, _ = proc.communicate(timeout=600)
        logs = "".join(
            f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(work.glob("*.out"))
        )
        assert proc.returncode == 0, out[-6000:] + logs
        # The run ended, and says so: summary ok, both rounds, ε per region by name.
        summary = json.loads((work / "runs" / "r1" / "summary.json").read_text())
        assert summary["ok"] is True and summary["rounds_ok"] == 2, summary
        for region in ("eu", "us"):
            e = summary["regions"][region]
            assert 0 < e["epsilon"] < 8.0 and e["epsilon_left"] == pytest.approx(8 - e["epsilon"])
            assert region in out
        assert "2 of 2 round(s) successful" in out
        # Status by region name (the text tables the doc shows).
        assert re.search(r"│ eu\s+│ \d+\s+│ online", out) and re.search(r"│ us\s+│", out), out
        assert f"fedfsd run id {summary['fedfsd_run_id']}" in out
        # The privacy review verified both reports against ledger and receipts.
        for region in ("eu", "us"):
            assert re.search(rf"^OK {region}-report\.json", out, re.M), out[-4000:]
        # The impostor was refused and the aggregator's security log says so.
        refused = [
            json.loads(line)
            for line in (work / "agg" / "security.jsonl").read_text().splitlines()
            if '"node_refused"' in line
        ]
        assert refused and refused[0]["fingerprint"].startswith("SHA256:")
        assert "impostor accepted" not in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
