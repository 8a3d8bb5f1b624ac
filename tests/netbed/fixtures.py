"""pytest fixtures for the test bed; test modules import them (`from netbed.fixtures import *`)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from .bed import PREFIX, NetBed, unavailable_reason


def _probe_namespaces() -> str | None:
    """Skip reason when namespaces cannot actually be created (e.g. a container without
    CAP_SYS_ADMIN), None when they can."""
    reason = unavailable_reason()
    if reason:
        return reason
    name = f"{PREFIX}{os.getpid()}-probe"
    res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create network namespaces here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@pytest.fixture
def netbed(tmp_path) -> Iterator[NetBed]:
    """A fresh 1-aggregator + 3-region bed, torn down (processes killed, namespaces deleted)
    even when the test fails."""
    reason = _probe_namespaces()
    if reason:
        pytest.skip(reason)
    bed = NetBed(workdir=tmp_path)
    try:
        bed.up()
        yield bed
    finally:
        bed.down()
