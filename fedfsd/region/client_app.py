"""The region's Flower ClientApp: one DP local round per train message, scoring on evaluate.

Where the region's files are comes from the *node config*, which the region operator sets on
its own SuperNode (`--node-config "region='eu' data-dir='…' policy='…' ledger='…'"`); nothing
the aggregator sends can point the app at other files.

Simulation mode (`flwr run .` on the local simulation engine, or `run_simulation` in tests) has
only `partition-id` in the node config; `fedfsd.region.simulation` turns that partition into a
virtual region from the run config's `sim-*` keys.

What leaves: a train reply holds the egress-guarded update, its manifest and `num-examples` (1
or the power-of-two bucket of the accounted fleet size); an evaluate reply holds only metrics the
policy allows, each a differentially private, ledgered release (`fedfsd.privacy.metrics`), and
only for the global model this region received in the same run and round. A train reply carries
`loss` only as such a release too. Nothing else leaves.

Handlers never raise into Flower: any failure becomes a refusal reply (no arrays) whose reason is
a short category; the details stay in the region's log.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.clientapp import ClientApp

from fedfsd import wire
from fedfsd.errors import InputError, PrivacyRefusal, border_reason
from fedfsd.region import simulation
from fedfsd.region.egress import (
    guard_update,
    make_manifest,
    num_examples,
    refuse_personalised,
    release_manifest,
)

if TYPE_CHECKING:
    from fedfsd.data.frames import VehicleFramesLike

LOG = logging.getLogger("flwr.fedfsd.region")


class BadTrainRequest(InputError, ValueError):
    """The message itself is malformed (run id, round, arrays, request fields)."""

    border_reason = "bad train request"


class SetupError(InputError, RuntimeError):
    """The node is not configured as a region (missing node config keys, missing files)."""

    border_reason = "region not configured"


@dataclass(frozen=True)
class RegionSetup:
    """Where one region's files are (or which synthetic fleet stands in for them)."""

    data_dir: Path | None  # None: synthetic fleet
    policy_path: Path | None  # None: policy from the sim-* run config keys
    ledger_path: Path | None  # None until the run id is known (synthetic default)
    region: str | None = None  # the operator's name for it; must match the policy
    synthetic_seed: int | None = None
    sim: tuple[tuple[str, Any], ...] = ()

    def ledger_for(self, run_id: str) -> Path:
        if self.ledger_path is not None:
            return self.ledger_path
        return simulation.synthetic_ledger(self, run_id)


def resolve_setup(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> RegionSetup:
    """Production node config wins; `partition-id` alone means simulation."""
    if "data-dir" in node_config or "policy" in node_config:
        missing = [k for k in ("data-dir", "policy", "ledger") if not node_config.get(k)]
        if missing:
            raise SetupError(f"node config lacks {', '.join(missing)}")
        return RegionSetup(
            data_dir=Path(str(node_config["data-dir"])),
            policy_path=Path(str(node_config["policy"])),
            ledger_path=Path(str(node_config["ledger"])),
            region=str(node_config["region"]) if node_config.get("region") else None,
        )
    if "partition-id" not in node_config:
        raise SetupError("node config names no region (data-dir, policy, ledger)")
    return simulation.simulated_setup(int(node_config["partition-id"]), run_config)


def training_options(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """`workers` / `device` from `fedfsd region start --workers/--device` (absent: defaults)."""
    opts: dict[str, Any] = {}
    if "workers" in node_config:
        opts["workers"] = int(node_config["workers"])
    if "device" in node_config:
        opts["device"] = str(node_config["device"])
    return opts


@dataclass
class RegionDeps:
    """The region-side components the handlers call (the real ones unless a test swaps one)."""

    load_frames: Callable[[Path, str], Any]
    load_policy: Callable[[Path], Any]
    local_round: Callable[..., Any]


def default_deps() -> RegionDeps:
    """The real data loader, policy loader and DP local round (imported on first use)."""
    from fedfsd.config import load_policy
    from fedfsd.data.vehicles import load_vehicle_frames
    from fedfsd.privacy.local_round import run_local_round

    return RegionDeps(
        load_frames=lambda p, split: load_vehicle_frames(p, split=split),
        load_policy=load_policy,
        local_round=run_local_round,
    )


class _Cache:
    """Loaded datasets and policies, kept for the life of the process (one per path/split).

    Policies are reloaded when the file's content changes (its bytes are read at every message:
    a modification time can stay the same across an edit), so an operator tightening the policy
    takes effect at the next message without restarting the node.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: dict[tuple, Any] = {}
        self._policies: dict[tuple, Any] = {}

    def frames(self, setup: RegionSetup, split: str, deps: RegionDeps) -> VehicleFramesLike:
        key = (str(setup.data_dir), setup.synthetic_seed, setup.sim, split)
        with self._lock:
            if key not in self._frames:
                self._frames[key] = (
                    deps.load_frames(setup.data_dir, split)
                    if setup.data_dir is not None
                    else simulation.synthetic_frames(setup, split)
                )
            return self._frames[key]

    def policy(self, setup: RegionSetup, deps: RegionDeps, n_vehicles: int) -> Any:
        if setup.policy_path is None:
            return simulation.synthetic_policy(setup, n_vehicles)
        try:
            key = (str(setup.policy_path), hashlib.sha256(setup.policy_path.read_bytes()).digest())
        except OSError:
            return deps.load_policy(setup.policy_path)  # raises PolicyError naming the file
        with self._lock:
            if key not in self._policies:
                self._policies[key] = deps.load_policy(setup.policy_path)
            return self._policies[key]

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
            self._policies.clear()


CACHE = _Cache()


def _request(cfg: Mapping[str, Any]) -> Any:
    """The train request the message carries; a bad field is the sender's error, not a bug."""
    from pydantic import ValidationError

    from fedfsd.config import TrainRequest
    from fedfsd.run_config import TRAIN_FIELDS

    keys = {key: name for name, key in TRAIN_FIELDS.items()}
    keys["initial-model-sha256"] = "initial_model_sha256"
    try:
        return TrainRequest(**{v: cfg[k] for k, v in keys.items() if k in cfg})
    except ValidationError as e:
        raise BadTrainRequest(f"train request: {e}") from e


def run_round(cfg: Mapping[str, Any]) -> tuple[str, int]:
    """The run id and round a message names, or BadTrainRequest."""
    run_id, rnd = str(cfg.get("run-id", "")), cfg.get("round", 0)
    if not run_id or isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 1:
        raise BadTrainRequest(f"run-id {run_id!r} / round {rnd!r}")
    return run_id, rnd


def _received(message: Message) -> dict[str, np.ndarray]:
    """The global weights a message carries, or BadTrainRequest."""
    if wire.ARRAYS not in message.content.array_records:
        raise BadTrainRequest(f"no {wire.ARRAYS!r} array record")
    return wire.arrays_from(message.content, wire.CONFIG)  # LayoutError: a refusal


def _preflight(
    ledger: Path, policy: Any, frames: Any, request: Any, run_id: str, rnd: int, rounds: Any
) -> None:
    """Refuse the whole run up front when its plan does not fit (fedfsd.region.preflight)."""
    from fedfsd.privacy.dpsgd import sample_rate
    from fedfsd.region.preflight import check_run

    params = policy.effective(request)
    q = sample_rate(params.vehicles_per_step, policy.accounted_vehicles(frames.n_vehicles))
    check_run(
        ledger,
        run_id=run_id,
        round_idx=rnd,
        total_rounds=rounds,
        sigma=params.noise_multiplier,
        q=q,
        steps=params.steps,
        delta=policy.delta,
        budget=policy.epsilon_budget,
        enforce_on=policy.enforce_on,
    )


def _ledger_epsilon(ledger_path: Path, delta: float) -> float:
    """ε already spent by this fleet (0 when no ledger yet); used in refusals."""
    try:
        from fedfsd.privacy.ledger import Ledger

        if not ledger_path.exists():
            return 0.0
        return float(Ledger(ledger_path).epsilon(delta, accountant="prv"))
    except Exception:  # a refusal must still go out
        return float("nan")


def fleet_vehicles(setup: RegionSetup, deps: RegionDeps) -> int:
    """Every vehicle id in the region's dataset, over all its splits (the unit's population)."""
    ids: set[str] = set()
    for split in ("train", "val", "test"):
        try:
            ids.update(CACHE.frames(setup, split, deps).vehicle_ids)
        except Exception as e:  # no such split, or an empty one: its vehicles are not there
            if split == "train":
                raise
            LOG.debug("split %s not counted: %r", split, e)
    return len(ids)


def _metric_release(
    ledger: Path,
    policy: Any,
    run_id: str,
    rnd: int,
    phase: str,
    frames: VehicleFramesLike,
    weights: Mapping[str, np.ndarray],
    model: str,
    *,
    quiet: bool = True,
) -> dict[str, float]:
    """The DP metric release of `weights` on `frames`; `quiet`: {} when refused (logged)."""
    from fedfsd.privacy.metrics import MetricRefused, release_metrics
    from fedfsd.region.evaluation import per_vehicle_scores

    try:
        rel = release_metrics(
            ledger,
            policy,
            run_id=run_id,
            round_idx=rnd,
            phase=phase,
            model_sha256=wire.array_digest(weights),
            score=lambda: per_vehicle_scores(frames, weights, model),
        )
    except MetricRefused as e:
        if not quiet:
            raise
        LOG.info("region %s: no %s metrics for round %s: %s", policy.region, phase, rnd, e)
        return {}
    return {k: float(v) for k, v in rel.values.items() if math.isfinite(v)}


def _reply(message: Message, records: dict[str, Any]) -> Message:
    return Message(RecordDict(records), reply_to=message)


def _refuse_train(
    message: Message, region: str, run_id: str, rnd: int, reason: str, policy: Any, eps: float
) -> Message:
    manifest = make_manifest(
        region=region,
        run_id=run_id,
        round_idx=rnd,
        refused_reason=reason,
        update_norm_bound=float(getattr(policy, "update_norm_bound", 0.0)),
        epsilon=eps if math.isfinite(eps) else 0.0,
        epsilon_budget=float(getattr(policy, "epsilon_budget", 0.0)),
        delta=float(getattr(policy, "delta", 0.0)),
    )
    return _reply(
        message,
        {
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 0}),
            wire.MANIFEST: ConfigRecord({wire.MANIFEST_KEY: manifest.SerializeToString()}),
        },
    )


def handle_train(
    message: Message, context: Context, deps: RegionDeps, run_config: Mapping[str, Any]
) -> Message:
    """One DP local round, then the egress guard; a refusal on any failure (never raises)."""
    cfg = message.content.config_records.get(wire.CONFIG, ConfigRecord())
    run_id, raw_round = str(cfg.get("run-id", "")), cfg.get("round", 0)
    ok_round = isinstance(raw_round, int) and not isinstance(raw_round, bool) and raw_round >= 1
    rnd = raw_round if ok_round and isinstance(raw_round, int) else 0
    region, policy, ledger = "unknown", None, None
    try:
        setup = resolve_setup(context.node_config, run_config)
        region = setup.region or region
        try:
            run_id, rnd = run_round(cfg)
        except BadTrainRequest:
            rnd = 0
            raise
        frames = CACHE.frames(setup, "train", deps)
        policy = CACHE.policy(setup, deps, frames.n_vehicles)
        region = policy.region
        if setup.region and setup.region != policy.region and setup.data_dir is not None:
            from fedfsd.config import PolicyError

            raise PolicyError(f"node config region {setup.region!r} != policy {policy.region!r}")
        ledger = setup.ledger_for(run_id)
        ledger.parent.mkdir(parents=True, exist_ok=True)
        received = _received(message)
        request = _request(cfg)
        _preflight(ledger, policy, frames, request, run_id, rnd, cfg.get(wire.ROUNDS_KEY))
        res = deps.local_round(
            frames,
            policy,
            ledger,
            received,
            request,
            run_id,
            rnd,
            request.model,
            fleet_vehicles=fleet_vehicles(setup, deps),
            **training_options(context.node_config),
        )
        release = guard_update(received, res.new_weights, policy.update_norm_bound)
        refuse_personalised(ledger, received, res.new_weights, release)
        manifest = release_manifest(
            ledger,
            region=policy.region,
            run_id=run_id,
            round_idx=rnd,
            release=release,
            record=res.record,
            update_norm_bound=policy.update_norm_bound,
            epsilon=res.epsilon,
            epsilon_rdp=res.epsilon_rdp,
            epsilon_budget=res.budget,
            delta=policy.delta,
            steps=res.steps,
        )
        # one packed array + its layout next to the manifest, whose sha256 covers both
        arrays = wire.packed_records(
            release.arrays, wire.MANIFEST, {wire.MANIFEST_KEY: manifest.SerializeToString()}
        )
        dp_metrics: dict[str, float] = {}
        if "loss" in policy.allowed_metrics:
            try:
                dp_metrics = _metric_release(
                    ledger, policy, run_id, rnd, "train", frames, res.new_weights, request.model
                )
            except Exception as e:  # the update still goes; only the loss is withheld
                LOG.warning("region %s: train loss withheld in round %s: %r", region, rnd, e)
    except Exception as e:
        LOG.warning("region %s refused round %s of run %s: %r", region, rnd, run_id, e)
        from fedfsd.privacy.local_round import BudgetExceeded
        from fedfsd.region.preflight import RunUnaffordable

        if isinstance(e, (BudgetExceeded, RunUnaffordable)):
            eps = float(getattr(e, "spent", 0.0))
        else:
            eps = _ledger_epsilon(ledger, policy.delta) if ledger and policy else 0.0
        return _refuse_train(message, region, run_id, rnd, border_reason(e), policy, eps)
    if release.clipped:
        LOG.info("egress clipped the update of round %d from %.4g", rnd, release.raw_norm)
    metrics: dict[str, MetricRecordValues] = {
        wire.NUM_EXAMPLES: num_examples(policy.weighting, res.n_vehicles),
        **dp_metrics,
    }
    return _reply(message, {**arrays, wire.METRICS: MetricRecord(metrics)})


def handle_evaluate(
    message: Message, context: Context, deps: RegionDeps, run_config: Mapping[str, Any]
) -> Message:
    """Score the global model of this run and round on the held-out episodes, as a DP release.

    Refused (no metric, a border-safe reason) when the policy allows no metric, when the weights
    are not the global model this region received in the train message of the same run and
    round, when that round's metrics were already released for other weights, or when the
    release would overspend the budget. A repeated request gets the recorded values again.
    """
    from fedfsd.privacy.ledger import Ledger
    from fedfsd.privacy.metrics import check_evaluable, metrics_for

    cfg = message.content.config_records.get(wire.CONFIG, ConfigRecord())
    run_id, rnd = str(cfg.get("run-id", "")), cfg.get("round", 0)
    region = "unknown"
    try:
        setup = resolve_setup(context.node_config, run_config)
        region = setup.region or region
        run_id, rnd = run_round(cfg)
        train = CACHE.frames(setup, "train", deps)
        policy = CACHE.policy(setup, deps, train.n_vehicles)
        region = policy.region
        if not metrics_for(policy, "evaluate"):
            raise _Refused("no metric allowed by the region's policy")
        weights = _received(message)  # float32 by the packed layout
        ledger = setup.ledger_for(run_id)
        check_evaluable(Ledger(ledger), run_id, rnd, wire.array_digest(weights))
        test = CACHE.frames(setup, "test", deps)
        metrics: dict[str, MetricRecordValues] = dict(
            _metric_release(
                ledger,
                policy,
                run_id,
                rnd,
                "evaluate",
                test,
                weights,
                str(cfg.get("model", "mlp")),
                quiet=False,
            )
        )
        if not metrics:
            raise _Refused("metric release refused")
    except Exception as e:
        LOG.warning("region %s refused evaluation: %r", region, e)
        return _reply(
            message,
            {
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 0}),
                wire.REGION: ConfigRecord({"name": region, "refused_reason": border_reason(e)}),
            },
        )
    metrics[wire.NUM_EXAMPLES] = 1
    return _reply(
        message,
        {wire.METRICS: MetricRecord(metrics), wire.REGION: ConfigRecord({"name": region})},
    )


def handle_query(message: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    """Answer the aggregator's liveness ping with the region's name; nothing is spent."""
    try:
        name = resolve_setup(context.node_config, run_config).region or "unknown"
    except Exception:  # an unconfigured node is still alive; it says no name
        name = "unknown"
    return _reply(message, {wire.REGION: ConfigRecord({"name": name})})


class _Refused(PrivacyRefusal, RuntimeError):
    """An evaluation this region does not answer; the message is border-safe."""

    def border_safe(self) -> str:
        """The message itself: it is written to be border-safe."""
        return str(self)


def make_client_app(
    run_config_defaults: Mapping[str, Any] | None = None, deps: RegionDeps | None = None
) -> ClientApp:
    """A ClientApp; `run_config_defaults` fill run-config keys Flower did not set (simulation)."""
    client = ClientApp()
    base = dict(run_config_defaults or {})
    resolved: list[RegionDeps] = [deps] if deps else []

    def _deps() -> RegionDeps:
        if not resolved:
            resolved.append(default_deps())
        return resolved[0]

    def _cfg(context: Context) -> dict[str, Any]:
        # Flower forbids changing context.run_config, so the merged view is passed alongside.
        return {**base, **dict(context.run_config)}

    @client.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, context, _deps(), _cfg(context))

    @client.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return handle_evaluate(message, context, _deps(), _cfg(context))

    @client.query()
    def query(message: Message, context: Context) -> Message:
        from fedfsd.secagg.round_spec import STAGE_KEY

        if STAGE_KEY in message.content.config_records.get(wire.CONFIG, ConfigRecord()):
            from fedfsd.region.secure_release import handle_message

            return handle_message(message, context, _deps(), _cfg(context))
        return handle_query(message, context, _cfg(context))

    return client


app = make_client_app()
