"""Round-0 weights from a file: a model pretrained elsewhere, e.g. on public simulated data.

The aggregator only loads an .npz of float arrays keyed by `state_dict` names (never a pickle,
never the data side). The file must match the registry model of the run config exactly (names,
shapes), so regions can load it; its sha256 identifies it in the checkpoint, rounds.jsonl, every
train request and each region's ledger. Data the model was pretrained on is public and outside
every region's ε: the reports say so from that digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from fedfsd.errors import InputError


class InitialModelError(InputError, ValueError):
    """An initial-model file that cannot be the run's round-0 model; one line says why."""


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_initial_model(
    path: str | Path, reference: Mapping[str, np.ndarray], model: str = "the model"
) -> tuple[dict[str, np.ndarray], str]:
    """(float32 weights, sha256) of `path`, checked against `reference` (the registry model)."""
    p = Path(path)
    try:
        digest = file_sha256(p)
        with np.load(p, allow_pickle=False) as z:
            weights = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise InitialModelError(f"initial-model {p}: not a readable .npz of arrays ({e})") from None
    missing = sorted(set(reference) - set(weights))
    extra = sorted(set(weights) - set(reference))
    if missing or extra:
        raise InitialModelError(
            f"initial-model {p} does not match {model}: file has {_few(weights)}, "
            f"model has {_few(reference)} (missing {_few(missing)}, unexpected {_few(extra)})"
        )
    for k, ref in reference.items():
        if tuple(weights[k].shape) != tuple(np.shape(ref)):
            raise InitialModelError(
                f"initial-model {p} does not match {model}: {k} has shape "
                f"{tuple(weights[k].shape)} in the file, {tuple(np.shape(ref))} in the model"
            )
        if not np.issubdtype(weights[k].dtype, np.floating) or not np.all(np.isfinite(weights[k])):
            raise InitialModelError(
                f"initial-model {p}: {k} must be finite floats, got {weights[k].dtype}"
            )
    return {k: weights[k].astype(np.float32) for k in reference}, digest


def _few(names: Iterable[str], n: int = 4) -> str:
    items = sorted(names) if not isinstance(names, list) else names
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}]"
