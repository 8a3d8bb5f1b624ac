"""Personalisation: fine-tune the received global model on the region's own data, WITHOUT DP.

A region may train on its own fleet logs without differential privacy as long as the result never
leaves the region (DESIGN.md decision 11: the region's non-private model is what it compares the
federation against). `finetune_model` trains from the global model on the TRAIN split and selects
the checkpoint on the VALIDATION split (the received model is candidate 0, so the result is never
worse on validation); test episodes are never read.

Because such a model is not private, the region's ledger records it as a non-release line
(`kind: "personalised"`, `released: false`, its digest), and the egress guard
(`fedfsd.region.egress.refuse_personalised`) refuses to send anything that equals it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfsd.modelhub.files import save_model, weights_sha256
from fedfsd.modelhub.select import train_select

if TYPE_CHECKING:
    from fedfsd.data.frames import VehicleFramesLike

PERSONALISED = "personalised"  # the ledger line kind
DEFAULTS: dict[str, Any] = {
    "max_steps": 2000,
    "eval_every": 100,
    "lr": 0.1,
    "vehicles_per_step": 64,
}
# Early stopping is off by default: from the prior the validation FDE first rises, then falls
# below the start only after ~2,000 steps (measured on a 200-vehicle eu fleet).
PATIENCE: int | None = None


@dataclass
class FinetuneResult:
    """A personalised model and how it was chosen (nothing here is differentially private)."""

    weights: dict[str, np.ndarray]
    base_model_sha256: str  # the received global model
    weights_sha256: str  # the selected checkpoint (== base when nothing beat it)
    update_sha256: str  # digest of (personalised − base), as an update would carry it
    steps: int  # step of the selected checkpoint (0 = the received model)
    steps_run: int
    val_fde_before: float
    val_fde_after: float
    val_before: dict[str, float]
    val_after: dict[str, float]
    curve: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0
    stopped_early: bool = False

    @property
    def improved(self) -> bool:
        return self.steps > 0


def finetune_model(
    frames_train: VehicleFramesLike,
    frames_val: VehicleFramesLike,
    weights: Mapping[str, np.ndarray],
    model_name: str = "mlp",
    *,
    max_steps: int = DEFAULTS["max_steps"],
    eval_every: int = DEFAULTS["eval_every"],
    lr: float = DEFAULTS["lr"],
    vehicles_per_step: int = DEFAULTS["vehicles_per_step"],
    frames_per_vehicle: int = 8,
    patience: int | None = PATIENCE,
    seed: int | None = None,
    device: str = "cpu",
    on_step: Callable[[int, int], None] | None = None,
    on_eval: Callable[[int, dict[str, float], bool], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `weights` on `frames_train` without DP; keep the best checkpoint on val."""
    if frames_train.region != frames_val.region or frames_train.fleet_id != frames_val.fleet_id:
        raise ValueError(
            "train and validation frames come from different regions or fleets "
            f"({frames_train.region}/{frames_train.fleet_id} vs "
            f"{frames_val.region}/{frames_val.fleet_id})"
        )
    base = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    sel = train_select(
        frames_train,
        frames_val,
        base,
        model_name,
        max_steps=max_steps,
        eval_every=eval_every,
        lr=lr,
        vehicles_per_step=vehicles_per_step,
        frames_per_vehicle=frames_per_vehicle,
        patience=patience,
        seed=seed,
        device=device,
        on_step=on_step,
        on_eval=on_eval,
    )
    update = {k: sel.weights[k] - base[k] for k in base}
    return FinetuneResult(
        weights=sel.weights,
        base_model_sha256=weights_sha256(base),
        weights_sha256=weights_sha256(sel.weights),
        update_sha256=weights_sha256(update),
        steps=sel.best_step,
        steps_run=sel.steps_run,
        val_fde_before=sel.val_before["fde"],
        val_fde_after=sel.val_best["fde"],
        val_before=sel.val_before,
        val_after=sel.val_best,
        curve=sel.curve,
        settings={
            "model": model_name,
            "max_steps": max_steps,
            "eval_every": eval_every,
            "lr": lr,
            "vehicles_per_step": vehicles_per_step,
            "frames_per_vehicle": frames_per_vehicle,
            "patience": patience,
            "seed": seed,
            "sampling": "poisson over vehicles (q = vehicles per step / vehicles)",
        },
        train_seconds=sel.train_seconds,
        stopped_early=sel.stopped_early,
    )


def _finite(d: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if math.isfinite(v) else None) for k, v in d.items()}


def describe(
    res: FinetuneResult, frames_train: VehicleFramesLike, frames_val: VehicleFramesLike
) -> dict[str, Any]:
    """The sidecar / ledger description of a personalised model (no vehicle ids, no data)."""
    return {
        "kind": PERSONALISED,
        "released": False,
        "private": False,
        "note": "trained in the region WITHOUT differential privacy; must never leave the region",
        "region": frames_train.region,
        "fleet_id": frames_train.fleet_id,
        "base_model_sha256": res.base_model_sha256,
        "weights_sha256": res.weights_sha256,
        "update_sha256": res.update_sha256,
        "steps": res.steps,
        "steps_run": res.steps_run,
        "stopped_early": res.stopped_early,
        "val_fde_before": _finite({"v": res.val_fde_before})["v"],
        "val_fde_after": _finite({"v": res.val_fde_after})["v"],
        "val_before": _finite(res.val_before),
        "val_after": _finite(res.val_after),
        "curve": [[s, _finite(m).get("fde")] for s, m in res.curve],
        "train_vehicles": frames_train.n_vehicles,
        "train_frames": frames_train.n_frames,
        "val_frames": frames_val.n_frames,
        "splits": {"train": "train", "selection": "val", "test": "never read"},
        "settings": res.settings,
        "train_seconds": round(res.train_seconds, 3),
    }


def write_personal_model(out: str | Path, res: FinetuneResult, description: dict[str, Any]) -> Path:
    """Write PERSONAL.npz and PERSONAL.json atomically; returns the sidecar path."""
    meta = {**description, "time": datetime.now(UTC).isoformat(timespec="seconds")}
    return save_model(out, res.weights, meta)


def record_personalised(
    ledger_path: str | Path, description: dict[str, Any], model_path: str | Path
) -> dict[str, Any]:
    """Append the personalised model to the region's ledger as a non-release line.

    The ledger must already exist and belong to the same region and fleet (it is the ledger the
    region's egress path reads); ε, history and releases ignore this line kind.
    """
    from fedfsd import __version__
    from fedfsd.privacy.ledger import SCHEMA, Ledger, LedgerError

    led = Ledger(ledger_path)
    if not led.exists():
        raise LedgerError(
            f"{ledger_path}: no such ledger; give the region's own ledger (the one its egress "
            "path reads), so that the personalised model is recorded and can never be released"
        )
    head = led.header
    if head["region"] != description["region"] or head["fleet_id"] != description["fleet_id"]:
        raise LedgerError(
            f"{ledger_path}: ledger is for {head['region']}/{head['fleet_id']}, the data is "
            f"{description['region']}/{description['fleet_id']}"
        )
    record = {
        "kind": PERSONALISED,
        "schema": SCHEMA,
        "released": False,
        "private": False,
        "region": description["region"],
        "fleet_id": description["fleet_id"],
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "path": str(Path(model_path).resolve()),
        "weights_sha256": description["weights_sha256"],
        "base_model_sha256": description["base_model_sha256"],
        "update_sha256": description["update_sha256"],
        "model": description["settings"]["model"],
        "steps": description["steps"],
        "val_fde_before": description["val_fde_before"],
        "val_fde_after": description["val_fde_after"],
        "code_version": __version__,
    }
    with led.locked():
        led.append(record)
    return record


def personalised_records(ledger_path: str | Path) -> list[dict[str, Any]]:
    """Every personalised-model line of a ledger ([] when the ledger does not exist)."""
    from fedfsd.privacy.ledger import Ledger

    led = Ledger(ledger_path)
    if not led.exists():
        return []
    return [r for r in led.records() if r.get("kind") == PERSONALISED]
