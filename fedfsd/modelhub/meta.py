"""Load a model file with what it is: weights, architecture, feature schema and provenance.

Model files are `MODEL.npz` (state-dict names → float32) plus an optional `MODEL.json` sidecar
(`fedfsd model pretrain`, and `global_model.json` from the aggregator). Old files have no sidecar,
or one without `architecture`: the architecture is then inferred from the state-dict's layer
names and shapes (both registry models are unambiguous), and the feature schema is assumed to be
the current one when the feature count matches, and said so. A sidecar whose digest does not
match the weights, or a newer format, is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfsd.errors import InputError, IntegrityError
from fedfsd.modelhub import schema as fs
from fedfsd.modelhub.files import load_weights, sidecar_path, weights_sha256

MODEL_FORMAT_VERSION = 1


class ModelFileError(InputError, ValueError):
    """A model file that cannot be used (unreadable, unknown layout, newer format)."""


class ModelDigestError(IntegrityError, ValueError):
    """The sidecar's weights_sha256 is not the digest of the weights beside it."""


@dataclass
class LoadedModel:
    """A model file as the hand-off commands use it."""

    path: Path
    weights: dict[str, np.ndarray]
    architecture: dict[str, Any]
    feature_schema: dict[str, Any] | None  # None: the model does not read object-list features
    schema_source: str  # "model file" | "assumed: ..." | "none"
    sidecar: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""

    @property
    def name(self) -> str:
        return str(self.architecture["name"])

    def describe_schema(self) -> str:
        if self.name == "bev_cnn":
            return f"BEV rasters ({self.architecture['in_channels']} channels)"
        return fs.describe(self.feature_schema, self.architecture["n_features"])


def _layers(weights: dict[str, np.ndarray], prefix: str) -> list[int]:
    out = set()
    for k in weights:
        parts = k[len(prefix) :].split(".") if k.startswith(prefix) else []
        if len(parts) == 2 and parts[0].isdigit() and parts[1] in ("weight", "bias"):
            out.add(int(parts[0]))
    return sorted(out)


def infer_architecture(weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """Registry architecture (`fedfsd.models.build_model` arguments) from state-dict names."""
    mlp = _layers(weights, "net.")
    if mlp and all(weights[f"net.{i}.weight"].ndim == 2 for i in mlp):
        first, last = weights[f"net.{mlp[0]}.weight"], weights[f"net.{mlp[-1]}.weight"]
        return {
            "name": "mlp",
            "n_features": int(first.shape[1]),
            "n_labels": int(last.shape[0]),
            "hidden": int(first.shape[0]),
            "depth": len(mlp) - 1,
        }
    cnn = _layers(weights, "")
    convs = [i for i in cnn if weights[f"{i}.weight"].ndim == 4]
    if convs:
        first = weights[f"{convs[0]}.weight"]
        return {
            "name": "bev_cnn",
            "n_features": 0,
            "n_labels": int(weights[f"{cnn[-1]}.weight"].shape[0]),
            "in_channels": int(first.shape[1]),
            "width": int(first.shape[0]),
        }
    raise ModelFileError("not a fedfsd model: the weights are neither the MLP nor the BEV CNN")


def build_kwargs(arch: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `build_model` beyond (name, n_features, n_labels)."""
    keys = ("hidden", "depth") if arch["name"] == "mlp" else ("in_channels", "width")
    return {k: arch[k] for k in keys if k in arch}


def load_model(path: str | Path) -> LoadedModel:
    """Read MODEL.npz and its sidecar; check the digest; resolve architecture and schema."""
    path = Path(path)
    try:
        weights = load_weights(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: not a model .npz ({e})") from None
    if not weights:
        raise ModelFileError(f"{path}: holds no weights")
    digest = weights_sha256(weights)
    side: dict[str, Any] = {}
    sp = sidecar_path(path)
    if sp.exists():
        try:
            side = json.loads(sp.read_text())
        except (OSError, ValueError) as e:
            raise ModelFileError(f"{sp}: unreadable sidecar ({e})") from None
        if not isinstance(side, dict):
            raise ModelFileError(f"{sp}: sidecar is not a JSON object")
    version = side.get("format_version", 1)
    if not isinstance(version, int) or version > MODEL_FORMAT_VERSION:
        raise ModelFileError(
            f"{sp}: model format version {version!r} is newer than this fedfsd reads "
            f"({MODEL_FORMAT_VERSION}); upgrade fedfsd"
        )
    if side.get("weights_sha256") and side["weights_sha256"] != digest:
        raise ModelDigestError(
            f"{path}: weights sha256 {digest[:12]}… is not the {side['weights_sha256'][:12]}… "
            f"that {sp.name} states (file replaced or damaged)"
        )
    try:
        arch = infer_architecture(weights)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None
    declared = side.get("architecture") or {}
    name = declared.get("name") or side.get("model")
    if name and name != arch["name"]:
        raise ModelFileError(f"{path}: sidecar says {name!r} but the weights are {arch['name']!r}")
    for k, v in declared.items():  # the sidecar may add what layers do not show (seed)
        arch.setdefault(k, v)
    schema, source = _resolve_schema(arch, side.get("feature_schema"))
    return LoadedModel(path, weights, arch, schema, source, side, digest)


def _resolve_schema(
    arch: dict[str, Any], declared: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, str]:
    """The feature schema the model reads: its file's, or the current one for old files."""
    if arch["name"] != "mlp":
        return None, "none"
    if declared and declared.get("features"):
        if len(declared["features"]) != arch["n_features"]:
            raise ModelFileError(
                f"feature schema lists {len(declared['features'])} features but the model "
                f"reads {arch['n_features']}"
            )
        return declared, "model file"
    current = fs.feature_schema()
    if arch["n_features"] == len(current["features"]):
        return current, f"assumed: the current {fs.describe(current)} (file states no schema)"
    return None, "none"
