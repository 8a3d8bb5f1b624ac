"""Every change fedfsd makes to Flower's own behaviour at run time, and whether each is in effect.

Why: fedfsd rebinds names inside non-public flwr 1.39 modules to cut per-message latency (Flower
offers no setting for any of them). A patch that silently stops applying (a renamed module, a
new import path) would only show as slow rounds, so each one is listed here with the fedfsd
process that applies it and a check that reads the patched attribute back
(tests/test_flower_patches.py runs each process's patch step and asserts every check).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedfsd.flower.pull_backoff import EXECUTOR_SITE, SERVERAPP_SITE, SUPERNODE_SITE, pull_is_fast
from fedfsd.flower.supernode_poll import POLL_MODULE, idle_poll_cap


@dataclass(frozen=True)
class Patch:
    """One rebinding in Flower: where, which fedfsd process applies it, how to see it is ours."""

    name: str
    target: str  # flwr module.attribute that is rebound
    applied_by: str  # the fedfsd module whose process applies it
    in_effect: Callable[[], bool]


PATCHES: tuple[Patch, ...] = (
    Patch(
        "SuperNode idle poll capped",
        f"{POLL_MODULE}.time",
        "fedfsd.deploy.supernode_launcher",
        lambda: idle_poll_cap() is not None,
    ),
    Patch(
        "SuperNode object-pull back-off",
        f"{SUPERNODE_SITE}.pull_objects",
        "fedfsd.deploy.supernode_launcher",
        lambda: pull_is_fast(SUPERNODE_SITE, "pull_objects"),
    ),
    Patch(
        "executor object-pull back-off",
        f"{EXECUTOR_SITE}.pull_and_inflate_object_from_tree",
        "fedfsd.region.executor",
        lambda: pull_is_fast(EXECUTOR_SITE, "pull_and_inflate_object_from_tree"),
    ),
    Patch(
        "ServerApp object-pull back-off",
        f"{SERVERAPP_SITE}.pull_objects",
        "fedfsd.aggregator.server_app",
        lambda: pull_is_fast(SERVERAPP_SITE, "pull_objects"),
    ),
)


def patch_status(applied_by: str | None = None) -> dict[str, bool]:
    """{patch name: in effect} for the patches `applied_by` applies (default: all)."""
    return {p.name: p.in_effect() for p in PATCHES if applied_by in (None, p.applied_by)}
