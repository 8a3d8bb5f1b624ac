"""pytest fixtures for the test bed; test modules import them (`from netbed.fixtures import *`)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .bed import PREFIX, NetBed, unavailable_reason
from .require import require_netbed


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
    even when the test fails. Without a bed: skipped, or failed under FEDFSD_REQUIRE_NETBED=1."""
    require_netbed()
    bed = NetBed(workdir=tmp_path)
    try:
        bed.up()
        yield bed
    finally:
        bed.down()


DATA_CACHE = Path(tempfile.gettempdir()) / "fedfsd-netbed-data"
REGION_SEEDS = {"eu": 5, "us": 6, "cn": 7, "jp": 8}


def cached_region_data(region: str) -> Path:
    """A tiny simulated dataset for `region`, generated once and reused while it validates."""
    from fedfsd.data.validate import DatasetError, validate_dataset

    from .fleetdata import make_region_data

    out = DATA_CACHE / f"{region}-v4-e2-s{REGION_SEEDS[region]}"
    if (out / "manifest.json").exists():
        try:
            validate_dataset(out)
            return out
        except DatasetError:
            pass
    return make_region_data(region, out, seed=REGION_SEEDS[region])


@pytest.fixture(scope="session")
def fleet_data() -> dict[str, Path]:
    """Read-only tiny datasets per region (copy before changing them)."""
    return {r: cached_region_data(r) for r in REGION_SEEDS}
