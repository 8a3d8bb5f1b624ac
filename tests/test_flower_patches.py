"""Every patch fedfsd applies to Flower (fedfsd.flower.patches) is in effect after the fedfsd
process that applies it has started, and the SuperNode's capped idle poll is the binding
Flower's own main loop calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from fedfsd.flower.patches import PATCHES
from fedfsd.flower.pull_backoff import CALL_SITES
from fedfsd.flower.supernode_poll import POLL_MODULE

# Each step does what one fedfsd process does at start-up, in one fresh interpreter (the patches
# rebind module globals, so this test must not leave them in the pytest process).
SCRIPT = textwrap.dedent(
    """
    import importlib, json, time
    from fedfsd.flower.patches import patch_status

    steps = {"before": patch_status()}

    from fedfsd.deploy.supernode_launcher import apply_patches
    steps["skipped"] = apply_patches()
    steps["fedfsd.deploy.supernode_launcher"] = patch_status()

    # Flower's SuperNode loop sleeps 3 s after an empty poll through its module global `time`:
    # call that very binding as the loop's bytecode resolves it.
    loop = importlib.import_module("%(poll)s").start_client_internal
    steps["loop_reads_global_time"] = "time" in loop.__code__.co_names
    t0 = time.monotonic()
    loop.__globals__["time"].sleep(3)
    steps["idle_sleep_s"] = time.monotonic() - t0

    from flwr.clientapp import ClientApp
    from fedfsd.region.executor import ExecutorSettings, RegionExecutor
    RegionExecutor(ExecutorSettings(runtime_api_address="127.0.0.1:1"), client_app=ClientApp())
    steps["fedfsd.region.executor"] = patch_status()

    from flwr.app import Context, RecordDict
    from fedfsd.aggregator.server_app import make_server_app
    from fedfsd.aggregator.settings import SettingsError
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config={"num-server-rounds": -1})
    try:  # the ServerApp's main patches first, then refuses this run config
        make_server_app({})(None, ctx)
    except SettingsError:
        pass
    steps["fedfsd.aggregator.server_app"] = patch_status()
    print(json.dumps(steps))
    """
)


def test_patch_list_names_every_rebinding() -> None:
    targets = {p.target for p in PATCHES}
    assert targets == {f"{m}.{a}" for m, a in CALL_SITES} | {f"{POLL_MODULE}.time"}
    assert len({p.name for p in PATCHES}) == len(PATCHES)


def test_each_process_turns_on_its_patches_and_the_supernode_poll_is_capped() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT % {"poll": POLL_MODULE}],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FEDFSD_SUPERNODE_POLL": "0.2", "FLWR_TELEMETRY_ENABLED": "0"},
    )
    assert out.returncode == 0, out.stderr
    steps = json.loads(out.stdout.strip().splitlines()[-1])
    assert not any(steps["before"].values()), steps["before"]  # stock Flower before any step
    assert steps["skipped"] == []
    on: set[str] = set()
    for owner in (
        "fedfsd.deploy.supernode_launcher",
        "fedfsd.region.executor",
        "fedfsd.aggregator.server_app",
    ):
        on |= {p.name for p in PATCHES if p.applied_by == owner}
        assert {k for k, v in steps[owner].items() if v} == on, (owner, steps[owner])
    assert on == {p.name for p in PATCHES}  # every patch has a process that applies it
    assert steps["loop_reads_global_time"]
    assert steps["idle_sleep_s"] < 1.0, steps["idle_sleep_s"]  # stock: 3 s
