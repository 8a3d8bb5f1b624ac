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
z = round(s·x) and add the Skellam share, check z against the round's per-region bound (refused,
nothing spent, if over), append and fsync the ledger line (both ε), and only then mask z into
the reply, together with a manifest signed with the ledger key that states the bound check, the
ledger line and both ε, and names the digest of the masked bytes it travels with (the aggregator
checks it before it uses the masked input). docs/privacy.md, "Secure aggregation" and
"Distributed noise".
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

# Tests only: hook(point, **context) at "routed" (region=, run_id=, round=, vector= the integer
# vector about to be masked, a copy) and "unmask" (region=, run_id=, round=, before answering).
# No hook is installed in production; a test installs one in the region's process (in process,
# or through a test ClientApp module that wraps the real one), never through node config.
TestHook = Callable[..., None]
_test_hook: TestHook | None = None


def set_test_hook(hook: TestHook | None) -> None:
    """Install `hook(point, **context)` (None removes it); for tests only."""
    global _test_hook
    _test_hook = hook


def _hook(point: str, **context: Any) -> None:
    if _test_hook is not None:
        _test_hook(point, **context)


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


@dataclass(frozen=True)
class SecureRelease:
    """What the routed stage masks and signs: the integer vector and its ledger line."""

    vector: np.ndarray  # z = round(s·x) + Skellam share (int64)
    record: dict[str, Any]  # the fsync'd ledger line
    proof: dict[str, Any]  # ledger_id, ledger_seq, ledger_head of that line
    norm_bound: float  # the per-region bound z/s was checked against


def release(
    ctx: RegionContext, spec: SecureRoundSpec, weights: Mapping[str, np.ndarray], n_regions: int
) -> SecureRelease:
    """The region's integer vector for this round, checked against its bound, its spend
    fsync'd on the ledger first."""
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
        norm, bound = float(np.linalg.norm(z)) / spec.scale, spec.region_norm_bound(dim)
        if not norm <= bound:  # the bound check moved before masking: refuse, nothing spent
            raise SecureRoundRefused(
                f"secure round refused: the vector's norm {norm:.6g} exceeds the bound {bound:.6g}"
            )
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
            "update_norm": norm,
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
        proof = ledger.release_proof(ctx.run_id, ctx.round_idx)
    return SecureRelease(z, record, proof, bound)


def secure_manifest(ctx: RegionContext, rel: SecureRelease, masked: bytes) -> bytes:
    """The signed manifest that travels with the masked input (serialised UpdateManifest).

    Every number comes from the fsync'd ledger line, so a reviewer can hold the aggregator's
    receipt against it; `masked_sha256` binds it to exactly the masked bytes it accompanies.
    """
    from fedfsd import __version__
    from fedfsd.region.egress import sign_manifest
    from fedfsd.secagg.round_spec import masked_digest
    from fedfsd.wire import MANIFEST_SCHEMA, UpdateManifest

    r = rel.record
    m = UpdateManifest(
        schema=MANIFEST_SCHEMA,
        region=ctx.policy.region,
        run_id=ctx.run_id,
        round=int(ctx.round_idx),
        # The signed claim is "norm ≤ bound", not the norm: ‖z‖ is a statistic of this region's
        # own noisy vector, which the distributed assumption promises the aggregator never sees
        # (it learns the sum only). The exact norm stays on the region's ledger line.
        update_norm=float(rel.norm_bound),
        update_norm_bound=float(rel.norm_bound),
        sha256=str(r["update_sha256"]),
        epsilon=float(r["epsilon_prv"]),
        epsilon_rdp=float(r["epsilon_rdp"]),
        epsilon_budget=float(r["epsilon_budget"]),
        delta=float(r["delta"]),
        steps=int(r["steps"]),
        code_version=__version__,
        noise_multiplier=float(r["noise_multiplier"]),
        sample_rate=float(r["sample_rate"]),
        frames_per_vehicle=int(r["frames_per_vehicle"]),
        clip_norm=float(r["clip_norm"]),
        fleet_id=str(r["fleet_id"]),
        ledger_id=str(rel.proof["ledger_id"]),
        ledger_seq=int(rel.proof["ledger_seq"]),
        ledger_head=str(rel.proof["ledger_head"]),
        trust_model=str(r["trust_model"]),
        epsilon_distributed=float(r["epsilon_distributed"]),
        epsilon_own_noise=float(r["epsilon_own_noise"]),
        masked_sha256=masked_digest(masked),
    )
    return sign_manifest(m, ctx.signing_key).SerializeToString()


def handle_stage(
    ctx: RegionContext,
    stage: str,
    payload: bytes,
    spec: SecureRoundSpec,
    weights: Mapping[str, np.ndarray] | None = None,
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
            rel = release(ctx, spec, weights, len(session.params.participants))
            ids = {"region": ctx.policy.region, "run_id": ctx.run_id, "round": ctx.round_idx}
            _hook("routed", **ids, vector=rel.vector.copy())
            reply = session.on_routed(
                payload, rel.vector, attach=lambda masked: secure_manifest(ctx, rel, masked)
            )
        else:
            _hook("unmask", region=ctx.policy.region, run_id=ctx.run_id, round=ctx.round_idx)
            reply = session.on_unmask(payload)
            path.unlink(missing_ok=True)
            return reply
    write_private_file(path, session.export_state())
    return reply


def handle_message(message: Any, context: Any, deps: Any, run_config: Mapping[str, Any]) -> Any:
    """The ClientApp's handler for a secure-round stage message; never raises into Flower.

    The region's files come from its node config as for training; `peer-keys` names the file
    of the participants' long-term public keys (the same format as the aggregator's
    `region-keys`). Tests observe or interrupt a stage through `set_test_hook`, never through
    node config.
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedfsd import wire
    from fedfsd.errors import border_reason
    from fedfsd.privacy.signing import ledger_key_path, load_private_key, load_region_keys
    from fedfsd.region.client_app import CACHE, fleet_vehicles, resolve_setup, run_round
    from fedfsd.secagg.round_spec import PAYLOAD_KEY, REPLY_KEY, STAGE_KEY

    cfg = message.content.config_records.get(wire.CONFIG, ConfigRecord())
    region = "unknown"
    try:
        setup = resolve_setup(context.node_config, run_config)
        region = setup.region or region
        run_id, rnd = run_round(cfg)
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
            fleet_vehicles=fleet_vehicles(setup, deps),
            run_id=run_id,
            round_idx=rnd,
        )
        stage = str(cfg.get(STAGE_KEY))
        payload = cfg.get(PAYLOAD_KEY)
        if not isinstance(payload, bytes):
            raise SecAggRefused("secure round: no payload")
        weights = (
            wire.arrays_from(message.content, wire.CONFIG)
            if wire.ARRAYS in message.content.array_records
            else None
        )
        spec = SecureRoundSpec.from_config(cfg)
        reply = handle_stage(ctx, stage, payload, spec, weights)
        out = ConfigRecord({"payload": reply, "region": region})
    except Exception as e:
        import logging

        logging.getLogger("flwr.fedfsd.region").warning(
            "region %s refused a secure-round message: %r", region, e
        )
        out = ConfigRecord({"refused_reason": border_reason(e), "region": region})
    return Message(RecordDict({REPLY_KEY: out}), reply_to=message)
