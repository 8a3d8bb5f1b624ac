"""Test-only ClientApp for tests/test_secagg_federation.py: the real region ClientApp, with the
secure release's test hook installed in the region's own process (never through node config).

The test copies this file into a directory of its own, writes `secagg_hooks.json` next to it
({"record_dir": DIR, "exit_on_unmask": {region: fedfsd run id}}) and names the directory as the
region's `app_path`. The hook saves the integer vector each region masks (inside the region, so
the test can check the aggregator's step against it) and makes a region exit when asked to
unmask in the named run (so the aggregator must recover its self mask from the others' shares).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedfsd.region import secure_release
from fedfsd.region.client_app import app

__all__ = ["app"]

CONFIG = json.loads(Path(__file__).with_name("secagg_hooks.json").read_text())


def _hook(point: str, **ctx: Any) -> None:
    region, run_id, rnd = ctx["region"], ctx["run_id"], ctx["round"]
    if point == "routed":
        d = Path(CONFIG["record_dir"]) / region
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"{region}-{run_id}-r{rnd}.npy", ctx["vector"])
    elif point == "unmask" and CONFIG.get("exit_on_unmask", {}).get(region) == run_id:
        os._exit(17)


secure_release.set_test_hook(_hook)
