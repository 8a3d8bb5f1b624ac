"""Public pretraining: a starting model for the federation, trained on PUBLIC simulated data.

The aggregator may start round 0 from a model trained non-privately on data that belongs to no
region (a simulated `public` profile): that data is outside every region's ε, and says nothing
about any region's vehicles. Region data must never be pooled here: `fedfsd model pretrain`
refuses a dataset whose manifest region is not `public` unless told otherwise.

Training pools the datasets' train splits (vehicles stay distinct: ids are prefixed by fleet),
runs the same non-private per-vehicle SGD as personalisation, and keeps the checkpoint with the
best FDE@3s on their pooled validation splits. Test episodes are never read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfsd.errors import PrivacyRefusal
from fedfsd.modelhub.files import weights_sha256
from fedfsd.modelhub.select import train_select

if TYPE_CHECKING:
    from fedfsd.data.frames import VehicleFramesLike

PUBLIC_REGION = "public"
DEFAULTS: dict[str, Any] = {"steps": 2000, "lr": 0.1, "vehicles_per_step": 64}


class NonPublicData(PrivacyRefusal, ValueError):
    """A dataset that is not public was offered for pooling."""


def check_public(manifest: Mapping[str, Any], where: str, allow_nonpublic: bool = False) -> None:
    """Refuse region data: only a manifest whose region is `public` may be pooled."""
    region = str(manifest.get("region", ""))
    if region != PUBLIC_REGION and not allow_nonpublic:
        raise NonPublicData(
            f"{where}: dataset region is {region!r}, not {PUBLIC_REGION!r}; region data must "
            "never be pooled outside its region (--allow-nonpublic only for data you may pool)"
        )


def pool_frames(frames_list: Sequence[Any]) -> Any:
    """One `VehicleFrames` holding every vehicle of every dataset (ids prefixed by fleet id)."""
    from fedfsd.data.vehicles import VehicleFrames

    if not frames_list:
        raise ValueError("no datasets to pool")
    if len(frames_list) == 1:
        return frames_list[0]
    if len({f.features.shape[1] for f in frames_list}) != 1:
        raise ValueError("datasets have different feature counts")
    with_bev = all(f.bev is not None for f in frames_list)
    offsets, base = [np.zeros(1, np.int64)], 0
    for f in frames_list:
        offsets.append(f.offsets[1:] + base)
        base += f.n_frames
    eps, ep_base = [], 0
    for f in frames_list:  # keep episodes distinct across datasets
        eps.append(f.episodes + ep_base)
        ep_base += int(f.episodes.max(initial=-1)) + 1
    regions = sorted({f.region for f in frames_list})
    return VehicleFrames(
        region=regions[0] if len(regions) == 1 else "+".join(regions),
        features=np.concatenate([f.features for f in frames_list]),
        labels=np.concatenate([f.labels for f in frames_list]),
        offsets=np.concatenate(offsets),
        vehicle_ids=[f"{f.fleet_id}/{v}" for f in frames_list for v in f.vehicle_ids],
        episodes=np.concatenate(eps),
        bev=np.concatenate([f.bev for f in frames_list]) if with_bev else None,
        fleet_id="+".join(f.fleet_id for f in frames_list),
    )


def prior_start(frames: VehicleFramesLike, model_name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A fresh model whose learned residual is zero: it predicts the constant-velocity prior.

    Zeroing the MLP's last Linear layer makes the output exactly `x @ prior` (a random residual
    would add error that training must first remove); other models start from the registry.
    """
    from fedfsd.models import build_model, get_weights
    from fedfsd.privacy.objective import model_kwargs

    kw = model_kwargs(frames, model_name)
    model = build_model(
        model_name, frames.features.shape[1], frames.labels.shape[1], seed=seed, **kw
    )
    w = get_weights(model)
    if model_name == "mlp":
        last = max(int(k.split(".")[1]) for k in w if k.startswith("net."))
        for k in (f"net.{last}.weight", f"net.{last}.bias"):
            w[k] = np.zeros_like(w[k])
    return w


def pretrain_model(
    train_frames_list: Sequence[VehicleFramesLike],
    val_frames_list: Sequence[VehicleFramesLike],
    model_name: str = "mlp",
    *,
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    vehicles_per_step: int = DEFAULTS["vehicles_per_step"],
    seed: int | None = None,
    init: Mapping[str, np.ndarray] | None = None,
    eval_every: int | None = None,
    frames_per_vehicle: int = 8,
    on_step: Callable[[int, int], None] | None = None,
    on_eval: Callable[[int, dict[str, float], bool], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train on the pooled train splits, select on the pooled val splits; (weights, info)."""
    train = pool_frames(train_frames_list)
    val = pool_frames(val_frames_list)
    start = (
        {k: np.asarray(v, np.float32) for k, v in init.items()}
        if init is not None
        else prior_start(train, model_name)
    )
    every = eval_every or max(1, steps // 20)
    sel = train_select(
        train,
        val,
        start,
        model_name,
        max_steps=steps,
        eval_every=every,
        lr=lr,
        vehicles_per_step=vehicles_per_step,
        frames_per_vehicle=frames_per_vehicle,
        seed=seed,
        on_step=on_step,
        on_eval=on_eval,
    )
    info = {
        "kind": "public-pretrained",
        "data": "public simulated data, outside every region's ε (not region data)",
        "model": model_name,
        "sources": [
            {
                "region": f.region,
                "fleet_id": f.fleet_id,
                "profile": (f.manifest.get("profile") or {}).get("name", f.region),
                "vehicles": f.n_vehicles,
                "train_frames": f.n_frames,
            }
            for f in train_frames_list
        ],
        "val_frames": val.n_frames,
        "start": "given weights" if init is not None else "constant-velocity prior (zero residual)",
        "start_sha256": weights_sha256(start),
        "steps": steps,
        "best_step": sel.best_step,
        "eval_every": every,
        "lr": lr,
        "vehicles_per_step": vehicles_per_step,
        "frames_per_vehicle": frames_per_vehicle,
        "seed": seed,
        "val_fde_start": sel.val_before["fde"],
        "val_fde": sel.val_best["fde"],
        "val": sel.val_best,
        "curve": [[s, m["fde"]] for s, m in sel.curve],
        "train_seconds": round(sel.train_seconds, 3),
        "weights_sha256": weights_sha256(sel.weights),
    }
    return sel.weights, info
