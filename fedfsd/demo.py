"""`fedfsd demo`: the main job, end to end on one machine.

It plays every role a real deployment has, each in its own process where production has one:
it generates (or reuses) simulated fleet logs for cn, eu and us, writes each region's own privacy
policy, starts a local TLS federation (SuperLink with node authentication, one SuperNode and
guarded executor per region), runs the rounds with vehicle-level DP while showing progress, and
then, in the role of the global ML team's lab, compares the federated model with what each region
could train alone under the same privacy budget, on the pooled test episodes of all regions.

Only the comparison step reads every region's test data in one process: that is the demo's
evaluation harness (simulated fleets), not something the aggregator can do in production.
"""

from __future__ import annotations

import csv
import json
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

console = Console()

DEMO_REGIONS = ("cn", "eu", "us")


@dataclass(frozen=True)
class DemoConfig:
    """The demo's embedded defaults: sized to finish in about 5 minutes on 2 CPU cores."""

    regions: tuple[str, ...] = DEMO_REGIONS
    vehicles: int = 300
    episodes: int = 20
    data_seed: int = 7
    rounds: int = 6
    local_steps: int = 40
    lr: float = 0.05
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    vehicles_per_step: int = 16
    frames_per_vehicle: int = 8
    epsilon_budget: float = 8.0
    delta: float = 1e-5
    update_norm_bound: float = 20.0
    round_timeout: float = 90.0
    model: str = "mlp"
    allowed_metrics: tuple[str, ...] = ()  # nothing but updates leave (DP metrics: opt in)
    extra: dict[str, Any] = field(default_factory=dict)

    def run_config(self, run_dir: Path, run_id: str) -> dict[str, Any]:
        """The aggregator's run config (what it *asks*; each region's policy may tighten it)."""
        return {
            "num-server-rounds": self.rounds,
            "local-steps": self.local_steps,
            "lr": self.lr,
            "noise-multiplier": self.noise_multiplier,
            "clip-norm": self.clip_norm,
            "vehicles-per-step": self.vehicles_per_step,
            "frames-per-vehicle": self.frames_per_vehicle,
            "model": self.model,
            "min-regions": len(self.regions),
            "round-timeout": self.round_timeout,
            "update-norm-bound": self.update_norm_bound,
            "run-dir": str(run_dir),
            "run-id": run_id,
            "plot-metric": "fde",
        }


def policy_toml(cfg: DemoConfig, region: str) -> str:
    """The region-owned policy file the demo writes for each region."""
    import tomli_w

    return tomli_w.dumps(
        {
            "region": region,
            "epsilon_budget": cfg.epsilon_budget,
            "delta": cfg.delta,
            "min_noise_multiplier": cfg.noise_multiplier,
            "max_clip_norm": cfg.clip_norm,
            "update_norm_bound": cfg.update_norm_bound,
            "max_local_steps": cfg.local_steps,
            "max_vehicles_per_step": cfg.vehicles_per_step,
            "max_frames_per_vehicle": cfg.frames_per_vehicle,
            "allowed_metrics": list(cfg.allowed_metrics),
            "weighting": "equal",
            "allowed_app_digests": [],
        }
    )


def ensure_data(cfg: DemoConfig, cache: Path) -> dict[str, Path]:
    """Generate each region's fleet logs once; reuse a cached dataset that still validates."""
    from fedfsd.data.generate import generate_dataset
    from fedfsd.data.validate import DatasetError, validate_dataset

    dirs: dict[str, Path] = {}
    for region in cfg.regions:
        out = cache / f"{region}-v{cfg.vehicles}-e{cfg.episodes}-s{cfg.data_seed}"
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
            region, cfg.vehicles, cfg.episodes, cfg.data_seed, out, progress=True
        )
    return dirs


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def progress_table(run_dir: Path, cfg: DemoConfig, started: float) -> Table:
    """Round, per-region test FDE and ε spent so far, read from the aggregator's run files."""
    eps = _read_csv(run_dir / "epsilon.csv")
    metrics = [r for r in _read_csv(run_dir / "metrics.csv") if r["metric"] == "fde"]
    rounds = sorted({int(r["round"]) for r in eps} | {int(r["round"]) for r in metrics})
    t = Table(
        title=f"federation: round {max(rounds, default=0)}/{cfg.rounds} "
        f"({time.monotonic() - started:.0f}s)"
    )
    t.add_column("round", justify="right")
    for region in cfg.regions:
        t.add_column(f"{region} FDE@3s (m)", justify="right")
        t.add_column(f"{region} ε", justify="right")
    for rnd in rounds[-8:]:
        row = [str(rnd)]
        for region in cfg.regions:
            m = [r for r in metrics if int(r["round"]) == rnd and r["region"] == region]
            e = [r for r in eps if int(r["round"]) == rnd and r["region"] == region]
            row.append(f"{float(m[-1]['value']):.2f}" if m else "–")
            row.append(f"{float(e[-1]['epsilon']):.2f}" if e else "–")
        t.add_row(*row)
    return t


def run_federation(cfg: DemoConfig, run_dir: Path, data: dict[str, Path], run_id: str) -> None:
    """Start the local TLS federation, run all rounds with live progress, stop everything."""
    from fedfsd.deploy.federation import LocalFederation, RegionSpec, RunFailed

    regions: dict[str, RegionSpec] = {}
    for region in cfg.regions:
        rdir = run_dir / "regions" / region
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "policy.toml").write_text(policy_toml(cfg, region))
        regions[region] = RegionSpec(
            data_dir=data[region],
            policy_path=rdir / "policy.toml",
            ledger_path=rdir / "ledger.jsonl",
        )
    agg_dir = run_dir / "aggregator"
    agg_dir.mkdir(parents=True, exist_ok=True)
    # Three regions and the aggregator share one small machine here: one BLAS/OpenMP thread
    # per process avoids oversubscribing the cores (a real region has its own machine).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    console.print("starting SuperLink (TLS, SuperNode auth) and one SuperNode per region …")
    with LocalFederation(run_dir / "deploy", regions, tls=True) as fed:
        fed.wait_connected()
        console.print(
            f"regions connected over gRPC+TLS to Fleet API {fed.fleet_address}; "
            f"control API on {fed.control_address} (loopback only)"
        )
        flwr_run = fed.start_run(cfg.run_config(agg_dir, run_id))
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
        if status != "finished:completed":
            raise RunFailed(f"federation run ended {status!r}; logs in {fed.logs}")


def _local_only(
    cfg: DemoConfig, run_dir: Path, region: str, data_dir: Path, init: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], float]:
    """One region alone: its own policy, a separate ledger, the same rounds × steps."""
    from fedfsd.config import TrainRequest, load_policy
    from fedfsd.data.vehicles import load_vehicle_frames
    from fedfsd.privacy.local_round import run_local_round

    request = TrainRequest(
        local_steps=cfg.local_steps,
        lr=cfg.lr,
        noise_multiplier=cfg.noise_multiplier,
        clip_norm=cfg.clip_norm,
        vehicles_per_step=cfg.vehicles_per_step,
        frames_per_vehicle=cfg.frames_per_vehicle,
        model=cfg.model,
    )
    frames = load_vehicle_frames(data_dir, split="train")
    policy = load_policy(run_dir / "regions" / region / "policy.toml")
    ledger = run_dir / "baselines" / region / "ledger.jsonl"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    weights, eps = init, float("nan")
    for rnd in range(1, cfg.rounds + 1):
        res = run_local_round(
            frames, policy, ledger, weights, request, f"local-{region}", rnd, cfg.model
        )
        weights, eps = res.new_weights, res.epsilon
    return weights, eps


def local_only_baselines(
    cfg: DemoConfig, run_dir: Path, data: dict[str, Path], init: dict[str, np.ndarray]
) -> dict[str, dict[str, np.ndarray]]:
    """Each region alone: the same DP mechanism, steps and budget, no federation.

    The regions are independent, so they train in parallel processes (one per core).
    """
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, min(len(cfg.regions), os.cpu_count() or 1))
    out: dict[str, dict[str, np.ndarray]] = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {r: pool.submit(_local_only, cfg, run_dir, r, data[r], init) for r in cfg.regions}
        for region, fut in futures.items():
            weights, eps = fut.result()
            console.print(
                f"local-only {region}: {cfg.rounds}×{cfg.local_steps} DP steps, ε = {eps:.2f}"
            )
            out[region] = weights
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
    t = Table(title="pooled test episodes of all regions (lower is better)")
    t.add_column("model")
    for col in ("ADE (m)", "FDE@3s (m)", "accel MAE (m/s²)"):
        t.add_column(col, justify="right")
    for r in regions:
        t.add_column(f"FDE {r}", justify="right")
    t.add_column("FDE vs federated", justify="right")
    fed = scores["federated"]["fde"]
    for name, s in scores.items():
        t.add_row(
            name,
            f"{s['ade']:.2f}",
            f"{s['fde']:.2f}",
            f"{s['accel_mae']:.3f}",
            *[f"{s[f'fde_{r}']:.2f}" for r in regions],
            "—" if name == "federated" else f"{s['fde'] / fed:.2f}×",
        )
    return t


def run_demo(
    rounds: int | None = None,
    out: str = "runs",
    data_cache: str = ".fedfsd/demo-data",
    cfg: DemoConfig | None = None,
) -> int:
    """The whole demo; returns the process exit code (0 when the federated model wins)."""
    from fedfsd.aggregator.checkpoint import load_checkpoint
    from fedfsd.privacy.report import write_reports

    cfg = cfg or DemoConfig()
    if rounds is not None:
        if rounds < 1:
            console.print("[red]error:[/] --rounds must be ≥ 1")
            return 2
        cfg = DemoConfig(**{**asdict(cfg), "rounds": rounds})
    t0 = time.monotonic()
    run_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out).resolve() / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "demo-config.json").write_text(json.dumps(asdict(cfg), indent=2))
    console.rule(f"fedfsd demo → {run_dir}")

    data = ensure_data(cfg, Path(data_cache).resolve())
    t_data = time.monotonic() - t0
    run_federation(cfg, run_dir, data, run_id)
    t_fed = time.monotonic() - t0 - t_data

    agg = run_dir / "aggregator"
    ckpt = load_checkpoint(agg)
    if ckpt is None or ckpt.round < cfg.rounds:
        console.print(f"[red]error:[/] the run did not complete its rounds (see {agg})")
        return 1
    initial = _initial_weights(cfg)
    baselines = local_only_baselines(cfg, run_dir, data, initial)
    models = {
        "federated": ckpt.weights,
        **{f"local-only {r}": w for r, w in baselines.items()},
        "start (constant velocity)": initial,
    }
    scores = pooled_scores(data, models, cfg.model)

    ledgers = [run_dir / "regions" / r / "ledger.jsonl" for r in cfg.regions]
    reports = write_reports(ledgers, run_dir / "reports")
    # What a reviewer runs: each region's report against its ledger and the aggregator's receipts.
    from fedfsd.privacy.report_cli import run_verify

    region_reports = [
        str(p) for p in reports if p.suffix == ".json" and p.name != "epsilon-global.json"
    ]
    verified = run_verify(region_reports, [str(x) for x in ledgers], str(agg)) == 0
    rejected = agg / "rejected.jsonl"
    rejected.touch()  # present (and empty) when the aggregator rejected nothing
    n_rejected = len(rejected.read_text().splitlines()) if rejected.exists() else 0
    eps = {r: _last_epsilon(agg, r) for r in cfg.regions}
    local = {k: v for k, v in scores.items() if k.startswith("local-only")}
    best_local = min(v["fde"] for v in local.values())
    fed_fde = scores["federated"]["fde"]
    wins = all(fed_fde < v["fde"] for v in local.values())
    summary = {
        "run_id": run_id,
        "run_dir": str(run_dir),
        "rounds": cfg.rounds,
        "epsilon_per_region": eps,
        "epsilon_budget": cfg.epsilon_budget,
        "delta": cfg.delta,
        "rejected_updates": n_rejected,
        "pooled_test": scores,
        "federated_beats_every_local_only": wins,
        "fde_improvement_over_best_local": 1.0 - fed_fde / best_local,
        "seconds": {
            "data": round(t_data, 1),
            "federation": round(t_fed, 1),
            "total": round(time.monotonic() - t0, 1),
        },
        "reports": [str(p) for p in reports],
        "reports_verified_with_ledgers_and_receipts": verified,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(summary_table(scores, cfg.regions))
    console.print(
        "ε spent per region (PRV, δ={:g}, budget {:g}): {}".format(
            cfg.delta, cfg.epsilon_budget, ", ".join(f"{r} {e:.2f}" for r, e in eps.items())
        )
    )
    console.print(
        f"federated FDE@3s {fed_fde:.2f} m vs best local-only {best_local:.2f} m: "
        f"{100 * (1 - fed_fde / best_local):.0f}% lower; rejected updates: {n_rejected}"
    )
    console.print(
        f"run files: {run_dir} (global model, metrics.csv, epsilon.csv, rejected.jsonl, "
        f"metrics.png, reports/); {summary['seconds']['total']:.0f}s in all"
    )
    if not wins:
        console.print("[red]the federated model did not beat every local-only model[/]")
        return 1
    return 0


def _initial_weights(cfg: DemoConfig) -> dict[str, np.ndarray]:
    """The same initial model the aggregator starts from (seeded), for a fair baseline."""
    from fedfsd.aggregator.server_app import initial_weights
    from fedfsd.aggregator.settings import RunSettings

    return initial_weights(RunSettings.model_validate(cfg.run_config(Path("/"), "baseline")))


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
        console.print(
            f"round {d.get('round')}: {d.get('status')} in {d.get('seconds', 0):.0f}s; "
            f"accepted {d.get('accepted')}; {eps}; {fde}"
        )
        seen += 1
    return seen
