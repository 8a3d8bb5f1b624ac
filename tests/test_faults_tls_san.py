"""Issue 20, item 7a: a SuperLink address outside the certificate's SANs is named at once.

A real `flower-superlink` (TLS, throwaway PKI with SANs localhost/127.0.0.1/::1) listens on all
loopback addresses; the region dials 127.0.0.2, which is loopback too but not in the SANs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfsd.deploy import pki
from fedfsd.deploy.federation import superlink_argv
from fedfsd.deploy.processes import ProcessGroup, flower_env, free_ports, wait_for_port
from fedfsd.deploy.tlsprobe import tls_problem

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("san")
    server = pki.create_server_pki(root / "pki")
    fleet, control = free_ports(2)
    group = ProcessGroup(root / "logs")
    try:
        proc = group.start(
            "superlink",
            superlink_argv(f"0.0.0.0:{fleet}", "127.0.0.1", control, root / "db", server),
            env=flower_env(),
        )
        wait_for_port("127.0.0.1", fleet, 60, proc)
        yield root, server, fleet
    finally:
        group.stop_all()


def test_probe_names_the_san_mismatch_and_passes_a_listed_address(superlink) -> None:
    _, server, fleet = superlink
    assert tls_problem(f"127.0.0.1:{fleet}", server.ca_cert) is None
    assert tls_problem(f"localhost:{fleet}", server.ca_cert) is None
    problem = tls_problem(f"127.0.0.2:{fleet}", server.ca_cert)
    assert problem is not None and "not valid for '127.0.0.2'" in problem
    assert "127.0.0.1" in problem and "--san 127.0.0.2" in problem


def test_probe_names_a_foreign_ca(superlink, tmp_path: Path) -> None:
    _, _, fleet = superlink
    other = pki.create_server_pki(tmp_path / "other")
    problem = tls_problem(f"127.0.0.1:{fleet}", other.ca_cert)
    assert problem is not None and "does not verify" in problem


def test_unreachable_superlink_is_not_a_certificate_problem(superlink) -> None:
    _, server, _ = superlink
    (port,) = free_ports(1)
    assert tls_problem(f"127.0.0.1:{port}", server.ca_cert, timeout=2) is None


def test_region_start_fails_fast_naming_the_certificate(superlink, tmp_path: Path) -> None:
    from fedfsd.cli import app

    _, server, fleet = superlink
    keys = pki.create_node_keys(tmp_path, "eu")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({}))
    pol = tmp_path / "eu.toml"
    pol.write_text(
        'region = "eu"\nepsilon_budget = 8.0\ndelta = 1e-6\nmin_noise_multiplier = 0.8\n'
        "max_clip_norm = 1.0\nupdate_norm_bound = 5.0\n"
    )
    args = ["region", "start", "--superlink", f"127.0.0.2:{fleet}", "--ca", str(server.ca_cert)]
    args += ["--key", str(keys.private_key), "--policy", str(pol), "--data", str(data)]
    args += ["--ledger", str(tmp_path / "ledger.jsonl")]
    t0 = time.monotonic()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "not valid for '127.0.0.2'" in res.output, res.output
    assert time.monotonic() - t0 < 30
