"""Suite-wide pytest set-up: how `make test` splits the suite over processes (pytest-xdist).

`make test` runs `pytest -n 2 --dist loadgroup`: most of the suite's wall time is federations
waiting on polls and timeouts, not CPU, so two processes on two cores finish it much sooner.
Every test joins the xdist group of its module, so a module's tests and its module-scoped
federation stay in one process (plain `--dist load` would start the federation in both).
Modules that build network-namespace beds or drive the container engine share one group, so at
most one of them runs at a time. Without `-n` (a single file, an IDE) nothing changes.
"""

from __future__ import annotations

import pytest

# Modules that build tests/netbed beds (namespaces, nftables, tc) or run containers.
SERIAL_GROUP = "netbed-and-containers"
SERIAL_MODULES = {
    "test_docker_compose",
    "test_faults_federation",
    "test_netbed_require",
    "test_ops_e2e",
    "test_region_policy_reload",
    "test_residency_federation",
    "test_residency_netbed",
}


# tryfirst: xdist's own hook (in each worker) turns the marks into node-id suffixes after this.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else item.nodeid
        group = SERIAL_GROUP if module in SERIAL_MODULES else module
        item.add_marker(pytest.mark.xdist_group(group))
