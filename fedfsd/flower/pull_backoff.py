"""Shorter retry back-off for Flower 1.39's object pulls (a per-message latency fix).

Why: Flower 1.39 makes a message visible to its receiver *before* the message's objects (the
model arrays) have been uploaded. The receiver's `pull_objects` then gets "object unavailable"
and backs off 1 s, then 2 s, 4 s … (`PULL_INITIAL_BACKOFF = 1`, `PULL_BACKOFF_CAP = 10` in
`flwr/supercore/constant.py`). That happens at three hops of every exchange: the SuperNode
pulling an instruction from the SuperLink, the region's executor pulling it from its SuperNode,
and the ServerApp pulling a reply. `experiments/federation_cost.py` measured 1.0–3.3 s of the
executor's `pull_task_input` alone per message on loopback (`pull_s` in decisions.jsonl), for a
message whose bytes take milliseconds. Flower has no setting for it, so the module-level names
those three call sites use are rebound to the same functions with a 50 ms initial back-off
capped at 0.5 s. Each extra try is one small request, so the byte cost is negligible.

Non-public flwr 1.39 internals (flwr is pinned `<1.40`): a call site that is not found is left
alone and named in the returned list, so a changed layout degrades to Flower's own timing.
Applied by the SuperNode launcher, the region executor and the ServerApp (`fedfsd.flower.patches`
lists where, and tests/test_flower_patches.py checks each is in effect).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

INITIAL_BACKOFF_S = 0.05
BACKOFF_CAP_S = 0.5

# The module of each call site: the SuperNode, the region executor, the ServerApp's grid.
SUPERNODE_SITE = "flwr.supernode.start_client_internal"
EXECUTOR_SITE = "flwr.supernode.runtime.run_clientapp"
SERVERAPP_SITE = "flwr.superlink.grid.http_grid"
# (module, attribute) of each call site's imported pull function.
CALL_SITES = (
    (SUPERNODE_SITE, "pull_objects"),
    (EXECUTOR_SITE, "pull_and_inflate_object_from_tree"),
    (SERVERAPP_SITE, "pull_objects"),
)


def fast_object_pulls(
    modules: tuple[str, ...] | None = None,
    initial_backoff: float = INITIAL_BACKOFF_S,
    backoff_cap: float = BACKOFF_CAP_S,
) -> list[str]:
    """Rebind the pull function of each call site in `modules` (default all); return skipped."""
    skipped = []
    for module_name, attr in CALL_SITES:
        if modules is not None and module_name not in modules:
            continue
        try:
            module = importlib.import_module(module_name)
            fn: Any = getattr(module, attr)
        except (ImportError, AttributeError):
            skipped.append(f"{module_name}.{attr}")
            continue
        base = getattr(fn, "func", fn)  # idempotent: never wrap a wrapper
        setattr(
            module,
            attr,
            functools.partial(base, initial_backoff=initial_backoff, backoff_cap=backoff_cap),
        )
    return skipped


def pull_is_fast(module_name: str, attr: str) -> bool:
    """Whether the call site `module_name.attr` currently uses our back-off (no import side
    effect beyond importing the module)."""
    fn = getattr(importlib.import_module(module_name), attr, None)
    return isinstance(fn, functools.partial) and fn.keywords.get("initial_backoff") is not None
