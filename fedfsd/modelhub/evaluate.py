"""`fedfsd model evaluate`: score a model on a dataset on local disk, beside the prior alone.

For the regional operator before deployment: it reads the region's own logs, runs the same code
path as the in-region evaluation (`fedfsd.region.evaluation.evaluate_weights`, exact frame means)
and sends nothing anywhere (no ledger, no network: nothing leaves). Beside the model it scores the
constant-velocity prior alone on the same frames: for the MLP, the model with its residual set
to zero (`fedfsd.models.prior_only_weights`), for other models the prior's own predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedfsd.errors import InputError
from fedfsd.modelhub import schema as fs
from fedfsd.modelhub.meta import LoadedModel, build_kwargs

METRICS = ("ade", "fde", "accel_mae", "loss")
SPLITS = ("test", "train", "all")


class ModelDataMismatch(InputError, ValueError):
    """The model does not read the features (or shapes) this dataset has."""


def load_frames(data: str | Path, split: str) -> Any:
    """Validate and load one split (a damaged dataset raises `DatasetError`, as `validate`)."""
    from fedfsd.data.vehicles import load_vehicle_frames

    if split not in SPLITS:
        raise InputError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    return load_vehicle_frames(data, split=split)


def dataset_schema(frames: Any) -> dict[str, Any] | None:
    """The feature schema this code computes for the dataset's frames (None: other features)."""
    current = fs.feature_schema()
    return current if frames.features.shape[1] == len(current["features"]) else None


def check_compatible(model: LoadedModel, frames: Any, where: str) -> None:
    """Refuse, in one line naming both, a model whose inputs or outputs the dataset cannot feed."""
    arch = model.architecture
    data_schema = dataset_schema(frames)
    data_desc = fs.describe(data_schema, int(frames.features.shape[1]))
    if arch["n_labels"] != frames.labels.shape[1]:
        raise ModelDataMismatch(
            f"model {model.path} predicts {arch['n_labels']} labels but dataset {where} has "
            f"{frames.labels.shape[1]}"
        )
    if model.name == "bev_cnn":
        if frames.bev is None:
            raise ModelDataMismatch(
                f"model {model.path} reads {model.describe_schema()} but dataset {where} has no "
                f"BEV rasters ({data_desc}; generate it --with-bev)"
            )
        if frames.bev.shape[1] != arch["in_channels"]:
            raise ModelDataMismatch(
                f"model {model.path} reads {model.describe_schema()} but dataset {where} has "
                f"BEV rasters with {frames.bev.shape[1]} channels"
            )
        return
    same_count = arch["n_features"] == frames.features.shape[1]
    theirs, ours = model.feature_schema, data_schema
    same_schema = (theirs is None and ours is None) or (
        theirs is not None
        and ours is not None
        and fs.schema_digest(theirs) == fs.schema_digest(ours)
    )
    if not (same_count and same_schema):
        raise ModelDataMismatch(
            f"model {model.path} reads {model.describe_schema()} but dataset {where} has "
            f"{data_desc}"
        )


def _prior_scores(model: LoadedModel, frames: Any) -> dict[str, float]:
    from fedfsd.data.feature_spec import LABEL_SCALES, constant_velocity_labels
    from fedfsd.models import prior_only_weights
    from fedfsd.region.evaluation import evaluate_weights, score_predictions

    if model.name == "mlp":
        return evaluate_weights(frames, prior_only_weights(model.weights), "mlp")
    if frames.features.shape[1] != len(fs.feature_schema()["features"]):
        return dict.fromkeys(METRICS, float("nan"))
    pred = constant_velocity_labels(frames.features)
    return score_predictions(pred, frames.labels, np.asarray(LABEL_SCALES, dtype=np.float64))


def _model_scores(model: LoadedModel, frames: Any) -> dict[str, float]:
    from fedfsd.region.evaluation import evaluate_weights

    extra = build_kwargs(model.architecture)
    defaults = {"mlp": {"hidden": 256, "depth": 2}, "bev_cnn": {"width": 16}}[model.name]
    if any(extra.get(k, v) != v for k, v in defaults.items()):
        raise ModelDataMismatch(
            f"model {model.path}: layer sizes {extra} differ from the registry's {defaults}"
        )
    try:
        return evaluate_weights(frames, model.weights, model.name)
    except ValueError as e:  # set_weights: names or shapes
        raise ModelDataMismatch(f"model {model.path} does not fit dataset frames: {e}") from None


def evaluate_model(
    model: LoadedModel, data: str | Path, split: str = "test", frames: Any = None
) -> dict[str, Any]:
    """{"model": metrics, "constant_velocity": metrics, "frames", "vehicles", "dataset"}."""
    frames = frames if frames is not None else load_frames(data, split)
    check_compatible(model, frames, str(data))
    ours = _model_scores(model, frames)
    prior = _prior_scores(model, frames)
    m = frames.manifest or {}
    return {
        "model": {k: float(ours[k]) for k in METRICS},
        "constant_velocity": {k: float(prior[k]) for k in METRICS},
        "frames": int(frames.n_frames),
        "vehicles": int(np.count_nonzero(frames.frames_per_vehicle())),
        "dataset": {
            "path": str(Path(data).resolve()),
            "region": frames.region,
            "fleet_id": frames.fleet_id,
            "schema_version": m.get("schema_version"),
            "feature_schema": fs.describe(dataset_schema(frames), frames.features.shape[1]),
            "profile": (m.get("profile") or {}).get("name"),
            "split": split,
        },
    }
