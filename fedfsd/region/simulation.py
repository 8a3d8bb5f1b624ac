"""Simulation mode: virtual regions for Flower's simulation engine (not the production path).

Why a module of its own: a production SuperNode always names its region's files in the node
config (`region`, `data-dir`, `policy`, `ledger`; `fedfsd.region.client_app.resolve_setup`).
Only `flwr run .` on the local simulation engine, or `run_simulation` in tests and experiments,
sends a node config with `partition-id` alone. Partition i then becomes a virtual region,
configured by the *run config* of that local experiment (keys below, declared with these defaults
in the root pyproject.toml's `[tool.flwr.app.config]`):

- `sim-data-root` set: its sub-directories, sorted by name, are regions; partition i uses the
  i-th (modulo their number): `<dir>/data` (a dataset from `fedfsd data generate`),
  `<dir>/policy.toml` and the ledger `<dir>/ledger.jsonl`.
- otherwise a synthetic fleet (`fedfsd.data.testing.make_synthetic_frames`) named `sim<i>` with
  `sim-vehicles` × `sim-frames` frames (test split: a second fleet from another seed), a policy
  built from the `sim-*` keys (`sim-allowed-metrics` is comma-separated), and a ledger at
  `sim-ledger-path` when set, else in `sim-ledger-dir` (default: the temp dir, one
  sub-directory per fedfsd run id).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedfsd.region.client_app import RegionSetup

# Every simulation run-config key and its default ("" = not set).
SIM_DEFAULTS: dict[str, Any] = {
    "sim-data-root": "",  # "" = synthetic fleets sim0, sim1, ...
    "sim-ledger-dir": "",  # "" = <tmp>/fedfsd-sim-ledgers/<run id>/
    "sim-ledger-path": "",  # one ledger file for the synthetic region ("" = per sim-ledger-dir)
    "sim-vehicles": 64,
    "sim-frames": 20,
    "sim-epsilon-budget": 10.0,
    "sim-min-noise-multiplier": 0.5,
    "sim-max-clip-norm": 1.0,
    "sim-update-norm-bound": 5.0,
    "sim-weighting": "equal",
    "sim-allowed-metrics": "",  # nothing but the update leaves unless a policy allows it
}


def simulated_setup(partition_id: int, run_config: Mapping[str, Any]) -> RegionSetup:
    """The virtual region partition `partition_id` plays, from the run config's `sim-*` keys."""
    from fedfsd.region.client_app import RegionSetup, SetupError

    sim = {**SIM_DEFAULTS, **{k: v for k, v in run_config.items() if str(k).startswith("sim-")}}
    root = sim.get("sim-data-root")
    if root:
        dirs = sorted(d for d in Path(str(root)).iterdir() if d.is_dir())
        if not dirs:
            raise SetupError(f"sim-data-root {root} has no region directories")
        d = dirs[partition_id % len(dirs)]
        return RegionSetup(
            data_dir=d / "data",
            policy_path=d / "policy.toml",
            ledger_path=d / "ledger.jsonl",
            region=d.name,
        )
    return RegionSetup(
        data_dir=None,
        policy_path=None,
        ledger_path=Path(str(sim["sim-ledger-path"])) if sim.get("sim-ledger-path") else None,
        region=f"sim{partition_id}",
        synthetic_seed=partition_id,
        sim=tuple(sorted(sim.items())),
    )


def synthetic_ledger(setup: RegionSetup, run_id: str) -> Path:
    """Where a synthetic region's ledger lives when no `sim-ledger-path` names one."""
    base = dict(setup.sim).get("sim-ledger-dir") or Path(tempfile.gettempdir()) / (
        "fedfsd-sim-ledgers"
    )
    return Path(str(base)) / run_id / f"{setup.region}.jsonl"


def synthetic_frames(setup: RegionSetup, split: str) -> Any:
    """The synthetic fleet standing in for a region's data (test split: another seed)."""
    from fedfsd.data.testing import make_synthetic_frames

    sim = dict(setup.sim)
    seed = int(setup.synthetic_seed or 0) + (10_000 if split == "test" else 0)
    return make_synthetic_frames(
        int(sim["sim-vehicles"]), int(sim["sim-frames"]), seed, region=str(setup.region)
    )


def synthetic_policy(setup: RegionSetup, n_vehicles: int) -> Any:
    """The policy a synthetic region plays by, from the `sim-*` keys."""
    from fedfsd.config import RegionPolicy

    sim = dict(setup.sim)
    allowed = [m.strip() for m in str(sim["sim-allowed-metrics"]).split(",") if m.strip()]
    return RegionPolicy(
        region=str(setup.region),
        epsilon_budget=float(sim["sim-epsilon-budget"]),
        delta=min(1e-5, 0.1 / max(n_vehicles, 1)),
        min_noise_multiplier=float(sim["sim-min-noise-multiplier"]),
        max_clip_norm=float(sim["sim-max-clip-norm"]),
        update_norm_bound=float(sim["sim-update-norm-bound"]),
        allowed_metrics=allowed,
        weighting=str(sim["sim-weighting"]),
    )
