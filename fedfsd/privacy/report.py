"""Build the ε report of a region (and the global summary) from privacy ledgers.

The report is a `fedfsd.v1.EpsilonReport` (protos/fedfsd/v1/report.proto): it says what is
protected (one vehicle, add/remove adjacency), against whom (trust model), which releases are
covered, the mechanism as run, every release, the full accountant history and ε at δ. It carries
everything needed to recompute ε, so `fedfsd privacy verify` can check it without the ledger.

ε is recomputed here from the ledger's history with Opacus (PRV headline, RDP cross-check); a
disagreement with what the ledger recorded is stated in the report's notes, never hidden.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from google.protobuf import json_format

from fedfsd import __version__
from fedfsd.errors import InputError
from fedfsd.privacy.accounting import compute_epsilon, normalise_history
from fedfsd.privacy.release_record import ReleaseRecord
from fedfsd.proto.fedfsd.v1 import report_pb2 as pb

SCHEMA = 1
POISSON = "poisson"
# Samplers whose batches partition the fleet once per pass: each vehicle is in one batch per
# epoch, so without amplification a round costs ceil(steps · q) full-fleet Gaussian releases.
EPOCH_SAMPLERS = ("shuffle", "shuffled", "permutation", "epoch")
# Relative disagreement between the ledger's ε and the recomputed one that earns a note.
LEDGER_EPS_RTOL = 5e-3

ADJACENCY = "add/remove: neighbouring fleets differ by all data of one vehicle"
TRUST_SETTING = (
    "Central DP inside each region: the region's data centre runs vehicle-level DP-SGD on its own "
    "fleet logs; only the noised, clipped model update leaves it. Everyone outside the region is "
    "an adversary that may see every released update."
)
PARTIES: tuple[tuple[str, bool, str], ...] = (
    (
        "region data centre (this region)",
        True,
        "raw fleet logs of its own vehicles, per-vehicle gradients, the noise, the ledger",
    ),
    (
        "global aggregator",
        False,
        "each per-round update of this region (clipped, noised, L2-bounded), its manifest (region, "
        "run, round, update norm, digest, ε so far), num-examples (1 or a power-of-two bucket of "
        "the accounted fleet size), the differentially private metric releases the region's "
        "policy allows (none by default), refusal reasons, and every global model",
    ),
    (
        "other regions",
        False,
        "the global models, which are derived from this region's updates",
    ),
    (
        "users of the trained model and anyone holding checkpoints",
        False,
        "the final and intermediate global models",
    ),
    ("network observer", False, "TLS ciphertext, message sizes and timing"),
)
COVERED = (
    "every per-round model update this region released in the runs listed, on this fleet",
    "every metric release recorded in this ledger (evaluation metrics, training loss): each a "
    "Gaussian mechanism over all scored vehicles (q = 1, one step; per-vehicle means clipped to "
    "the policy's metric_clip), composed in the same accountant history as the DP-SGD steps",
    "everything derived from those releases by post-processing: the aggregated global models, "
    "checkpoints, the final model and its predictions",
    "earlier runs on the same fleet's ledger (their steps are part of the accountant history)",
    "every vehicle id in the region's logs (training, validation and test episodes; the ledger "
    "opened with that count and δ < 1/count): training vehicles through DP-SGD and the metric "
    "releases; vehicles seen only in held-out episodes are never sampled by DP-SGD and are "
    "protected by the metric releases' accounting (no metric release: nothing of theirs leaves)",
    "what leaves the region, each item accounted or argued: the clipped, noised update "
    "(DP-SGD, accounted); its manifest (digest, norm ≤ the public bound, ε so far, δ, budget, "
    "steps: functions of public parameters and the accounted history); num-examples (1, or a "
    "power-of-two bucket of the accounted fleet size); metric values (accounted releases "
    "above); refusal reasons (ε figures or fixed categories). Nothing else.",
)
NOT_COVERED = (
    "hyper-parameter tuning and any run not recorded in this ledger",
    "vehicles that appear only as neighbours (surrounding traffic) in other vehicles' frames: "
    "they are not units of this guarantee; their tracks enter as features of the observing "
    "vehicle's frames, bounded only through that vehicle's contribution",
    "models trained on this fleet's data before the ledger was opened",
    "data-dependent choices (of σ, C, K, steps, model, or which vehicles form the fleet)",
    "timing and size side channels of the updates",
)
FLEET_PUBLIC = (
    "the public fleet size (the policy's rounded-down public_fleet_size, the denominator of q): "
    "the exact vehicle count does not leave and is not stated in this report"
)
FLEET_EXACT = (
    "the training-vehicle count: the policy declares no public_fleet_size, so q (and the ε in "
    "each manifest) determine the exact count"
)
METRIC_MODEL = "metric:"  # Release.model prefix of a metric release (q = 1, no frames, no clip C)


class ReportError(InputError, ValueError):
    """A ledger that cannot be reported on (missing, empty, no such run)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _steps(history: Iterable[Sequence[float]]) -> list[pb.AccountantStep]:
    return [
        pb.AccountantStep(noise_multiplier=float(s), sample_rate=float(q), steps=int(n))
        for s, q, n in history
    ]


def history_of(steps: Iterable[pb.AccountantStep]) -> list[tuple[float, float, int]]:
    """A report's history as Opacus triples."""
    return [(h.noise_multiplier, h.sample_rate, int(h.steps)) for h in steps]


def no_amplification_history(
    releases: Iterable[pb.Release],
) -> tuple[list[tuple[float, float, int]], str]:
    """The q = 1 history that bounds ε when vehicles were not Poisson-sampled, and its method.

    Poisson releases keep their (σ, q, steps). An epoch sampler (each vehicle in one batch per
    pass) costs ceil(steps · q) full-batch Gaussian releases per round. Any other sampler is
    charged every step at q = 1: the vehicle is assumed present in every batch.
    """
    hist: list[tuple[float, float, int]] = []
    methods: set[str] = set()
    for r in releases:
        s = r.sampling.lower()
        if s == POISSON:
            hist.append((r.noise_multiplier, r.sample_rate, r.steps))
        elif s in EPOCH_SAMPLERS:
            hist.append((r.noise_multiplier, 1.0, math.ceil(r.steps * r.sample_rate - 1e-9)))
            methods.add(
                f"{s}: each vehicle is in one batch per pass, so a round of n steps costs "
                "ceil(n·q) Gaussian releases at q = 1 (no amplification by sampling)"
            )
        else:
            hist.append((r.noise_multiplier, 1.0, r.steps))
            methods.add(
                f"{s}: every step charged at q = 1 (the vehicle assumed in every batch; "
                "no amplification by sampling)"
            )
    return normalise_history(hist), "; ".join(sorted(methods))


def _num(rec: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    """A number from a ledger record; None (a non-private release's ε) reads as ∞."""
    v = rec.get(key, default)
    return math.inf if v is None else float(v)


def _release(rec: ReleaseRecord, cumulative: int) -> pb.Release:
    """A ledger release line as it appears in the report."""
    return pb.Release(
        run_id=str(rec.get("run_id", "")),
        round=int(rec.get("round", 0)),
        time=str(rec.get("time", "")),
        model=str(rec.get("model", "")),
        lr=float(rec.get("lr", 0.0)),
        noise_multiplier=float(rec.get("noise_multiplier", 0.0)),
        clip_norm=float(rec.get("clip_norm", 0.0)),
        sample_rate=float(rec.get("sample_rate", 0.0)),
        vehicles=int(rec.get("vehicles", 0)),
        expected_vehicles_per_step=int(rec.get("expected_vehicles_per_step", 0)),
        frames_per_vehicle=int(rec.get("frames_per_vehicle", 0)),
        steps=int(rec.get("steps", 0)),
        sampling=str(rec.get("sampling", "")),
        epsilon_prv=_num(rec, "epsilon_prv", math.inf),
        epsilon_rdp=_num(rec, "epsilon_rdp", math.inf),
        update_norm=float(rec.get("update_norm", 0.0)),
        update_sha256=str(rec.get("update_sha256", "")),
        cumulative_steps=cumulative,
        distributed=rec.get("trust_model") == "distributed",
        epsilon_distributed=float(rec.get("epsilon_distributed", 0.0)),
        epsilon_own_noise=float(rec.get("epsilon_own_noise", 0.0)),
    )


def _metric_release(rec: Mapping[str, Any], cumulative: int, vehicles: int) -> pb.Release:
    """A metric line as a report release: Gaussian at q = 1 (expected vehicles = vehicles)."""
    return pb.Release(
        run_id=str(rec.get("run_id", "")),
        round=int(rec.get("round", 0)),
        time=str(rec.get("time", "")),
        model=f"{METRIC_MODEL}{rec.get('phase', '')}:{','.join(rec.get('metrics', []))}",
        noise_multiplier=float(rec.get("noise_multiplier", 0.0)),
        sample_rate=float(rec.get("sample_rate", 1.0)),
        vehicles=vehicles,
        expected_vehicles_per_step=vehicles,
        steps=int(rec.get("steps", 0)),
        sampling=POISSON,  # Poisson sampling at rate 1 is every vehicle
        epsilon_prv=_num(rec, "epsilon_prv", math.inf),
        epsilon_rdp=_num(rec, "epsilon_rdp", math.inf),
        cumulative_steps=cumulative,
    )


def is_metric(r: pb.Release) -> bool:
    """True for a metric release (not a DP-SGD model update)."""
    return r.model.startswith(METRIC_MODEL)


def _select(releases: list[dict[str, Any]], run_id: str | None, path: Path) -> list[dict]:
    """Releases up to the last one of `run_id` (earlier runs on the fleet compose with it)."""
    if run_id is None:
        return releases
    last = max((i for i, r in enumerate(releases) if r.get("run_id") == run_id), default=None)
    if last is None:
        runs = sorted({str(r.get("run_id")) for r in releases})
        raise ReportError(f"{path}: no release of run {run_id!r} (runs: {', '.join(runs)})")
    return releases[: last + 1]


def _mechanism(rels: list[pb.Release], rng: str, normalisation: str) -> pb.Mechanism:
    """The DP-SGD mechanism (metric releases are listed among the releases, not here)."""
    rels = [r for r in rels if not is_metric(r)]
    last = rels[-1]
    samplers = sorted({r.sampling for r in rels})
    keys = {
        (r.noise_multiplier, r.clip_norm, r.sample_rate, r.frames_per_vehicle, r.steps)
        for r in rels
    }
    return pb.Mechanism(
        name="Poisson-subsampled Gaussian mechanism (vehicle-level DP-SGD, Opacus optimizer)"
        if samplers == [POISSON]
        else "subsampled Gaussian mechanism (vehicle-level DP-SGD, Opacus optimizer)",
        sampling=",".join(samplers),
        amplification_by_sampling=samplers == [POISSON],
        vehicles=last.vehicles,
        expected_vehicles_per_step=last.expected_vehicles_per_step,
        sample_rate=last.sample_rate,
        noise_multiplier=last.noise_multiplier,
        clip_norm=last.clip_norm,
        frames_per_vehicle=last.frames_per_vehicle,
        steps_per_round=last.steps,
        rounds=len(rels),
        total_steps=sum(r.steps for r in rels),
        normalisation=normalisation,
        rng=rng,
        parameters_constant=len(keys) == 1,
    )


def _implementation() -> str:
    from importlib.metadata import version

    return (
        f"opacus {version('opacus')} via fedfsd.privacy.accounting: PRVAccountant.get_epsilon "
        "headline (upper bound; eps_error 0.01, refined to max(0.002, 0.5% of ε) when ε < 1); "
        "RDPAccountant.get_epsilon (default orders) cross-check"
    )


def _statement(rep: pb.EpsilonReport) -> str:
    if not rep.private_training:
        return (
            f"Region {rep.region}: NON-PRIVATE baseline. These updates carry NO differential-"
            "privacy guarantee for any vehicle."
        )
    a, m = rep.accounting, rep.mechanism
    n_metric = sum(1 for r in rep.releases if is_metric(r))
    if rep.HasField("distributed"):
        d = rep.distributed
        n_dist = sum(1 for r in rep.releases if r.distributed)
        return (
            f"Every vehicle in region {rep.region}'s logs (fleet {rep.fleet_id}; q counts "
            f"{m.vehicles} training vehicles) is protected at the vehicle level (add/remove one "
            f"vehicle's data) against anyone who sees what this region released ({m.rounds} "
            f"model updates, {n_dist} of them with distributed noise under secure aggregation, "
            f"{n_metric} metric release(s)) and everything derived from them: "
            f"({d.epsilon_distributed:.3g}, {a.delta:.3g})-DP {d.assumption_distributed}; "
            f"({d.epsilon_own_noise:.3g}, {a.delta:.3g})-DP {d.assumption_own_noise}. "
            f"The budget {rep.budget.epsilon_budget:g} is enforced on the {d.enforce_on} ε "
            f"(remaining {rep.budget.epsilon_remaining:.3g}); accounting RDP throughout. By "
            f"common practice the enforced ε is {tier(a.epsilon)} (≤ 1 strong, ≤ 10 "
            "reasonable, above 10 weak)."
        )
    return (
        f"Every vehicle in region {rep.region}'s logs (fleet {rep.fleet_id}; q counts "
        f"{m.vehicles} training vehicles) is protected by ({a.epsilon:.3g}, {a.delta:.3g})-"
        f"differential privacy at the vehicle level (add/remove one vehicle's data), against "
        f"anyone who sees the {m.rounds} model updates this region released "
        f"({m.total_steps} DP-SGD steps), its {n_metric} metric release(s), and everything "
        f"derived from them, including the global model. Headline accountant PRV; "
        f"RDP cross-check ε = {a.epsilon_rdp:.3g}. Budget {rep.budget.epsilon_budget:g}, "
        f"remaining {rep.budget.epsilon_remaining:.3g}. By common practice this ε is "
        f"{tier(a.epsilon)} (≤ 1 strong, ≤ 10 reasonable, above 10 weak)."
    )


def tier(epsilon: float) -> str:
    """The rough tier used in practice (Ponomareva et al. 2023, "How to DP-fy ML")."""
    return "strong" if epsilon <= 1 else "reasonable" if epsilon <= 10 else "weak"


def build_report(ledger_path: str | Path, run_id: str | None = None) -> pb.EpsilonReport:
    """The ε report of one ledger (one region and fleet), through the last release of `run_id`."""
    path = Path(ledger_path)
    led, header, chosen = _read_ledger(path, run_id)
    notes: list[str] = []
    if led.torn_tail is not None:
        notes.append("the ledger ends in a torn line (a crash mid-write); it was not counted")
    private = bool(header.get("private", True)) and all(r.get("private", True) for r in chosen)

    updates = [r for r in chosen if r["kind"] == "release"]
    accounted = int(updates[-1].get("vehicles", 0))
    public_fleet = bool(updates[-1].get("public_fleet_size", False))
    rels: list[pb.Release] = []
    cum = 0
    for rec in chosen:
        cum += int(rec.get("steps", 0))
        rels.append(
            _release(cast(ReleaseRecord, rec), cum)
            if rec["kind"] == "release"
            else _metric_release(rec, cum, accounted)
        )
    last = chosen[-1]

    rep = pb.EpsilonReport(schema=SCHEMA, region=str(header["region"]))
    rep.fleet_id = str(header.get("fleet_id", ""))
    rep.private_training = private
    _fill_unit(rep, rels)
    _fill_scope(rep, chosen, led.records(), public_fleet)
    rep.mechanism.CopyFrom(
        _mechanism(rels, str(last.get("rng", "")), str(last.get("normalisation", "")))
    )
    rep.releases.extend(rels)
    delta = float(header.get("delta", last.get("delta", 0.0)))
    vehicles = int(header.get("vehicles", last.get("vehicles", 0)))
    _fill_accounting(rep, rels, last, delta, vehicles, accounted, public_fleet, private, notes)
    if private and any(r.get("trust_model") == "distributed" for r in chosen):
        _fill_distributed(rep, chosen, delta, notes)
    budget = float(header.get("epsilon_budget", last.get("epsilon_budget", 0.0)))
    _fill_budget(rep, budget)
    _fill_provenance(rep, chosen, rels, run_id, path, notes)
    rep.notes.extend(notes)
    rep.statement = _statement(rep)
    return rep


def _read_ledger(path: Path, run_id: str | None) -> tuple[Any, dict[str, Any], list[dict]]:
    """The ledger, its header and the spending records through `run_id` (ReportError if none)."""
    from fedfsd.privacy.ledger import SPENDING, Ledger, LedgerError

    if not path.is_file():
        raise ReportError(f"{path}: no such ledger file")
    led = Ledger(path)
    try:
        header = led.header
        all_releases = [r for r in led.records() if r["kind"] in SPENDING]
    except LedgerError as e:
        raise ReportError(str(e)) from None
    if not any(r["kind"] == "release" for r in all_releases):
        raise ReportError(f"{path}: the ledger has no releases yet; nothing to report")
    return led, header, _select(all_releases, run_id, path)


def _fill_unit(rep: pb.EpsilonReport, rels: Sequence[pb.Release]) -> None:
    """The unit of privacy: the vehicle, and the bound on one vehicle's contribution."""
    rep.unit.CopyFrom(
        pb.UnitOfPrivacy(
            unit="vehicle",
            adjacency=ADJACENCY,
            max_frames_per_vehicle_per_step=max(r.frames_per_vehicle for r in rels),
            clip_norm=max(r.clip_norm for r in rels),
            # (a metric release bounds each vehicle to one clipped mean per metric; see scope)
            contribution_bound=(
                "each sampled vehicle contributes one gradient per step: the mean loss over at "
                "most K of its frames, its gradient clipped to L2 norm C; a vehicle not sampled "
                "contributes nothing"
            ),
        )
    )


def _fill_scope(
    rep: pb.EpsilonReport, chosen: Sequence[dict], records: Sequence[dict], public_fleet: bool
) -> None:
    """The trust setting, and what this ε covers and does not."""
    rep.trust.setting = TRUST_SETTING
    rep.trust.parties.extend(pb.Party(name=n, trusted=t, sees=s) for n, t, s in PARTIES)
    rep.scope.covered.extend(COVERED)
    rep.scope.not_covered.extend(NOT_COVERED)
    rep.scope.not_covered.append(FLEET_PUBLIC if public_fleet else FLEET_EXACT)
    starts = sorted(
        {str(r["initial_model_sha256"]) for r in chosen if r.get("initial_model_sha256")}
    )
    if starts:
        rep.scope.not_covered.append(
            f"the initial model the federation started from (sha256 "
            f"{', '.join(h[:12] for h in starts)}…): pretrained by the global team on public "
            "simulated data (`fedfsd model pretrain`), which holds no vehicle of this fleet; "
            "outside this ε"
        )
    personal = [r for r in records if r.get("kind") == "personalised"]
    if personal:
        digests = ", ".join(str(r.get("weights_sha256", ""))[:12] for r in personal[-3:])
        rep.scope.not_covered.append(
            f"{len(personal)} personalised model(s) (sha256 {digests}…), fine-tuned in this "
            "region on its own fleet data WITHOUT differential privacy: trained locally, not "
            "released, and refused by the region's egress guard"
        )


def _fill_accounting(
    rep: pb.EpsilonReport,
    rels: Sequence[pb.Release],
    last: dict[str, Any],
    delta: float,
    vehicles: int,
    accounted: int,
    public_fleet: bool,
    private: bool,
    notes: list[str],
) -> None:
    """ε recomputed from the last release's accountant history (PRV headline, RDP cross-check)."""
    acc = rep.accounting
    acc.headline_accountant, acc.cross_check_accountant = "prv", "rdp"
    acc.delta = delta
    acc.delta_rule = (
        f"δ must be below 1/vehicles: δ = {delta:g} < 1/{accounted} (public fleet size; the "
        "region checked δ against its exact count of every vehicle id in its logs, which is "
        "not stated)"
        if public_fleet
        else f"δ must be below 1/vehicles: δ = {delta:g} < 1/{vehicles} = "
        f"{1 / max(vehicles, 1):.3g} (every vehicle id in the region's logs)"
    )
    acc.implementation = _implementation()
    if private:
        hist = normalise_history(last["accountant_history"])
        acc.history.extend(_steps(hist))
        acc.epsilon = compute_epsilon(hist, delta, "prv")
        acc.epsilon_rdp = compute_epsilon(hist, delta, "rdp")
        for key, mine in (("epsilon_prv", acc.epsilon), ("epsilon_rdp", acc.epsilon_rdp)):
            theirs = float(last.get(key, math.nan))
            if not math.isclose(theirs, mine, rel_tol=LEDGER_EPS_RTOL):
                notes.append(f"the ledger recorded {key} = {theirs:.6g}; recomputed {mine:.6g}")
        if not rep.mechanism.amplification_by_sampling:
            na_hist, method = no_amplification_history(rels)
            acc.no_amplification_history.extend(_steps(na_hist))
            acc.no_amplification_method = method
            with warnings.catch_warnings():  # Opacus PRV takes log(1 - q) = log(0) at q = 1
                warnings.simplefilter("ignore", RuntimeWarning)
                acc.epsilon_no_amplification = compute_epsilon(na_hist, delta, "prv")
    else:
        acc.epsilon = acc.epsilon_rdp = math.inf
        notes.append("non-private ledger: no differential-privacy guarantee")


DISTRIBUTED_SETTING = (
    " Distributed noise (issue 15): for the releases marked distributed, the region added only a "
    "Skellam noise share to its rounded integer gradient sum and sent it masked under secure "
    "aggregation; the aggregator learns only the sum over regions. ε is stated under two "
    "assumptions, and the budget is enforced on the one named."
)


MIXED_METHOD = (
    "; the local (Gaussian DP-SGD and metric) releases on the same ledger add Opacus' "
    "subsampled-Gaussian RDP (compute_rdp) at the same orders, under both assumptions"
)


def skellam_steps(history: Iterable[Any]) -> list[pb.SkellamStep]:
    """A Skellam history (fedfsd.privacy.distributed_accounting.SkellamRound) as report steps."""
    return [
        pb.SkellamStep(
            sample_rate=r.sample_rate,
            share_variance=r.share_variance,
            min_honest_regions=r.min_honest_regions,
            scale=r.scale,
            clip_norm=r.clip_norm,
            dimension=r.dimension,
            rounds=r.rounds,
        )
        for r in history
    ]


def skellam_history_of(steps: Iterable[pb.SkellamStep]) -> list[list[float]]:
    """Report steps back to the ledger's compact [q, μ_share, t, s, C, d, rounds] form."""
    return [
        [
            s.sample_rate,
            s.share_variance,
            s.min_honest_regions,
            s.scale,
            s.clip_norm,
            s.dimension,
            s.rounds,
        ]
        for s in steps
    ]


def _fill_distributed(
    rep: pb.EpsilonReport, chosen: Sequence[dict], delta: float, notes: list[str]
) -> None:
    """Both ε values recomputed from the ledger; the headline is the enforced one (RDP)."""
    from fedfsd.privacy.distributed_accounting import (
        METHOD,
        STATEMENTS,
        epsilons,
        normalise_skellam_history,
    )

    last_d = [r for r in chosen if r.get("trust_model") == "distributed"][-1]
    # A local line after it (a mixed ledger) carries the same history and states both ε too.
    named = [r for r in chosen if r.get("enforce_on")]
    last_e = named[-1]
    hist = normalise_skellam_history(last_d["distributed_history"])
    gauss = history_of(rep.accounting.history)
    eps = epsilons(hist, delta, gauss)
    t = max(r.min_honest_regions for r in hist)
    d = rep.distributed
    d.history.extend(skellam_steps(hist))
    d.enforce_on = str(last_e.get("enforce_on", "own_noise"))
    d.epsilon_distributed = eps["distributed"]
    d.assumption_distributed = STATEMENTS["distributed"].format(t=t)
    d.epsilon_own_noise = eps["own_noise"]
    d.assumption_own_noise = STATEMENTS["own_noise"]
    d.method = METHOD + (MIXED_METHOD if gauss else "")
    acc = rep.accounting
    acc.headline_accountant = acc.cross_check_accountant = "rdp"
    acc.epsilon = acc.epsilon_rdp = eps[d.enforce_on]
    acc.implementation = d.method
    rep.trust.setting += DISTRIBUTED_SETTING
    if gauss:
        n_local = sum(1 for r in chosen if r.get("trust_model") != "distributed")
        notes.append(
            f"mixed ledger: {n_local} local (Gaussian) release(s) and "
            f"{sum(r.rounds for r in hist)} distributed one(s); both ε compose all of them in "
            "RDP (the local releases count the same under either assumption). PRV, the headline "
            "of a local-only ledger, cannot account Skellam, so this ε is an RDP value"
        )
    for a, b in zip(named, named[1:], strict=False):
        if a["enforce_on"] != b["enforce_on"]:  # a reviewer must see a headline that moved
            notes.append(
                f"the budget's assumption changed from {a['enforce_on']} to {b['enforce_on']} "
                f"at run {b['run_id']} round {b['round']}: the headline ε is the one under the "
                f"assumption enforced last ({d.enforce_on}); the other is stated beside it"
            )
    for key in ("epsilon_distributed", "epsilon_own_noise"):
        theirs = float(last_e.get(key, math.nan))
        mine = eps[key.removeprefix("epsilon_")]
        if not math.isclose(theirs, mine, rel_tol=LEDGER_EPS_RTOL):
            notes.append(f"the ledger recorded {key} = {theirs:.6g}; recomputed {mine:.6g}")
    notes[:] = [n for n in notes if not n.startswith("the ledger recorded epsilon_prv")]
    notes[:] = [n for n in notes if not n.startswith("the ledger recorded epsilon_rdp")]
    for key in ("epsilon_prv", "epsilon_rdp"):
        theirs = float(chosen[-1].get(key) or math.nan)
        if not math.isclose(theirs, acc.epsilon, rel_tol=LEDGER_EPS_RTOL):
            notes.append(f"the ledger recorded {key} = {theirs:.6g}; recomputed {acc.epsilon:.6g}")


def _fill_budget(rep: pb.EpsilonReport, budget: float) -> None:
    """The budget, what of it is spent and what is left."""
    acc = rep.accounting
    b = rep.budget
    b.epsilon_budget = budget
    b.epsilon_spent = acc.epsilon
    b.epsilon_remaining = max(budget - acc.epsilon, 0.0) if math.isfinite(acc.epsilon) else 0.0
    b.fraction_used = acc.epsilon / budget if budget > 0 else math.inf


def _fill_provenance(
    rep: pb.EpsilonReport,
    chosen: Sequence[dict],
    rels: Sequence[pb.Release],
    run_id: str | None,
    path: Path,
    notes: list[str],
) -> None:
    """Which code wrote the releases and the report, which runs, which ledger bytes."""
    last = chosen[-1]
    versions = sorted({str(r.get("code_version", "")) for r in chosen})
    if len(versions) > 1:
        notes.append(f"releases were made by several code versions: {', '.join(versions)}")
    p = rep.provenance
    p.code_version = str(last.get("code_version", ""))
    p.report_code_version = __version__
    p.run_id = run_id or ""
    p.run_ids.extend(dict.fromkeys(r.run_id for r in rels))
    p.fleet_id, p.region = rep.fleet_id, rep.region
    p.ledger_path = str(path)
    p.ledger_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    p.generated = _now()


def build_global_summary(
    reports: Sequence[pb.EpsilonReport],
    vehicle_ids: Mapping[str, Iterable[str]] | None = None,
) -> pb.GlobalSummary:
    """Combine region reports: each vehicle gets its own region's ε; overlaps compose.

    `vehicle_ids` maps region → that fleet's vehicle identifiers; without it the summary says
    that overlap was not checked (regions are then assumed to hold disjoint vehicles).
    """
    if not reports:
        raise ReportError("no region reports to summarise")
    g = pb.GlobalSummary(schema=SCHEMA, report_code_version=__version__, generated=_now())
    by_region: dict[str, pb.EpsilonReport] = {}
    for r in reports:
        if r.region in by_region:
            raise ReportError(f"two reports for region {r.region!r}: give one ledger per region")
        by_region[r.region] = r
        g.regions.append(
            pb.RegionEpsilon(
                region=r.region,
                fleet_id=r.fleet_id,
                vehicles=r.mechanism.vehicles,
                epsilon=r.accounting.epsilon,
                epsilon_rdp=r.accounting.epsilon_rdp,
                delta=r.accounting.delta,
                epsilon_budget=r.budget.epsilon_budget,
                run_ids=list(r.provenance.run_ids),
                releases=len(r.releases),
                history=list(r.accounting.history),
                private_training=r.private_training,
                distributed=r.distributed if r.HasField("distributed") else None,
            )
        )
    g.composition_rule = (
        "Regions hold disjoint vehicles, so each vehicle is protected at its own region's "
        "(ε, δ) (parallel composition). A vehicle present in several regions is protected at the "
        "composition of those regions' accountant histories."
    )
    worst = [(r.accounting.epsilon, r.accounting.delta) for r in reports]
    if vehicle_ids is None:
        g.overlap_checked = False
        g.overlap_method = "not checked: no vehicle identifiers were given; disjointness assumed"
    else:
        g.overlap_checked = True
        g.overlap_method = "vehicle identifiers of each region's fleet compared exactly"
        owners: dict[str, set[str]] = {}
        for region, ids in vehicle_ids.items():
            if region not in by_region:
                raise ReportError(f"vehicle ids given for region {region!r} without its ledger")
            for v in ids:
                owners.setdefault(str(v), set()).add(region)
        groups: dict[tuple[str, ...], int] = {}
        for regs in owners.values():
            if len(regs) > 1:
                key = tuple(sorted(regs))
                groups[key] = groups.get(key, 0) + 1
        for group, count in sorted(groups.items()):
            og = compose_overlap([by_region[x] for x in group])
            og.vehicles = count
            g.overlaps.append(og)
            worst.append((og.epsilon, og.delta))
    eps, delta = max(worst)
    g.worst_case_epsilon, g.worst_case_delta = eps, delta
    flagged = sum(o.vehicles for o in g.overlaps)
    g.statement = (
        f"Across {len(reports)} regions, the weakest guarantee any vehicle gets is "
        f"({eps:.3g}, {delta:.3g})-DP at the vehicle level. "
        + (
            f"{flagged} vehicles appear in more than one region and are protected at their "
            "composed ε."
            if flagged
            else (
                "No vehicle appears in two regions."
                if g.overlap_checked
                else "Overlap between regions was not checked."
            )
        )
    )
    return g


def compose_overlap(reports: Sequence[pb.EpsilonReport]) -> pb.OverlapGroup:
    """ε of a vehicle in all of `reports`' fleets: the histories composed, at the smallest δ."""
    if dist := [r.region for r in reports if r.HasField("distributed")]:
        raise ReportError(
            f"overlap of {', '.join(dist)}: composing a region with distributed noise across "
            "fleets is not implemented (its ε is an RDP composition of Skellam releases); report "
            "overlapping fleets separately"
        )
    hist = [h for r in reports for h in history_of(r.accounting.history)]
    delta = min(r.accounting.delta for r in reports)
    private = all(r.private_training for r in reports)
    og = pb.OverlapGroup(regions=[r.region for r in reports], delta=delta)
    og.composed_history.extend(_steps(hist))
    og.epsilon = compute_epsilon(hist, delta, "prv") if private else math.inf
    og.epsilon_rdp = compute_epsilon(hist, delta, "rdp") if private else math.inf
    return og


def to_json(msg: pb.EpsilonReport | pb.GlobalSummary) -> str:
    """The canonical form: the protobuf JSON mapping, every field printed."""
    return (
        json_format.MessageToJson(msg, always_print_fields_with_no_presence=True, indent=2) + "\n"
    )


def load_json(path: str | Path) -> pb.EpsilonReport | pb.GlobalSummary:
    """Parse a report or global summary written by `to_json` (unknown fields are an error)."""
    import json

    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: not a fedfsd report (top level is not an object)")
    summary = "compositionRule" in data or "composition_rule" in data
    msg = pb.GlobalSummary() if summary else pb.EpsilonReport()
    try:
        json_format.ParseDict(data, msg)
    except json_format.ParseError as e:
        raise ReportError(f"{path}: not a valid {msg.DESCRIPTOR.full_name}: {e}") from None
    return msg


def write_report(rep: pb.EpsilonReport | pb.GlobalSummary, out: str | Path, fmt: str) -> Path:
    """Write one report as json, md or html to `out` (md also writes `<out>.png`)."""
    from fedfsd.privacy import report_render

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        out.write_text(to_json(rep))
    elif fmt == "md":
        out.write_text(report_render.to_markdown(rep, png_path=out.with_suffix(".png")))
    elif fmt == "html":
        out.write_text(report_render.to_html(rep))
    else:
        raise ReportError(f"unknown format {fmt!r}; choose json, md or html")
    return out


def write_reports(
    ledger_paths: Sequence[str | Path],
    out_dir: str | Path,
    run_id: str | None = None,
    vehicle_ids: Mapping[str, Iterable[str]] | None = None,
    formats: Sequence[str] = ("json", "md", "html"),
) -> list[Path]:
    """One report per region (`epsilon-<region>.<fmt>`) plus `epsilon-global.<fmt>`.

    This is what `fedfsd demo` calls at the end of a run. Returns every file written.
    """
    out = Path(out_dir)
    reports = [build_report(p, run_id) for p in ledger_paths]
    summary = build_global_summary(reports, vehicle_ids)
    written: list[Path] = []
    for rep in reports:
        for fmt in formats:
            written.append(write_report(rep, out / f"epsilon-{rep.region}.{fmt}", fmt))
    for fmt in formats:
        written.append(write_report(summary, out / f"epsilon-global.{fmt}", fmt))
    return written
