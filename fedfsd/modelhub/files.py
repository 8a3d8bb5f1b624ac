"""Model files: weights as `.npz` (state_dict names → float32 arrays) plus a JSON sidecar.

The same format as the aggregator's `global_model.npz` and `fedfsd region train-local --init`, so
any of these files can be handed to another command. Both files are written atomically (tmp file,
fsync, rename, fsync of the directory): a crash leaves the old file or the new one, never half.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedfsd.durable import fsync_dir
from fedfsd.wire import array_digest


def weights_sha256(weights: Mapping[str, np.ndarray]) -> str:
    """sha256 of float32 weights in name order (the digest the ledger and manifests use)."""
    return array_digest({k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})


def sidecar_path(model_path: str | Path) -> Path:
    """`MODEL.npz` → `MODEL.json`."""
    return Path(model_path).with_suffix(".json")


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def jsonable(obj: Any) -> Any:
    """Replace non-finite floats (NaN metrics of an empty split) by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    return obj


def save_model(path: str | Path, weights: Mapping[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write `path` (.npz), then its JSON sidecar with `weights_sha256`; returns the sidecar."""
    path = Path(path)
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
    _atomic_write(path, lambda f: np.savez(f, allow_pickle=False, **arrays))
    side = sidecar_path(path)
    doc = {**jsonable(meta), "weights_sha256": weights_sha256(arrays), "file": path.name}
    text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"
    _atomic_write(side, lambda f: f.write(text.encode()))
    return side


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Read an `.npz` of weights (names → float32 arrays); never unpickles."""
    with np.load(Path(path), allow_pickle=False) as z:
        return {k: z[k].astype(np.float32) for k in z.files}
