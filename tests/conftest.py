"""Suite-wide pytest set-up: how `make test` splits the suite over processes (pytest-xdist).

`make test` runs `pytest -n 2 --dist loadgroup --no-loadscope-reorder`: most of the suite's wall
time is federations waiting on polls and timeouts, not CPU, so two processes on two cores finish
it much sooner. Every test joins the xdist group of its module, so a module's tests and its
module-scoped federation stay in one process (plain `--dist load` would start the federation in
both). Modules that build network-namespace beds share one group, so at most one bed federation
runs at a time; the container tests are a group of their own (the beds live in their own network
namespaces, the containers in the engine's, so the two never touch). The experiments' smoke tests
share nothing, so each is its own group. Groups start longest first (their measured wall time),
so no long group is left for the end while the other process idles. Without `-n` (a single
file, an IDE) nothing changes but the order.
"""

from __future__ import annotations

import pytest

# Modules that build tests/netbed beds (namespaces, nftables, tc).
NETBED_GROUP = "netbed"
NETBED_MODULES = {
    "test_faults_federation",
    "test_netbed_require",
    "test_ops_e2e",
    "test_region_policy_reload",
    "test_residency_federation",
    "test_residency_netbed",
}
# Modules whose tests share no fixture and are each long: one group per test.
PER_TEST_MODULES = {"test_experiments"}
# Longest groups first: wall seconds of each in a two-process run on the loaded 2-core machine
# (`pytest -n 2 --durations=40`, 2026-11-30): netbed ≈ 1,000, docker_compose 425, apps_e2e 393,
# experiments 500 in 10 tests, secagg_federation 190, e2e_deploy 175, walkthrough 150,
# demo_e2e 126, demo_secure 96. Everything else follows in collection order.
LONGEST_FIRST = (
    NETBED_GROUP,
    "test_docker_compose",
    "test_apps_e2e",
    "test_experiments",
    "test_secagg_federation",
    "test_e2e_deploy",
    "test_walkthrough",
    "test_demo_e2e",
    "test_demo_secure",
)


def _module(item: pytest.Item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1] if item.module else item.nodeid


def _group(item: pytest.Item) -> str:
    module = _module(item)
    if module in NETBED_MODULES:
        return NETBED_GROUP
    if module in PER_TEST_MODULES:
        return f"{module}::{item.name}"
    return module


def _rank(item: pytest.Item) -> int:
    module = _module(item)
    key = NETBED_GROUP if module in NETBED_MODULES else module
    return LONGEST_FIRST.index(key) if key in LONGEST_FIRST else len(LONGEST_FIRST)


# tryfirst: xdist's own hook (in each worker) turns the marks into node-id suffixes after this.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: collection order within a rank
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(_group(item)))
