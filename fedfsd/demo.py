"""`fedfsd demo`: the main job, end to end on one machine.

It plays every role a real deployment has, each in its own process where production has one:
it generates (or reuses) simulated fleet logs for cn, eu and us, writes each region's own privacy
policy, starts a local TLS federation (SuperLink with node authentication, one SuperNode and
guarded executor per region), runs the rounds with vehicle-level DP (schedule from the privacy
planner) while showing progress, then, in each region's role, trains what the region would use
instead (its own model without DP) and personalises the global model without DP (never released),
and finally, in the role of the global ML team's lab, scores every model and the
constant-velocity prior alone on the test episodes of all regions and says which wins where.

Only the comparison step reads every region's test data in one process: that is the demo's
evaluation harness (simulated fleets), not something the aggregator can do in production.

`--secure-aggregation` (fedfsd.demo_secure) runs the same demo with distributed trust: every
region's policy says `trust_model = "distributed"`, each round is one secure DP-FedSGD step whose
noisy sum only the aggregator unmasks, and the summary states both ε per region.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fedfsd.demo_secure import has_rows
from fedfsd.run_config import TrainSchedule, default

console = Console()

DEMO_REGIONS = ("cn", "eu", "us")


@dataclass(frozen=True)
class DemoConfig:
    """The demo's embedded defaults: sized to finish in about 5 minutes on 2 CPU cores.

    The DP schedule (vehicles per step, σ, steps per round, lr) is not set here: it comes from
    `fedfsd privacy plan` (fedfsd.privacy.planner) for the fleet size the regions declare, the
    ε budget and the rounds (see `plan`).
    """

    regions: tuple[str, ...] = DEMO_REGIONS
    vehicles: int = 1000
    data_seed: int = 7
    rounds: int = 5
    frames_per_vehicle: int = default("frames-per-vehicle")
    clip_norm: float = default("clip-norm")
    epsilon_budget: float = 8.0
    # The planner aims a little below the budget: each region's ledger refuses a round that
    # would overspend, and a region's σ floor may differ from the plan's σ.
    plan_epsilon: float = 7.5
    delta: float = 1e-5
    min_noise_multiplier: float = 0.5  # each region's own floor (policy); the plan asks more
    max_vehicles_per_step: int = 512  # CPU time per step on 2 cores
    # The planner's weight-noise budget and step cap: its rule sets the schedule (None: its
    # defaults, the budget chosen on validation by experiments/demo_schedule.py).
    noise_budget: float | None = None
    max_total_steps: int | None = None
    update_norm_bound: float = 20.0
    round_timeout: float = default("round-timeout")
    model: str = default("model")
    # Non-private training in each region (its own model and the personalised one): early
    # stopping on the region's validation episodes.
    local_max_steps: int = 1200
    local_eval_every: int = 150
    local_lr: float = 0.1
    local_vehicles_per_step: int = 64
    allowed_metrics: tuple[str, ...] = ()  # nothing but updates leave (DP metrics: opt in)
    extra: dict[str, Any] = field(default_factory=dict)
    # `--secure-aggregation` (issue 15, fedfsd.demo_secure): every round is one secure
    # DP-FedSGD step and σ comes from the planner's distributed mode. Rounds = steps, so the
    # demo picks few, large steps (rounds when --rounds is not given; m per region, at most
    # half the declared fleet) to stay affordable: each secure round is four message exchanges.
    secure_aggregation: bool = False
    secure_rounds: int = 30
    secure_vehicles_per_step: int = 256
    min_honest_regions: int | None = None  # t; None: secure_round.default_threshold(regions)
    # The ε each region's budget is enforced on. "distributed" buys the √t noise saving the
    # secure demo shows (own-noise ε is still ledgered and reported); "own_noise" is the policy
    # default and plans the σ that holds even if every other region cheated.
    enforce_on: str = "distributed"
    secure_lr: float | None = None  # server-lr of the secure step; None: the planner's lr

    def plan(self, public_vehicles: int) -> Any:
        """The DP schedule for a fleet of (at least) `public_vehicles` vehicles per region."""
        from fedfsd.privacy.planner import plan_schedule

        return plan_schedule(
            public_vehicles,
            self.plan_epsilon,
            self.delta,
            self.rounds,
            frames_per_vehicle=self.frames_per_vehicle,
            clip_norm=self.clip_norm,
            max_vehicles_per_step=self.max_vehicles_per_step,
            **self._planner_overrides(),
        )

    def _planner_overrides(self) -> dict[str, Any]:
        """The planner knobs this config sets; the rest are the planner's own defaults."""
        out: dict[str, Any] = {}
        if self.noise_budget is not None:
            out["noise_budget"] = self.noise_budget
        if self.max_total_steps is not None:
            out["max_total_steps"] = self.max_total_steps
        return out

    def threshold(self) -> int:
        """t: the regions' min_honest_regions and the aggregator's Shamir threshold."""
        from fedfsd.aggregator.secure_round import default_threshold

        return self.min_honest_regions or default_threshold(len(self.regions))

    def plan_secure(self, public_vehicles: int) -> Any:
        """The secure schedule (fedfsd.demo_secure.SecurePlan) for the declared fleet."""
        from fedfsd.demo_secure import plan_secure
        from fedfsd.privacy.planner import DEFAULT_LR

        return plan_secure(
            public_vehicles=public_vehicles,
            epsilon=self.plan_epsilon,
            delta=self.delta,
            rounds=self.rounds,
            regions=len(self.regions),
            min_honest_regions=self.threshold(),
            wanted_vehicles_per_step=min(self.secure_vehicles_per_step, self.max_vehicles_per_step),
            model=self.model,
            clip_norm=self.clip_norm,
            enforce_on=self.enforce_on,
            min_noise_multiplier=self.min_noise_multiplier,
            lr=self.secure_lr or DEFAULT_LR,
        )

    def run_config(self, run_dir: Path, run_id: str, plan: Any) -> dict[str, Any]:
        """The aggregator's run config (what it *asks*; each region's policy may tighten it)."""
        schedule = TrainSchedule(
            local_steps=plan.steps_per_round,
            lr=plan.lr,
            noise_multiplier=plan.noise_multiplier,
            clip_norm=self.clip_norm,
            vehicles_per_step=plan.vehicles_per_step,
            frames_per_vehicle=self.frames_per_vehicle,
            model=self.model,
        )
        secure: dict[str, Any] = {}
        if self.secure_aggregation:
            from fedfsd.demo_secure import run_config_fields

            secure = run_config_fields(plan)
        return {
            **secure,
            "num-server-rounds": self.rounds,
            **schedule.train_request(),
            # The regions allow no metric by default (allowed_metrics is empty): ask for an
            # evaluation only after the last round instead of one refused exchange per round.
            "evaluate-every": self.rounds if not self.allowed_metrics else 1,
            "min-regions": len(self.regions),
            "round-timeout": self.round_timeout,
            "update-norm-bound": self.update_norm_bound,
            "run-dir": str(run_dir),
            "run-id": run_id,
            "plot-metric": "fde",
        }


def public_fleet_size(n_vehicles: int) -> int:
    """The fleet size a region declares: rounded DOWN to two significant digits.

    Planning (and accounting) with fewer vehicles than the fleet has is conservative: the
    planned sampling rate q = m / N_public is at least the true one.
    """
    if n_vehicles < 100:
        return n_vehicles
    step = 10 ** (len(str(n_vehicles)) - 2)
    return n_vehicles // step * step


def policy_toml(cfg: DemoConfig, region: str, plan: Any, public_size: int) -> str:
    """The region-owned policy file the demo writes for each region.

    `public_size` is the fleet size the region declares (rounded down): it accounts with
    q = m / public_size, so the ε it spends is the planner's prediction or less, and only the
    declared size can be inferred from what it releases.
    """
    import tomli_w

    trust: dict[str, Any] = {}
    if cfg.secure_aggregation:
        from fedfsd.demo_secure import policy_fields

        trust = policy_fields(plan)
    return tomli_w.dumps(
        {
            **trust,
            "region": region,
            "public_fleet_size": public_size,
            "epsilon_budget": cfg.epsilon_budget,
            "delta": cfg.delta,
            "min_noise_multiplier": cfg.min_noise_multiplier,
            "max_clip_norm": cfg.clip_norm,
            "update_norm_bound": cfg.update_norm_bound,
            "max_local_steps": max(plan.steps_per_round, 1),
            "max_vehicles_per_step": max(plan.vehicles_per_step, 1),
            "max_frames_per_vehicle": cfg.frames_per_vehicle,
            "allowed_metrics": list(cfg.allowed_metrics),
            "weighting": "equal",
            "allowed_app_digests": [],
        }
    )


def ensure_data(cfg: DemoConfig, cache: Path) -> dict[str, Path]:
    """Generate each region's fleet logs once (fleet-scale mode); reuse a cache that validates."""
    from fedfsd.data.generate import generate_dataset
    from fedfsd.data.validate import DatasetError, validate_dataset

    dirs: dict[str, Path] = {}
    for region in cfg.regions:
        out = cache / f"{region}-v{cfg.vehicles}-fleet-s{cfg.data_seed}"
        if (out / "manifest.json").exists():
            try:
                validate_dataset(out)
                console.print(f"[dim]reusing cached fleet data for {region}: {out}[/]")
                dirs[region] = out
                continue
            except DatasetError as err:
                console.print(f"[yellow]cached data for {region} is invalid ({err}); regenerating")
                import shutil

                shutil.rmtree(out)
        console.print(f"generating fleet data for [bold]{region}[/] → {out}")
        dirs[region] = generate_dataset(
            region, cfg.vehicles, None, cfg.data_seed, out, progress=True, fleet_scale=True
        )
    return dirs


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def progress_table(run_dir: Path, cfg: DemoConfig, started: float) -> Table:
    """Round and ε spent per region so far, read from the aggregator's run files.

    Regions send no metric by default (nothing but the update leaves), so the live view shows
    what the aggregator itself knows: which regions' updates it accepted and their ε.
    """
    eps = _read_csv(run_dir / "epsilon.csv")
    cells: dict[tuple[int, str], str] = {
        (int(r["round"]), r["region"]): f"{float(r['epsilon']):.2f}" for r in eps
    }
    source = ""
    if not eps and cfg.secure_aggregation:
        # A secure run whose aggregator writes no epsilon.csv rows: the regions' ledgers
        # (the demo plays every role), ε under the distributed assumption / own noise alone.
        from fedfsd.demo_secure import ledger_epsilons

        source = " (ε from the regions' ledgers: distributed / own noise)"
        for region in cfg.regions:
            led = ledger_epsilons(run_dir.parent / "regions" / region / "ledger.jsonl")
            for rnd, (e_d, e_o) in led.items():
                cells[(rnd, region)] = f"{e_d:.2f} / {e_o:.2f}"
    rounds = sorted({rnd for rnd, _ in cells})
    t = Table(
        title=f"federation: round {max(rounds, default=0)}/{cfg.rounds} "
        f"({time.monotonic() - started:.0f}s){source}"
    )
    t.add_column("round", justify="right")
    for region in cfg.regions:
        t.add_column(f"{region} ε", justify="right")
    for rnd in rounds[-8:]:
        t.add_row(str(rnd), *[cells.get((rnd, region), "–") for region in cfg.regions])
    return t


def run_demo_federation(
    cfg: DemoConfig,
    run_dir: Path,
    data: dict[str, Path],
    run_id: str,
    plan: Any,
    declared: dict[str, int],
) -> None:
    """Start the local TLS federation, run all rounds with live progress, stop everything."""
    from fedfsd.demo_secure import node_config
    from fedfsd.deploy.federation import LocalFederation, RegionSpec, RunFailed

    regions: dict[str, RegionSpec] = {}
    for region in cfg.regions:
        rdir = run_dir / "regions" / region
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "policy.toml").write_text(policy_toml(cfg, region, plan, declared[region]))
        regions[region] = RegionSpec(
            data_dir=data[region],
            policy_path=rdir / "policy.toml",
            ledger_path=rdir / "ledger.jsonl",
            node_config=node_config(run_dir / "deploy") if cfg.secure_aggregation else {},
        )
    agg_dir = run_dir / "aggregator"
    agg_dir.mkdir(parents=True, exist_ok=True)
    # Three regions and the aggregator share one small machine here: one BLAS/OpenMP thread
    # per process avoids oversubscribing the cores (a real region has its own machine).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    console.print(
        "starting SuperLink (TLS, SuperNode auth) and one SuperNode per region"
        + (" (secure aggregation, distributed noise)" if cfg.secure_aggregation else "")
        + " …"
    )
    with LocalFederation(run_dir / "deploy", regions, tls=True) as fed:
        fed.wait_connected()
        console.print(
            f"regions connected over gRPC+TLS to Fleet API {fed.fleet_address}; "
            f"control API on {fed.control_address} (loopback only)"
        )
        flwr_run = fed.start_run(cfg.run_config(agg_dir, run_id, plan))
        started = time.monotonic()
        deadline = started + cfg.rounds * (cfg.round_timeout * 2 + 30)
        status = "running"
        last_check = 0.0
        with Live(
            progress_table(agg_dir, cfg, started), console=console, refresh_per_second=2
        ) as live:
            seen_rounds = 0
            while time.monotonic() < deadline:
                live.update(progress_table(agg_dir, cfg, started))
                if not console.is_terminal:  # logs and CI: one plain line per finished round
                    seen_rounds = _print_new_rounds(agg_dir, seen_rounds)
                # `flwr ls` starts a Python process: ask it only when the run looks done
                # (the ServerApp writes the final model) or every 15 s, not every second.
                done = (agg_dir / "global_model.npz").exists()
                if done or time.monotonic() - last_check > 15.0:
                    last_check = time.monotonic()
                    status = fed.run_status(flwr_run)
                    if status.startswith("finished"):
                        break
                time.sleep(1.0)
            live.update(progress_table(agg_dir, cfg, started))
        if not console.is_terminal:  # Live's last frame ends without a newline in a log
            console.print()
        if status != "finished:completed":
            raise RunFailed(f"federation run ended {status!r}; logs in {fed.logs}")


def _nonprivate(
    cfg: DemoConfig, data_dir: Path, start: dict[str, np.ndarray], seed: int
) -> tuple[dict[str, np.ndarray], Any]:
    """Non-private training inside one region from `start`, early-stopped on its validation.

    From the prior this is the region's own non-private model; from the global model it is the
    personalised model. Neither ever leaves the region (no DP needed, nothing released).
    """
    import torch

    from fedfsd.data.vehicles import load_vehicle_frames
    from fedfsd.region.finetune import finetune_model

    # One BLAS thread per worker: the parent imported torch before forking, so its pool would
    # otherwise oversubscribe the cores with the other worker's threads.
    torch.set_num_threads(1)
    train = load_vehicle_frames(data_dir, split="train")
    val = load_vehicle_frames(data_dir, split="val")
    res = finetune_model(
        train,
        val,
        start,
        cfg.model,
        max_steps=cfg.local_max_steps,
        eval_every=cfg.local_eval_every,
        lr=cfg.local_lr,
        vehicles_per_step=cfg.local_vehicles_per_step,
        seed=seed,
    )
    return res.weights, res


def region_baselines(
    cfg: DemoConfig,
    data: dict[str, Path],
    prior: dict[str, np.ndarray],
    federated: dict[str, np.ndarray],
) -> dict[str, dict[str, np.ndarray]]:
    """Per region: its own model without DP, and the federated model personalised without DP.

    This is what a region's operator would do instead of, or after, joining: neither model
    leaves the region, so neither needs DP. Both get the same step budget and are chosen on the
    region's validation episodes. The regions are independent: parallel processes, one per core.
    """
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, min(len(cfg.regions), os.cpu_count() or 1))
    out: dict[str, dict[str, np.ndarray]] = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        nodp = {
            r: pool.submit(_nonprivate, cfg, data[r], prior, i) for i, r in enumerate(cfg.regions)
        }
        pers = {
            r: pool.submit(_nonprivate, cfg, data[r], federated, 100 + i)
            for i, r in enumerate(cfg.regions)
        }
        for region in cfg.regions:
            weights, res = nodp[region].result()
            console.print(
                f"local-only (no DP) {region}: {res.steps} of {cfg.local_max_steps} steps chosen "
                f"on validation (val FDE {res.val_fde_before:.2f} → {res.val_fde_after:.2f} m)"
            )
            out[f"local-only (no DP) {region}"] = weights
        for region in cfg.regions:
            weights, res = pers[region].result()
            console.print(
                f"personalised {region}: federated model + {res.steps} of {cfg.local_max_steps} "
                f"non-private steps in {region} (val FDE {res.val_fde_before:.2f} → "
                f"{res.val_fde_after:.2f} m; never released)"
            )
            out[f"personalised {region}"] = weights
    return out


def pooled_scores(
    data: dict[str, Path], models: dict[str, dict[str, np.ndarray]], model_name: str
) -> dict[str, dict[str, float]]:
    """Each model's metrics on the pooled test episodes of all regions (frame-weighted)."""
    from fedfsd.data.vehicles import load_vehicle_frames
    from fedfsd.region.evaluation import evaluate_weights

    tests = {r: load_vehicle_frames(d, split="test") for r, d in data.items()}
    total = sum(f.n_frames for f in tests.values())
    scores: dict[str, dict[str, float]] = {}
    for name, weights in models.items():
        per_region = {r: evaluate_weights(f, weights, model_name) for r, f in tests.items()}
        pooled = {
            k: sum(per_region[r][k] * tests[r].n_frames for r in tests) / total
            for k in ("loss", "ade", "fde", "accel_mae")
        }
        scores[name] = {**pooled, **{f"fde_{r}": per_region[r]["fde"] for r in tests}}
    return scores


def summary_table(scores: dict[str, dict[str, float]], regions: tuple[str, ...]) -> Table:
    t = Table(title="test episodes of all regions (lower is better)")
    t.add_column("model")
    for col in ("ADE (m)", "FDE@3s (m)", "accel MAE (m/s²)"):
        t.add_column(col, justify="right")
    for r in regions:
        t.add_column(f"FDE {r}", justify="right")
    t.add_column("FDE vs prior", justify="right")
    prior = scores[PRIOR]["fde"]
    for name, s in scores.items():
        t.add_row(
            name,
            f"{s['ade']:.2f}",
            f"{s['fde']:.2f}",
            f"{s['accel_mae']:.3f}",
            *[f"{s[f'fde_{r}']:.2f}" for r in regions],
            "—" if name == PRIOR else f"{s['fde'] / prior:.2f}×",
        )
    return t


def winners(scores: dict[str, dict[str, float]], regions: tuple[str, ...]) -> dict[str, str]:
    """Per region, the model with the lowest FDE on that region's test episodes.

    Only models the region could actually deploy compete: the prior, the federated model, and
    the region's own local and personalised models (another region's model is not an option).
    """
    out = {}
    for r in regions:
        cands = [PRIOR, "federated", f"local-only (no DP) {r}", f"personalised {r}"]
        out[r] = min((c for c in cands if c in scores), key=lambda c: scores[c][f"fde_{r}"])
    return out


def run_demo(
    rounds: int | None = None,
    out: str = "runs",
    data_cache: str = ".fedfsd/demo-data",
    cfg: DemoConfig | None = None,
    vehicles: int | None = None,
    local_steps: int | None = None,
    secure_aggregation: bool = False,
    min_honest: int | None = None,
    enforce_on: str | None = None,
) -> int:
    """The whole demo; returns the process exit code (0 when every step ran)."""
    from fedfsd.aggregator.checkpoint import load_checkpoint
    from fedfsd.data.vehicles import load_vehicle_frames
    from fedfsd.privacy.report import write_reports

    cfg = cfg or DemoConfig()
    if rounds is not None:
        if rounds < 1:
            console.print("[red]error:[/] --rounds must be ≥ 1")
            return 2
        cfg = DemoConfig(**{**asdict(cfg), "rounds": rounds})
    if vehicles is not None:
        cfg = DemoConfig(**{**asdict(cfg), "vehicles": vehicles})
    if local_steps is not None:
        eval_every = max(1, min(cfg.local_eval_every, local_steps))
        cfg = DemoConfig(
            **{**asdict(cfg), "local_max_steps": local_steps, "local_eval_every": eval_every}
        )
    if secure_aggregation or min_honest is not None or enforce_on is not None:
        secure_cfg = _secure_config(cfg, secure_aggregation, rounds, min_honest, enforce_on)
        if isinstance(secure_cfg, str):
            console.print(f"[red]error:[/] {secure_cfg}")
            return 2
        cfg = secure_cfg
    t0 = time.monotonic()
    run_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out).resolve() / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "demo-config.json").write_text(json.dumps(asdict(cfg), indent=2))
    console.rule(f"fedfsd demo → {run_dir}")

    data = ensure_data(cfg, Path(data_cache).resolve())
    t_data = time.monotonic() - t0
    declared = {
        r: public_fleet_size(load_vehicle_frames(d, split="train").n_vehicles)
        for r, d in data.items()
    }
    t_mark = time.monotonic()
    from fedfsd.privacy.planner import PlanError

    try:
        n_plan = min(declared.values())
        plan = cfg.plan_secure(n_plan) if cfg.secure_aggregation else cfg.plan(n_plan)
    except PlanError as err:
        console.print(f"[red]error:[/] {err} (the demo needs a larger fleet: --vehicles)")
        return int(err.exit_code)
    t_plan = time.monotonic() - t_mark
    if cfg.secure_aggregation:
        console.print(f"{plan.describe()} (declared: {declared})")
    else:
        console.print(
            f"DP schedule from the planner for {n_plan} declared vehicles per "
            f"region (declared: {declared}), ε "
            f"{cfg.plan_epsilon:g}, δ {cfg.delta:g}, {cfg.rounds} rounds: "
            f"{plan.vehicles_per_step} expected vehicles per step, σ "
            f"{plan.noise_multiplier:.2f}, {plan.steps_per_round} steps per round, lr "
            f"{plan.lr:g} (predicted ε {plan.epsilon_prv:.2f})"
        )
    (run_dir / "plan.json").write_text(json.dumps(_jsonable_plan(plan), indent=2))
    run_demo_federation(cfg, run_dir, data, run_id, plan, declared)
    t_fed = time.monotonic() - t0 - t_data - t_plan

    agg = run_dir / "aggregator"
    ckpt = load_checkpoint(agg)
    if ckpt is None or ckpt.round < cfg.rounds:
        console.print(f"[red]error:[/] the run did not complete its rounds (see {agg})")
        return 1
    prior = _prior_weights(cfg, plan)
    t_mark = time.monotonic()
    baselines = region_baselines(cfg, data, prior, ckpt.weights)
    t_base = time.monotonic() - t_mark
    models = {"federated": ckpt.weights, PRIOR: prior, **baselines}
    t_mark = time.monotonic()
    scores = pooled_scores(data, models, cfg.model)
    t_score = time.monotonic() - t_mark
    t_mark = time.monotonic()

    ledgers = [run_dir / "regions" / r / "ledger.jsonl" for r in cfg.regions]
    reports = write_reports(ledgers, run_dir / "reports")
    # What a reviewer runs: each region's report against its ledger and the aggregator's receipts.
    from fedfsd.privacy.report_cli import run_verify

    region_reports = [
        str(p) for p in reports if p.suffix == ".json" and p.name != "epsilon-global.json"
    ]
    notes: list[str] = []
    receipts: str | None = str(agg)
    if cfg.secure_aggregation and not has_rows(agg / "receipts.jsonl"):
        # Secure rounds may leave no receipts yet: hold the reports against the ledgers alone
        # (chain, rules, both ε recomputed), and say so.
        receipts = None
        notes.append(
            "the aggregator wrote no receipts.jsonl for the secure rounds: each region's report "
            "was verified against its ledger only (not against receipts)"
        )
    verified = run_verify(region_reports, [str(x) for x in ledgers], receipts) == 0
    if cfg.secure_aggregation:  # `fedfsd privacy verify --ledger L`: both ε of every release
        verified = run_verify([], [str(x) for x in ledgers]) == 0 and verified
    t_reports = time.monotonic() - t_mark
    rejected = agg / "rejected.jsonl"
    rejected.touch()  # present (and empty) when the aggregator rejected nothing
    n_rejected = len(rejected.read_text().splitlines()) if rejected.exists() else 0
    eps = {r: _last_epsilon(agg, r) for r in cfg.regions}
    trust: dict[str, Any] = {"trust_model": "local", "epsilon_source": "aggregator epsilon.csv"}
    if cfg.secure_aggregation:
        trust = _secure_summary(cfg, plan, agg, [Path(p) for p in region_reports], eps, notes)
    fed_fde, prior_fde = scores["federated"]["fde"], scores[PRIOR]["fde"]
    best = winners(scores, cfg.regions)
    targets: dict[str, Any] = {
        "federated_pooled_fde_vs_prior": fed_fde / prior_fde,
        "federated_at_most_0.9x_prior": fed_fde <= 0.9 * prior_fde,
        "personalised_vs_local_no_dp": {
            r: scores[f"personalised {r}"][f"fde_{r}"]
            / scores[f"local-only (no DP) {r}"][f"fde_{r}"]
            for r in cfg.regions
        },
    }
    targets["personalised_at_most_1.05x_local_no_dp"] = all(
        v <= 1.05 for v in targets["personalised_vs_local_no_dp"].values()
    )
    summary: dict[str, Any] = {
        "run_id": run_id,
        "run_dir": str(run_dir),
        "rounds": cfg.rounds,
        "plan": _jsonable_plan(plan),
        "declared_vehicles_per_region": declared,
        "epsilon_per_region": eps,
        **trust,
        "epsilon_budget": cfg.epsilon_budget,
        "delta": cfg.delta,
        "rejected_updates": n_rejected,
        "pooled_test": scores,
        "best_on_own_region": best,
        "targets": targets,
        "seconds": {
            "data": round(t_data, 1),
            "plan": round(t_plan, 1),
            "federation": round(t_fed, 1),
            "region_baselines": round(t_base, 1),
            "scoring": round(t_score, 1),
            "reports_and_verify": round(t_reports, 1),
            "total": round(time.monotonic() - t0, 1),
        },
        "reports": [str(p) for p in reports],
        "reports_verified_with_ledgers_and_receipts": verified,
        "notes": notes,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(summary_table(scores, cfg.regions))
    if cfg.secure_aggregation:
        console.print(trust_table(summary, cfg))
    else:
        console.print(
            "ε spent per region (PRV, δ={:g}, budget {:g}): {}".format(
                cfg.delta, cfg.epsilon_budget, ", ".join(f"{r} {e:.2f}" for r, e in eps.items())
            )
        )
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(
        f"federated model on all regions' test episodes: FDE@3s {fed_fde:.2f} m vs the "
        f"constant-velocity prior alone {prior_fde:.2f} m ({fed_fde / prior_fde:.2f}×); "
        f"rejected updates: {n_rejected}"
    )
    for r in cfg.regions:
        own = {k: scores[k][f"fde_{r}"] for k in scores}
        console.print(
            f"{r}: best on its own test episodes is [bold]{best[r]}[/] ({own[best[r]]:.2f} m); "
            f"federated {own['federated']:.2f}, prior {own[PRIOR]:.2f}, own model without DP "
            f"{own[f'local-only (no DP) {r}']:.2f}, personalised {own[f'personalised {r}']:.2f} m"
        )
    secure_files = "secagg_transcript.jsonl, " if cfg.secure_aggregation else ""
    console.print(
        f"run files: {run_dir} (global model, metrics.csv, epsilon.csv, rejected.jsonl, "
        f"{secure_files}metrics.png, reports/); {summary['seconds']['total']:.0f}s in all"
    )
    return 0


def _secure_config(
    cfg: DemoConfig,
    secure: bool,
    rounds: int | None,
    min_honest: int | None,
    enforce_on: str | None,
) -> DemoConfig | str:
    """The config of `--secure-aggregation` (its rounds unless --rounds), or why not."""
    if not secure:
        return "--min-honest and --enforce-on only apply with --secure-aggregation"
    if enforce_on not in (None, "distributed", "own_noise"):
        return f"--enforce-on {enforce_on!r}: one of distributed, own_noise"
    n = len(cfg.regions)
    if min_honest is not None and not 2 <= min_honest <= n:
        return f"--min-honest {min_honest} must be in 2..{n} (the regions)"
    changes: dict[str, Any] = {"secure_aggregation": True}
    if rounds is None:
        changes["rounds"] = cfg.secure_rounds
    if min_honest is not None:
        changes["min_honest_regions"] = min_honest
    if enforce_on is not None:
        changes["enforce_on"] = enforce_on
    return DemoConfig(**{**asdict(cfg), **changes})


def _secure_summary(
    cfg: DemoConfig,
    plan: Any,
    agg: Path,
    region_reports: list[Path],
    eps: dict[str, float],
    notes: list[str],
) -> dict[str, Any]:
    """summary.json's trust keys: t, both ε per region from the regions' reports, transcript.

    `eps` (epsilon_per_region) is the aggregator's epsilon.csv when the secure rounds wrote
    rows there; otherwise it is filled with the ε each region enforces, from its report.
    """
    from fedfsd.demo_secure import report_epsilons, transcript_summary

    by_region = report_epsilons(region_reports)
    source = "aggregator epsilon.csv"
    if not all(math.isfinite(e) for e in eps.values()):
        source = "regions' reports (from their ledgers)"
        notes.append(
            "the aggregator wrote no epsilon.csv rows for the secure rounds: ε per region is "
            "read from the regions' reports (built from their ledgers)"
        )
        for r in cfg.regions:
            rec = by_region.get(r, {})
            eps[r] = float(rec.get(f"epsilon_{rec.get('enforce_on', plan.enforce_on)}", math.nan))
    return {
        "trust_model": "distributed",
        "min_honest_regions": plan.min_honest_regions,
        "secagg_threshold": plan.min_honest_regions,
        "enforce_on": plan.enforce_on,
        "epsilon_source": source,
        "epsilon_distributed_per_region": {
            r: by_region.get(r, {}).get("epsilon_distributed", math.nan) for r in cfg.regions
        },
        "epsilon_own_noise_per_region": {
            r: by_region.get(r, {}).get("epsilon_own_noise", math.nan) for r in cfg.regions
        },
        "assumptions": {
            "distributed": next((v["assumption_distributed"] for v in by_region.values()), ""),
            "own_noise": next((v["assumption_own_noise"] for v in by_region.values()), ""),
        },
        "secagg_transcript": transcript_summary(agg),
    }


def trust_table(summary: dict[str, Any], cfg: DemoConfig) -> Table:
    """Both ε per region (from the regions' reports), with the trust assumption named."""
    t = Table(
        title=f"ε per region, trust model {summary['trust_model']} (t = "
        f"{summary['min_honest_regions']} of {len(cfg.regions)} regions honest; δ "
        f"{cfg.delta:g}, budget {cfg.epsilon_budget:g} enforced on {summary['enforce_on']})"
    )
    t.add_column("region")
    t.add_column("ε distributed (≥ t honest, protocol holds)", justify="right")
    t.add_column("ε own noise alone (others cheated)", justify="right")
    for r in cfg.regions:
        t.add_row(
            r,
            f"{summary['epsilon_distributed_per_region'][r]:.2f}",
            f"{summary['epsilon_own_noise_per_region'][r]:.2f}",
        )
    return t


PRIOR = "constant-velocity prior"


def _jsonable_plan(plan: Any) -> dict[str, Any]:
    return plan.to_json_dict()


def _prior_weights(cfg: DemoConfig, plan: Any) -> dict[str, np.ndarray]:
    """The constant-velocity prior alone: the aggregator's start model, residual exactly zero."""
    from fedfsd.aggregator.server_app import initial_weights
    from fedfsd.aggregator.settings import RunSettings
    from fedfsd.models import prior_only_weights

    return prior_only_weights(
        initial_weights(RunSettings.model_validate(cfg.run_config(Path("/"), "prior", plan)))
    )


def _last_epsilon(agg: Path, region: str) -> float:
    rows = [r for r in _read_csv(agg / "epsilon.csv") if r["region"] == region]
    return float(rows[-1]["epsilon"]) if rows else float("nan")


def _print_new_rounds(agg: Path, seen: int) -> int:
    """Print rounds.jsonl lines not printed yet (for output that is not a terminal)."""
    path = agg / "rounds.jsonl"
    if not path.exists():
        return seen
    lines = path.read_text().splitlines()
    for line in lines[seen:]:
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            return seen  # a line being written; read it next time
        metrics = d.get("metrics", {})
        fde = ", ".join(
            f"{k.split('/')[0]} FDE {v:.2f} m" for k, v in metrics.items() if "fde" in k
        )
        eps = ", ".join(f"{r} ε {e:.2f}" for r, e in d.get("epsilon", {}).items())
        # A secure round accepts no individual update: say whose masked inputs were summed.
        summed = _summed(agg, d.get("round")) if not d.get("accepted") else None
        if summed and not eps:  # no epsilon.csv row: the regions' ledgers (distributed/own)
            eps = _ledger_round_epsilons(agg.parent / "regions", summed, d.get("round"))
        who = f"summed {summed}" if summed else f"accepted {d.get('accepted')}"
        console.print(
            f"round {d.get('round')}: {d.get('status')} in {d.get('seconds', 0):.0f}s; "
            f"{who}; {eps}" + (f"; {fde}" if fde else "")
        )
        seen += 1
    return seen


def _summed(agg: Path, rnd: Any) -> list[str] | None:
    """The regions a secure round summed (its transcript line), None for a plain round."""
    path = agg / "secagg_transcript.jsonl"
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            tr = json.loads(line)
        except json.JSONDecodeError:
            continue
        if tr.get("round") == rnd:
            return list(tr.get("summed", []))
    return None


def _ledger_round_epsilons(regions_dir: Path, regions: list[str], rnd: Any) -> str:
    """ "r ε d/o" of one secure round from the regions' ledgers (both assumptions)."""
    from fedfsd.demo_secure import ledger_epsilons

    parts = []
    for r in regions:
        got = ledger_epsilons(regions_dir / r / "ledger.jsonl").get(int(rnd or 0))
        if got:
            parts.append(f"{r} ε {got[0]:.2f} distributed / {got[1]:.2f} own noise")
    return ", ".join(parts) + (" (regions' ledgers)" if parts else "")
