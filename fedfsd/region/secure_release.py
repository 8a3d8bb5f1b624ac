"""The region's side of a secure-aggregation round (distributed trust): one call per stage.

Why here and not in the ClientApp: the stages need the region's data, policy, ledger and keys,
while the ClientApp only dispatches messages. Each stage restores the region's `RegionSession`
from a 0600 file next to its ledger (a ClientApp may run each message in a fresh process),
advances it, and saves it again; the file is deleted after the unmask stage. Nothing of it is
ever sent.

The release (stage "routed") follows the order of the local round (fedfsd.privacy.local_round):
refuse before anything is computed when the budget would be exceeded, then compute
x = Σ clip_C(∇ℓ_v) over a Poisson sample (rate q = vehicles per step / accounted fleet) at the
received global model, project it onto the L2 ball of radius cap·C (1-Lipschitz: one vehicle
still moves it by at most C, so the DP analysis holds, and the ring cannot wrap), quantise
z = round(s·x) and add the Skellam share, append and fsync the ledger line (both ε), and only
then mask z into the reply. docs/privacy.md, "Secure aggregation" and "Distributed noise".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedfsd.config import RegionPolicy
from fedfsd.errors import PrivacyRefusal
from fedfsd.secagg import RegionSession, RoundParams, SecAggRefused
from fedfsd.secagg.round_spec import STAGES, SecureRoundSpec, flatten

NORMALISATION = (
    "sum of clipped vehicle gradients (L2-projected to cap·C) + Skellam share, secure sum"
)

# A test hook: called with (region, integer vector) just before the vector is masked, inside
# the region (tests check the aggregator's sum against what the regions fed in).
RoutedHook = Callable[[str, np.ndarray], None]


class SecureRoundRefused(PrivacyRefusal, RuntimeError):
    """The region will not take part in this secure round; the message is border-safe."""

    border_reason = "secure round refused"

    def border_safe(self) -> str:
        """The reasons name only public round parameters and the policy's own thresholds."""
        return str(self)


@dataclass
class RegionContext:
    """Everything a stage needs from the region (its own files and data, never the message's)."""

    policy: RegionPolicy
    ledger_path: Path
    signing_key: Ed25519PrivateKey
    peer_keys: Mapping[str, Ed25519PublicKey]
    frames: Any  # the region's training VehicleFrames
    fleet_vehicles: int  # every vehicle id over all splits (the ledger's population)
    run_id: str
    round_idx: int
    seed: int | None = None  # tests only; production draws from the OS


def state_path(ledger_path: Path, run_id: str, round_idx: int) -> Path:
    """Where the round's secrets wait between messages: next to the ledger, mode 0600."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in run_id)
    return ledger_path.parent / f".{ledger_path.name}.secagg-{safe}-r{int(round_idx)}.state"


def sample_rate(ctx: RegionContext, spec: SecureRoundSpec) -> tuple[float, int]:
    """(q, accounted fleet): the same rate DP-SGD would use."""
    accounted = ctx.policy.accounted_vehicles(ctx.frames.n_vehicles)
    return min(1.0, spec.vehicles_per_step / accounted), accounted


def check_setup(ctx: RegionContext, spec: SecureRoundSpec, dim: int, params: RoundParams) -> None:
    """Refuse a round the policy does not allow or whose parameters differ from the region's own.

    The region recomputes everything it can: its run and round, the model's length, the ring
    width from the spec, the scale it would choose, and its policy's limits.
    """
    from fedfsd.privacy.skellam import choose_scale

    pol = ctx.policy
    why: list[str] = []
    if pol.trust_model != "distributed" or pol.min_honest_regions is None:
        why.append("the region's policy is not trust_model = 'distributed'")
    elif params.threshold < pol.min_honest_regions:
        why.append(
            f"threshold {params.threshold} below the policy's min_honest_regions "
            f"{pol.min_honest_regions}"
        )
    if params.run_id != ctx.run_id or params.round != ctx.round_idx:
        why.append("run id or round differ from the message's")
    if params.dim != dim:
        why.append(f"dim {params.dim} but the model has {dim} parameters")
    if params.bit_width != spec.quantizer(len(params.participants)).bit_width:
        why.append("the ring width differs from the one the spec gives")
    if not math.isclose(spec.scale, choose_scale(spec.clip_norm, dim), rel_tol=1e-9):
        why.append("the quantisation scale differs from the region's")
    if spec.clip_norm > pol.max_clip_norm or spec.noise_multiplier < pol.min_noise_multiplier:
        why.append("clip norm or noise multiplier outside the policy")
    if spec.vehicles_per_step > pol.max_vehicles_per_step:
        why.append("vehicles per step above the policy's cap")
    elif spec.vehicles_per_step > pol.accounted_vehicles(ctx.frames.n_vehicles):
        why.append("vehicles per step above the fleet size")
    if spec.frames_per_vehicle > pol.max_frames_per_vehicle:
        why.append("frames per vehicle above the policy's cap")
    if why:
        raise SecureRoundRefused("secure round refused: " + "; ".join(why))


def clipped_sum(
    ctx: RegionContext,
    spec: SecureRoundSpec,
    weights: Mapping[str, np.ndarray],
    q: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """(Σ_v clip_C(∇ℓ_v) over a Poisson sample, flattened like `weights`; sampled count)."""
    import torch

    from fedfsd.models import build_model, set_weights
    from fedfsd.privacy.objective import label_scales, model_kwargs, per_vehicle_loss
    from fedfsd.privacy.pervehicle import ghost_clipped_sum, supports_ghost, vmap_clipped_sum

    frames = ctx.frames
    model = build_model(
        spec.model,
        frames.features.shape[1],
        frames.labels.shape[1],
        **model_kwargs(frames, spec.model),
    )
    set_weights(model, {k: np.asarray(v, np.float32) for k, v in weights.items()})
    idx = np.flatnonzero(rng.random(frames.n_vehicles) < q)
    modality = "bev" if spec.model == "bev_cnn" else "objects"
    x, y, mask = (
        torch.as_tensor(np.asarray(a))
        for a in frames.sample(idx, spec.frames_per_vehicle, rng, modality=modality)
    )
    scales = label_scales("cpu")

    def loss(out: torch.Tensor, yy: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return per_vehicle_loss(out, yy, m, scales)

    names = dict(model.named_parameters())
    if supports_ghost(model):
        model.zero_grad(set_to_none=True)
        ghost_clipped_sum(model, x, y, mask, spec.clip_norm, loss)
        grads = {n: p.grad for n, p in names.items() if p.grad is not None}
    else:
        grads, _, _ = vmap_clipped_sum(model, x, y, mask, spec.clip_norm, loss)
    full = {
        k: (
            grads[k].detach().cpu().numpy().astype(np.float64)
            if k in grads
            else np.zeros(np.shape(weights[k]))
        )
        for k in weights
    }
    return flatten(full), int(idx.size)


def project(x: np.ndarray, radius: float) -> np.ndarray:
    """x scaled onto the L2 ball of `radius` (non-expansive, so sensitivities do not grow)."""
    n = float(np.linalg.norm(x))
    return x if n <= radius else x * (radius / n)


def release(
    ctx: RegionContext, spec: SecureRoundSpec, weights: Mapping[str, np.ndarray], n_regions: int
) -> np.ndarray:
    """The region's integer vector for this round, its spend fsync'd on the ledger first."""
    from fedfsd import __version__
    from fedfsd.privacy.distributed_release import plan_from_ledger, record_fields
    from fedfsd.privacy.ledger import SCHEMA, Ledger, update_digest
    from fedfsd.privacy.local_round import open_ledger
    from fedfsd.privacy.skellam import sample_skellam

    q, accounted = sample_rate(ctx, spec)
    w32 = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    dim = int(sum(v.size for v in w32.values()))
    quant = spec.quantizer(n_regions)
    ledger = Ledger(ctx.ledger_path)
    with ledger.locked():
        fleet_id = ctx.frames.fleet_id or f"{ctx.frames.region}-unnamed"
        open_ledger(ledger, ctx.frames, fleet_id, ctx.fleet_vehicles, ctx.policy, True)
        if ledger.find_release(ctx.run_id, ctx.round_idx) is not None:
            # A fresh noisy vector for a round already released would be a second, uncounted
            # release of the same round: refuse (the region drops out of this round).
            raise SecureRoundRefused("secure round refused: this round was already released")
        plan = plan_from_ledger(
            ledger,
            ctx.policy,
            noise_multiplier=spec.noise_multiplier,
            clip_norm=spec.clip_norm,
            sample_rate=q,
            dimension=dim,
            scale=spec.scale,
        )  # raises DistributedBudgetExceeded before anything is computed
        rng = np.random.default_rng(ctx.seed)
        x, _ = clipped_sum(ctx, spec, w32, q, rng)
        x = project(x, spec.linf_bound)
        z = quant.encode(x, rng) + sample_skellam(plan.share_variance, dim, rng)
        record = {
            "kind": "release",
            "schema": SCHEMA,
            "region": ctx.policy.region,
            "fleet_id": fleet_id,
            "run_id": ctx.run_id,
            "round": int(ctx.round_idx),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": spec.model,
            "lr": 0.0,  # no local step: the aggregator steps the model with the noisy sum
            "vehicles": accounted,
            "public_fleet_size": ctx.policy.public_fleet_size is not None,
            "expected_vehicles_per_step": spec.vehicles_per_step,
            "frames_per_vehicle": spec.frames_per_vehicle,
            "normalisation": NORMALISATION,
            "update_norm": float(np.linalg.norm(z)) / spec.scale,
            "update_sha256": update_digest({"secagg_integer_vector": z}),
            "received_sha256": update_digest(w32),
            "private": True,
            "code_version": __version__,
            "rng": "numpy Generator seeded from the OS"
            if ctx.seed is None
            else f"numpy Generator seeded with {ctx.seed} (reproducible; NOT for production)",
            "method": "per-vehicle clipped gradient sum (secure aggregation)",
            **record_fields(plan, ctx.policy),
        }
        ledger.append(record)  # fsync'd: the spend is durable before anything leaves
        ledger.mark_released(ctx.run_id, ctx.round_idx)
    return z


def handle_stage(
    ctx: RegionContext,
    stage: str,
    payload: bytes,
    spec: SecureRoundSpec,
    weights: Mapping[str, np.ndarray] | None = None,
    on_routed: RoutedHook | None = None,
) -> bytes:
    """Advance the region's session by one stage; the reply bytes (SecAggRefused / refusals)."""
    from fedfsd.privacy.signing import write_private_file

    if stage not in STAGES:
        raise SecAggRefused(f"secure round: unknown stage {stage!r}")
    path = state_path(ctx.ledger_path, ctx.run_id, ctx.round_idx)
    dim = None if weights is None else int(sum(np.asarray(v).size for v in weights.values()))

    def accept(params: RoundParams) -> None:
        # The setup carries no model (one model copy per round on the downlink): its length is
        # checked again against the model the routed stage brings.
        check_setup(ctx, spec, params.dim if dim is None else dim, params)

    if stage == "setup":
        session = RegionSession(ctx.policy.region, ctx.signing_key, ctx.peer_keys, accept=accept)
        reply = session.on_setup(payload)
    else:
        try:
            blob = path.read_bytes()
        except OSError:
            raise SecAggRefused(f"secure round: no saved state for stage {stage!r}") from None
        session = RegionSession.restore(blob, ctx.signing_key, ctx.peer_keys, accept=accept)
        if stage == "keys":
            reply = session.on_keys(payload)
        elif stage == "routed":
            if weights is None or session.params is None:
                raise SecAggRefused("secure round: the routed stage carried no model")
            check_setup(ctx, spec, int(dim or 0), session.params)  # the spec may not change
            z = release(ctx, spec, weights, len(session.params.participants))
            if on_routed is not None:
                on_routed(ctx.policy.region, z.copy())
            reply = session.on_routed(payload, z)
        else:
            reply = session.on_unmask(payload)
            path.unlink(missing_ok=True)
            return reply
    write_private_file(path, session.export_state())
    return reply


def handle_message(message: Any, context: Any, deps: Any, run_config: Mapping[str, Any]) -> Any:
    """The ClientApp's handler for a secure-round stage message; never raises into Flower.

    The region's files come from its node config as for training; `peer-keys` names the file
    of the participants' long-term public keys (the same format as the aggregator's
    `region-keys`). Test only: `secagg-record-dir` makes the region save the integer vector
    it masks (inside the region) so a test can check the aggregator's sum, and
    `secagg-test-exit-run` makes it exit when asked to unmask in that fedfsd run.
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedfsd import wire
    from fedfsd.errors import border_reason
    from fedfsd.privacy.signing import ledger_key_path, load_private_key, load_region_keys
    from fedfsd.region.client_app import CACHE, _fleet_vehicles, _run_round, resolve_setup
    from fedfsd.secagg.round_spec import PAYLOAD_KEY, REPLY_KEY, STAGE_KEY

    cfg = message.content.config_records.get(wire.CONFIG, ConfigRecord())
    region = "unknown"
    try:
        setup = resolve_setup(context.node_config, run_config)
        region = setup.region or region
        run_id, rnd = _run_round(cfg)
        frames = CACHE.frames(setup, "train", deps)
        policy = CACHE.policy(setup, deps, frames.n_vehicles)
        region = policy.region
        peers = context.node_config.get("peer-keys")
        if not peers:
            raise SecureRoundRefused("secure round refused: the node config names no peer-keys")
        ledger = setup.ledger_for(run_id)
        ctx = RegionContext(
            policy=policy,
            ledger_path=ledger,
            signing_key=load_private_key(ledger_key_path(ledger)),
            peer_keys=load_region_keys(str(peers)),
            frames=frames,
            fleet_vehicles=_fleet_vehicles(setup, deps),
            run_id=run_id,
            round_idx=rnd,
        )
        stage = str(cfg.get(STAGE_KEY))
        if stage == "unmask" and context.node_config.get("secagg-test-exit-run") == run_id:
            # Test only (the region operator's node config): the region dies after sending its
            # masked input, so the aggregator must recover its self mask from the others.
            import os

            os._exit(17)
        payload = cfg.get(PAYLOAD_KEY)
        if not isinstance(payload, bytes):
            raise SecAggRefused("secure round: no payload")
        weights = (
            wire.arrays_from(message.content, wire.CONFIG)
            if wire.ARRAYS in message.content.array_records
            else None
        )
        record_dir = context.node_config.get("secagg-record-dir")
        hook = _recorder(Path(str(record_dir)), run_id, rnd) if record_dir else None
        spec = SecureRoundSpec.from_config(cfg)
        reply = handle_stage(ctx, stage, payload, spec, weights, hook)
        out = ConfigRecord({"payload": reply, "region": region})
    except Exception as e:
        import logging

        logging.getLogger("flwr.fedfsd.region").warning(
            "region %s refused a secure-round message: %r", region, e
        )
        out = ConfigRecord({"refused_reason": border_reason(e), "region": region})
    return Message(RecordDict({REPLY_KEY: out}), reply_to=message)


def _recorder(d: Path, run_id: str, rnd: int) -> Callable[[str, np.ndarray], None]:
    def save(region: str, z: np.ndarray) -> None:
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"{region}-{run_id}-r{rnd}.npy", z)

    return save
