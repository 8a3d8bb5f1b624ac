"""`make test`'s process split keeps every module whole (tests/conftest.py).

A module's tests share a module-scoped federation and some depend on file order, so they must
run in one process, in order. xdist's `loadgroup` stopped doing that under pytest 9.2 without a
word; this runs the suite's own scheduler on real modules, the way `make test` does, and reads
which process ran what.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from conftest import NETBED_MODULES, NETBED_UNIT, unit_of

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["tests/test_policy.py", "tests/test_data_splits.py", "tests/test_wire_layout.py"]


def _pytest(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_units_are_modules_the_netbed_group_and_single_experiments() -> None:
    assert unit_of("tests/test_ops_e2e.py::test_a") == unit_of("tests/test_ops_e2e.py::test_b")
    assert unit_of("tests/test_ops_e2e.py::test_a") != unit_of("tests/test_policy.py::test_a")
    for module in NETBED_MODULES:
        assert unit_of(f"tests/{module}.py::test_x[1]") == NETBED_UNIT
    a, b = "tests/test_experiments.py::test_a", "tests/test_experiments.py::test_b"
    assert unit_of(a) != unit_of(b)


def test_two_processes_run_each_module_whole_and_in_file_order() -> None:
    listed = _pytest("--collect-only", "-q", *MODULES)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    order = [line for line in listed.stdout.splitlines() if "::" in line]
    assert len({line.split("::")[0] for line in order}) == len(MODULES)
    res = _pytest("-n", "2", "--dist", "loadscope", "--no-loadscope-reorder", "-v", *MODULES)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ran: dict[str, list[tuple[str, str]]] = defaultdict(list)  # module -> [(worker, test id)]
    for worker, nodeid in re.findall(r"\[(gw\d+)\][^\n]*? PASSED (\S+)", res.stdout):
        ran[nodeid.split("::")[0]].append((worker, nodeid))
    assert sum(len(v) for v in ran.values()) == len(order)
    workers = set()
    for module, runs in ran.items():
        assert len({w for w, _ in runs}) == 1, f"{module} was split over processes: {runs}"
        workers |= {w for w, _ in runs}
        assert [n for _, n in runs] == [n for n in order if n.startswith(module + "::")]
    assert workers == {"gw0", "gw1"}  # and both processes had work
