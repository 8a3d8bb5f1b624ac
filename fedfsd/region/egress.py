"""The egress guard: the last code a model update passes through before it leaves the region.

Defence in depth (DESIGN.md decision 8): whatever the training code produced, only the update
(new − received weights) leaves, as float32 arrays with at least one dimension, L2-clipped to
the region's own `update_norm_bound`, together with a manifest whose digest covers exactly the
bytes sent. The manifest repeats the release's mechanism parameters and its place in the
hash-chained ledger, and is signed with the region's ledger key (`release_manifest`), so the
aggregator can check it and keep it as a receipt. Anything unexpected raises `EgressError`, which
the ClientApp turns into a refusal with nothing sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedfsd import __version__
from fedfsd.errors import PrivacyRefusal
from fedfsd.privacy.clipping import clip_update
from fedfsd.privacy.release_record import ReleaseRecord
from fedfsd.wire import MANIFEST_SCHEMA, UpdateManifest, array_digest, l2_norm


class EgressError(PrivacyRefusal, ValueError):
    """An update that must not leave the region (wrong names, non-float, 0-d, non-finite)."""

    border_reason = "egress guard refused the update"


@dataclass(frozen=True)
class Release:
    """An update cleared for release."""

    arrays: dict[str, np.ndarray]  # float32, ≥ 1-d, norm ≤ bound
    norm: float  # after the clip
    raw_norm: float  # before the clip (stays in the region; logged locally only)
    clipped: bool
    sha256: str


def compute_update(
    received: Mapping[str, np.ndarray], new_weights: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """new − received as float32, refusing anything but matching ≥1-d float arrays."""
    if set(received) != set(new_weights):
        missing = sorted(set(received) - set(new_weights))
        extra = sorted(set(new_weights) - set(received))
        raise EgressError(f"update names differ from the received model: {missing=} {extra=}")
    update: dict[str, np.ndarray] = {}
    for name in sorted(received):
        old, new = np.asarray(received[name]), np.asarray(new_weights[name])
        for what, a in (("received", old), ("new", new)):
            if not np.issubdtype(a.dtype, np.floating):
                raise EgressError(f"{name}: {what} array has non-float dtype {a.dtype}")
            if a.ndim == 0:
                raise EgressError(f"{name}: 0-d arrays are not sent")
        if old.shape != new.shape:
            raise EgressError(f"{name}: shape {new.shape} != received {old.shape}")
        delta = new.astype(np.float32) - old.astype(np.float32)
        if not np.all(np.isfinite(delta)):
            raise EgressError(f"{name}: update is not finite")
        update[name] = np.ascontiguousarray(delta, dtype=np.float32)
    return update


def guard_update(
    received: Mapping[str, np.ndarray], new_weights: Mapping[str, np.ndarray], bound: float
) -> Release:
    """Everything the egress guard does, in order: diff, type checks, clip, digest."""
    if not bound > 0:
        raise EgressError(f"update norm bound must be > 0, got {bound}")
    update = compute_update(received, new_weights)
    clipped, raw = clip_update(update, bound)  # the same clipper the local round used
    return Release(
        arrays=clipped,
        norm=l2_norm(clipped),
        raw_norm=raw,
        clipped=raw > bound,
        sha256=array_digest(clipped),
    )


def make_manifest(
    *,
    region: str,
    run_id: str,
    round_idx: int,
    release: Release | None = None,
    update_norm_bound: float = 0.0,
    epsilon: float = 0.0,
    epsilon_rdp: float = 0.0,
    epsilon_budget: float = 0.0,
    delta: float = 0.0,
    steps: int = 0,
    refused_reason: str = "",
    record: Mapping[str, Any] | None = None,
    proof: Mapping[str, Any] | None = None,
) -> UpdateManifest:
    """The manifest that travels with a release, or with a refusal (`refused_reason` set)."""
    if release is None and not refused_reason:
        raise ValueError("a manifest without a release must say why it was refused")
    return UpdateManifest(
        schema=MANIFEST_SCHEMA,
        region=region,
        run_id=run_id,
        round=max(int(round_idx), 0),
        update_norm=release.norm if release else 0.0,
        update_norm_bound=update_norm_bound,
        sha256=release.sha256 if release else "",
        epsilon=epsilon,
        epsilon_rdp=epsilon_rdp,
        epsilon_budget=epsilon_budget,
        delta=delta,
        steps=steps,
        refused_reason=refused_reason,
        code_version=__version__,
        **_mechanism(record),
        **{k: v for k, v in (proof or {}).items() if k in _PROOF_FIELDS},
    )


_PROOF_FIELDS = ("ledger_id", "ledger_seq", "ledger_head")


def _mechanism(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """σ, q, K, C and the fleet id from a release's ledger line."""
    if not record:
        return {}
    return {
        "noise_multiplier": float(record["noise_multiplier"]),
        "sample_rate": float(record["sample_rate"]),
        "frames_per_vehicle": int(record["frames_per_vehicle"]),
        "clip_norm": float(record["clip_norm"]),
        "fleet_id": str(record["fleet_id"]),
    }


def sign_manifest(manifest: UpdateManifest, key: Any) -> UpdateManifest:
    """Set the region's public key and its Ed25519 signature over the signed fields."""
    from fedfsd.privacy import signing

    manifest.public_key = signing.public_hex(key.public_key())
    manifest.signature = signing.sign(key, signing.manifest_payload(manifest))
    return manifest


def release_manifest(
    ledger_path: str | Path,
    *,
    region: str,
    run_id: str,
    round_idx: int,
    release: Release,
    record: ReleaseRecord,
    update_norm_bound: float,
    epsilon: float,
    epsilon_rdp: float,
    epsilon_budget: float,
    delta: float,
    steps: int,
) -> UpdateManifest:
    """The signed manifest of a release: its ledger line's parameters, head and signature.

    Refuses (EgressError) when the bytes about to leave are not the ones on the ledger line.
    """
    from fedfsd.privacy.ledger import Ledger

    if release.sha256 != record.get("update_sha256"):
        raise EgressError("the update leaving differs from its ledger line (digest mismatch)")
    ledger = Ledger(ledger_path)
    proof = ledger.release_proof(run_id, round_idx)
    manifest = make_manifest(
        region=region,
        run_id=run_id,
        round_idx=round_idx,
        release=release,
        update_norm_bound=update_norm_bound,
        epsilon=epsilon,
        epsilon_rdp=epsilon_rdp,
        epsilon_budget=epsilon_budget,
        delta=delta,
        steps=steps,
        record=record,
        proof=proof,
    )
    return sign_manifest(manifest, ledger.signing_key())


def num_examples(weighting: str, n_vehicles: int) -> int:
    """What the region tells the aggregator about its size: 1, or a power-of-two bucket.

    "bucket" rounds `n_vehicles` down to a power of two (200 → 128). The caller passes the
    accounted count (the policy's public, rounded-down `public_fleet_size` when declared). This
    field alone does not reveal the count, but the manifest's ε, steps and δ fix q and hence the
    accounted count: without a public fleet size, that is the exact number of training vehicles.
    """
    if weighting == "equal" or n_vehicles < 1:
        return 1
    if weighting == "bucket":
        return 1 << (int(n_vehicles).bit_length() - 1)
    raise ValueError(f"unknown weighting {weighting!r}")


class EgressRefused(EgressError):
    """What would leave equals a model that must never leave the region (a personalised one)."""

    border_reason = "egress refused: a personalised model never leaves the region"


def refuse_personalised(
    ledger_path: str | Path,
    received: Mapping[str, np.ndarray],
    new_weights: Mapping[str, np.ndarray],
    release: Release | None = None,
) -> None:
    """Raise `EgressRefused` if the new weights, or what the release reconstructs, are personalised.

    A personalised model (`fedfsd region finetune`) is trained without DP and recorded in the
    region's ledger by digest. Before anything leaves, the guard compares the new weights, the
    received weights plus the (clipped) update, and the unclipped update against those digests.
    Equality is by exact bytes: this stops the personalised file being fed to the release path,
    not a model derived from it (the release path only ever sends `run_local_round`'s output).
    """
    from fedfsd.region.finetune import personalised_records

    records = personalised_records(ledger_path)
    if not records:
        return
    f32 = {k: np.asarray(v, dtype=np.float32) for k, v in new_weights.items()}
    weights = {array_digest(f32)}
    updates = {array_digest(compute_update(received, f32))}
    if release is not None:
        rebuilt = {k: np.asarray(received[k], np.float32) + release.arrays[k] for k in received}
        weights.add(array_digest(rebuilt))
        updates.add(release.sha256)
    for rec in records:
        if rec.get("weights_sha256") == rec.get("base_model_sha256"):
            continue  # fine-tuning kept the received model: nothing private to protect
        if rec.get("weights_sha256") in weights or rec.get("update_sha256") in updates:
            raise EgressRefused(
                f"{rec.get('path', '?')}: this update is the personalised model recorded in "
                f"{ledger_path} at {rec.get('time', '?')} (weights sha256 "
                f"{str(rec.get('weights_sha256'))[:12]}…); it was trained without DP and never "
                "leaves the region"
            )
