"""Suite-wide pytest set-up: how `make test` splits the suite over processes (pytest-xdist).

`make test` runs `pytest -n 2 --dist loadscope --no-loadscope-reorder`: most of the suite's wall
time is federations waiting on polls and timeouts, not CPU, so two processes on two cores finish
it much sooner. The unit of scheduling is a module, so a module's tests run in file order in one
process and its module-scoped federation starts once (several modules rely on that order, e.g.
`aggregator status` after the run before it). Modules that build network-namespace beds share one
unit, so at most one bed federation runs at a time; the container tests are a unit of their own
(the beds live in their own network namespaces, the containers in the engine's). The
experiments' smoke tests share nothing, so each is its own unit. Units start longest first.

The grouping is our own scheduler (`pytest_xdist_make_scheduler`), not `--dist loadgroup`:
loadgroup marks a test's group by rewriting `item._nodeid`, which pytest 9.2 no longer reads
(node ids live in `_id`), so under it every test became its own unit, module federations started
in both processes and `test_ops_e2e`'s status test once ran in a process that never saw the run
before it. `tests/test_suite_schedule.py` runs the scheduler on real modules to keep it honest.
Without `-n` (a single file, an IDE) nothing changes but the order.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

# Modules that build tests/netbed beds (namespaces, nftables, tc): one unit, run one at a time.
NETBED_UNIT = "netbed"
NETBED_MODULES = {
    "test_faults_federation",
    "test_netbed_require",
    "test_region_policy_reload",
    "test_residency_federation",
    "test_residency_netbed",
}
# Modules whose tests share no fixture and are each long: one unit per test.
PER_TEST_MODULES = {"test_experiments"}
# Longest units first, by their seconds in one `make test` run (junit times, 2026-11-30, whole
# modules per process): netbed 604, docker_compose 561, ops_e2e 240, walkthrough 200, e2e_deploy
# 188, secagg_federation 184, demo_e2e 171, apps_e2e 152, demo_secure 127, then the experiments'
# smoke tests (15-79 s each, 363 together). Everything else (under 40 s a module) follows in
# collection order. The two processes then finished 1,628 s of wall time on 3,203 s of tests.
LONGEST_FIRST = (
    NETBED_UNIT,
    "test_docker_compose",
    "test_ops_e2e",
    "test_walkthrough",
    "test_e2e_deploy",
    "test_secagg_federation",
    "test_demo_e2e",
    "test_apps_e2e",
    "test_demo_secure",
    "test_experiments",
)


def _module_key(nodeid: str) -> str:
    """The module's name, or the netbed unit for a bed module (the key of LONGEST_FIRST)."""
    module = PurePosixPath(nodeid.split("::", 1)[0]).stem
    return NETBED_UNIT if module in NETBED_MODULES else module


def unit_of(nodeid: str) -> str:
    """The scheduling unit of a test id: its module's path, the netbed unit, or the test itself."""
    key = _module_key(nodeid)
    if key == NETBED_UNIT:
        return key
    return nodeid if key in PER_TEST_MODULES else nodeid.split("::", 1)[0]


def _rank(item: pytest.Item) -> int:
    key = _module_key(item.nodeid)
    return LONGEST_FIRST.index(key) if key in LONGEST_FIRST else len(LONGEST_FIRST)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: `-p no:xdist` still works
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Our scheduler under `--dist loadscope`; any other `--dist` keeps xdist's own."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnitScheduling(LoadScopeScheduling):
        """xdist's loadscope, with `unit_of` as the scope: whole units go to one process each."""

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return ModuleUnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Stable sort: collection order within a rank. Every process sorts the same way, and with
    # --no-loadscope-reorder the scheduler hands out units in this order.
    items.sort(key=_rank)
