"""Refused SuperNode keys: fingerprints, registered names, the status rows (issue 14).

The end-to-end case (a real SuperLink refusing a key, logged and in status) is
tests/test_ops_e2e.py::test_refused_keys_are_logged_by_the_aggregator_and_shown_in_status.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fedfsd.aggregator.status import refused_nodes
from fedfsd.deploy import pki
from fedfsd.flower.node_refusals import (
    KEY_NAMES,
    fingerprint_of_file,
    fingerprint_of_wire,
    known_names,
    remember_key,
)


def _pem(pub: Path) -> bytes:
    key = serialization.load_ssh_public_key(pub.read_bytes())
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_fingerprint_is_the_same_from_the_key_file_and_from_the_wire(tmp_path: Path) -> None:
    a = pki.create_node_keys(tmp_path, "a").public_key
    b = pki.create_node_keys(tmp_path, "b").public_key
    fa = fingerprint_of_file(a)
    assert fa.startswith("SHA256:") and fa == fingerprint_of_wire(_pem(a))
    assert fa != fingerprint_of_file(b)
    assert fingerprint_of_wire(b"not a key").startswith("sha256-of-bytes:")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_fingerprint_is_what_ssh_keygen_prints(tmp_path: Path) -> None:
    pub = pki.create_node_keys(tmp_path, "eu").public_key
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True)
    assert out.stdout.split()[1] == fingerprint_of_file(pub)


def test_registered_names_are_kept_by_fingerprint(tmp_path: Path) -> None:
    eu = pki.create_node_keys(tmp_path / "k", "eu").public_key
    us = pki.create_node_keys(tmp_path / "k", "us").public_key
    assert known_names(tmp_path / KEY_NAMES) == {}
    fe = remember_key(tmp_path, eu, "eu")
    fu = remember_key(tmp_path, us, "us")
    assert known_names(tmp_path / KEY_NAMES) == {fe: "eu", fu: "us"}


def test_status_rows_group_refusals_by_key() -> None:
    events = [
        {"event": "node_refused", "fingerprint": "SHA256:a", "time": "t1"},
        {"event": "serverapp_refused", "flower_run_id": 1},
        {"event": "node_refused", "fingerprint": "SHA256:b", "time": "t2", "region": "eu"},
        {"event": "node_refused", "fingerprint": "SHA256:a", "time": "t3"},
    ]
    rows = {r["fingerprint"]: r for r in refused_nodes(events)}
    assert rows["SHA256:a"] == {
        "fingerprint": "SHA256:a",
        "first": "t1",
        "last": "t3",
        "attempts": 2,
    }
    assert rows["SHA256:b"]["region"] == "eu" and rows["SHA256:b"]["attempts"] == 1
