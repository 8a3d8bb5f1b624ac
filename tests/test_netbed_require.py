"""FEDFSD_REQUIRE_NETBED=1 (exported by .ci/run) turns a missing test bed or container engine
into a failure: CI cannot go green by skipping the residency, fault and compose tests.

Each case runs a real test of the suite in a fresh pytest, with a PATH that lacks the tool
(`nft` for the bed, `docker` for the compose test), once with the variable and once without.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from netbed.require import REQUIRE_ENV

ROOT = Path(__file__).resolve().parents[1]
BED_TEST = "tests/test_residency_netbed.py::test_bed_layout_and_teardown"
COMPOSE_TEST = "tests/test_docker_compose.py::test_compose_federation_runs_one_round"


def _run_without(tool: str, test: str, tmp_path: Path, require: str | None) -> tuple[int, str]:
    """Run `test` with a PATH holding only the bed's other tools (not `tool`)."""
    bin_dir = tmp_path / f"bin-{require}"
    bin_dir.mkdir()
    for name in ("ip", "nft", "tc", "docker"):
        found = shutil.which(name)
        if name != tool and found:
            (bin_dir / name).symlink_to(found)
    # FEDFSD_REQUIRE_ENGINE (also set by .ci/run) would turn the compose skip into a failure too.
    env = {k: v for k, v in os.environ.items() if k not in (REQUIRE_ENV, "FEDFSD_REQUIRE_ENGINE")}
    env["PATH"] = str(bin_dir)
    if require is not None:
        env[REQUIRE_ENV] = require
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize(("tool", "test"), [("nft", BED_TEST), ("docker", COMPOSE_TEST)])
def test_missing_bed_fails_when_required_and_skips_otherwise(
    tool: str, test: str, tmp_path: Path
) -> None:
    rc, out = _run_without(tool, test, tmp_path, "1")
    assert rc == 1 and "1 failed" in out, out[-3000:]
    assert f"{REQUIRE_ENV}=1 but" in out, out[-3000:]
    if tool == "docker":
        assert "no docker client" in out, out[-3000:]
    elif os.geteuid() == 0:  # as root the first thing missing is the tool itself
        assert "`nft` is not installed" in out, out[-3000:]
    for require in (None, "0"):
        rc, out = _run_without(tool, test, tmp_path, require)
        assert rc == 0 and "1 skipped" in out and "failed" not in out, out[-3000:]
