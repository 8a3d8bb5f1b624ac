"""`fedfsd privacy ...` commands."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from fedfsd.errors import exit_for

if TYPE_CHECKING:
    from fedfsd.privacy.planner import Plan

app = typer.Typer(no_args_is_help=True)
ledger_app = typer.Typer(no_args_is_help=True, help="Inspect a region's privacy ledger.")
app.add_typer(ledger_app, name="ledger")


@app.command()
def epsilon(
    noise_multiplier: float = typer.Option(..., help="σ: noise std / clip norm."),
    sample_rate: float = typer.Option(..., help="q: Poisson sampling rate of vehicles."),
    steps: int = typer.Option(..., help="Number of DP-SGD steps."),
    delta: float = typer.Option(..., help="δ (well below 1 / number of vehicles)."),
    accountant: str = typer.Option("prv", help="prv (headline) or rdp (cross-check)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """ε of a Poisson-subsampled Gaussian mechanism (Opacus accountants)."""
    from fedfsd.privacy.accounting import AccountantError, compute_epsilon

    if steps < 0:
        exit_for("--steps must be >= 0")
    try:
        eps = compute_epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant)
    except AccountantError as e:
        exit_for(e)
    acc = accountant.lower()
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "epsilon": eps if math.isfinite(eps) else None,
                    "delta": delta,
                    "accountant": acc,
                    "noise_multiplier": noise_multiplier,
                    "sample_rate": sample_rate,
                    "steps": steps,
                }
            )
        )
    else:
        typer.echo(
            f"ε = {eps:.4f} at δ = {delta:g} ({acc.upper()}; σ = {noise_multiplier:g}, "
            f"q = {sample_rate:g}, steps = {steps})"
        )


_PLAN_HELP = """Plan a vehicle-level DP schedule: vehicles per step, σ, steps per round, ε.

The rule (docs/privacy.md, "Planning a schedule"): few large steps; the number of steps grows
with the fleet. The region's fleet size is private: the global team plans with the public,
ROUNDED-DOWN fleet size each region declares (rounding down is conservative: the planned
q = m/N is at least the true one, so the true ε is at most the planned ε).
"""


@app.command("plan", help=_PLAN_HELP)
def plan(
    vehicles: int = typer.Option(
        ..., help="Fleet size N: the region's declared, rounded-down public vehicle count."
    ),
    epsilon: float = typer.Option(..., help="ε budget for the whole run (PRV)."),
    delta: float = typer.Option(..., help="δ; must be < 1/N (well below)."),
    rounds: int = typer.Option(..., help="Federated rounds."),
    json_path: str = typer.Option(
        None, "--json", help="Write the plan as JSON to FILE ('-' prints it to stdout)."
    ),
    frames_per_vehicle: int = typer.Option(8, help="K: frames of one vehicle per step."),
    max_vehicles_per_step: int = typer.Option(
        None, help="Compute cap on expected vehicles per step (default 1024)."
    ),
    max_total_steps: int = typer.Option(
        None, help="Cap on DP steps over all rounds (default 2000)."
    ),
    noise_budget: float = typer.Option(
        None,
        help="Largest weight noise (σ/m)·√T over the run, in units of C per lr (default 0.05, "
        "chosen on validation).",
    ),
    clip_norm: float = typer.Option(1.0, help="C: per-vehicle clip norm."),
    trust_model: str = typer.Option(
        "local",
        "--trust-model",
        help="'distributed': σ for ε under both assumptions of distributed noise (issue 15).",
    ),
    min_honest: int = typer.Option(
        None, "--min-honest", help="t: honest regions whose shares reach σ (distributed)."
    ),
    regions: int = typer.Option(None, "--regions", help="R: regions in the federation."),
    vehicles_per_step: int = typer.Option(
        256, "--vehicles-per-step", help="m: expected vehicles per round (distributed)."
    ),
    dimension: int = typer.Option(
        78_344, "--dimension", help="d: coordinates of the update (default: the object-list MLP)."
    ),
) -> None:
    from fedfsd.privacy import planner as pl

    if trust_model not in ("local", "distributed"):
        exit_for(pl.PlanError(f"--trust-model {trust_model!r}: one of local, distributed"))
    if trust_model == "distributed":
        if min_honest is None or regions is None:
            exit_for(pl.PlanError("--trust-model distributed needs --min-honest and --regions"))
        try:
            dp = pl.plan_distributed_sigma(
                vehicles,
                epsilon,
                delta,
                rounds,
                regions=regions,
                min_honest_regions=min_honest,
                vehicles_per_step=vehicles_per_step,
                dimension=dimension,
                clip_norm=clip_norm,
            )
        except pl.PlanError as e:
            exit_for(e)
        _print_distributed_plan(dp, json_path)
        return

    kw: dict = {"frames_per_vehicle": frames_per_vehicle, "clip_norm": clip_norm}
    if max_vehicles_per_step is not None:
        kw["max_vehicles_per_step"] = max_vehicles_per_step
    if max_total_steps is not None:
        kw["max_total_steps"] = max_total_steps
    if noise_budget is not None:
        kw["noise_budget"] = noise_budget
    try:
        p = pl.plan_schedule(vehicles, epsilon, delta, rounds, **kw)
    except pl.PlanError as e:
        exit_for(e)
    text = json.dumps(p.to_json_dict(), indent=2)
    if json_path == "-":
        typer.echo(text)
        return
    if json_path:
        try:
            Path(json_path).write_text(text + "\n", encoding="utf-8")
        except OSError as e:
            exit_for(f"{json_path}: cannot write the plan: {e.strerror}")
    _print_plan(p, json_path)


def _print_plan(p: Plan, json_path: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"DP schedule for {p.vehicles:,} vehicles, ε = {p.epsilon_target:g}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    rows = [
        ("rounds", f"{p.rounds}"),
        ("local steps per round", f"{p.steps_per_round}"),
        ("total steps T", f"{p.total_steps}"),
        ("expected vehicles per step m", f"{p.vehicles_per_step}"),
        ("sample rate q = m/N", f"{p.sample_rate:.4g}"),
        ("noise multiplier σ", f"{p.noise_multiplier:.4g}"),
        ("σ/m (noise on the mean, units of C)", f"{p.noise_ratio:.4g}"),
        ("weight noise (σ/m)·√T", f"{p.weight_noise:.4g} (budget {p.noise_budget:g})"),
        ("lr", f"{p.lr:g}"),
        ("clip norm C", f"{p.clip_norm:g}"),
        ("frames per vehicle K", f"{p.frames_per_vehicle}"),
        ("predicted ε (PRV)", f"{p.epsilon_prv:.3f}"),
        ("cross-check ε (RDP)", f"{p.epsilon_rdp:.3f}"),
        ("δ", f"{p.delta:g}"),
        ("steps limited by", p.limited_by),
    ]
    for k, v in rows:
        t.add_row(k, v)
    con = Console()
    con.print(t)
    con.print(f"planned in {p.plan_seconds:.1f} s; rule {p.rule}")
    if json_path:
        con.print(f"plan written to {json_path} (use: fedfsd aggregator run --plan {json_path})")


def _print_distributed_plan(p: Any, json_path: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    text = json.dumps(p.model_dump(), indent=2)
    if json_path == "-":
        typer.echo(text)
        return
    if json_path:
        Path(json_path).write_text(text + "\n", encoding="utf-8")
    t = Table(
        title=f"σ for ε = {p.epsilon_target:g} after {p.rounds} distributed rounds "
        f"({p.vehicles:,} vehicles, m = {p.vehicles_per_step}, R = {p.regions}, "
        f"t = {p.min_honest_regions})"
    )
    for col in ("budget enforced on", "σ", "noise on the global mean (units of C)"):
        t.add_column(col, justify="right" if col != "budget enforced on" else "left")
    t.add_row(
        f"distributed: if at least {p.min_honest_regions} regions are honest and secure "
        "aggregation holds",
        f"{p.sigma_distributed:.4g}",
        f"{p.noise_ratio_distributed:.4g}",
    )
    t.add_row(
        "own noise: if every other region cheated",
        f"{p.sigma_own_noise:.4g}",
        f"{p.noise_ratio_own_noise:.4g}",
    )
    t.add_row(
        "local (today: each region adds all noise; RDP)",
        f"{p.sigma_local:.4g}",
        f"{p.noise_ratio_local:.4g}",
    )
    Console().print(t)


def _fmt_eps(v: float | None) -> str:
    return "∞" if v is None else f"{v:.3f}"


@ledger_app.command("show")
def ledger_show(
    ledger: Path = typer.Argument(..., help="Ledger file (JSON Lines)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Every release on a ledger, and the total ε spent and left."""
    from rich.console import Console
    from rich.table import Table

    from fedfsd.privacy.accounting import AccountantError
    from fedfsd.privacy.ledger import Ledger, LedgerError

    lg = Ledger(ledger)
    try:
        head, rel = lg.header, lg.releases()
        private = lg.private
        # A ledger with distributed (Skellam) releases has no PRV ε: its total is the RDP
        # composition of every release, under the assumption its budget is enforced on.
        mixed = private and lg.spend().mixed
        both = lg.epsilons() if mixed else {}
        enforce_on = lg.enforce_on() if mixed else None
        if enforce_on is not None:
            # one composition when mixed (accountant is ignored there): the enforced of both
            eps = eps_rdp = both[enforce_on]
        else:
            eps, eps_rdp = lg.epsilon(), lg.epsilon(accountant="rdp")
    except (LedgerError, AccountantError, KeyError) as e:
        exit_for(e)
    budget = float(rel[-1]["epsilon_budget"]) if rel else float(head["epsilon_budget"])
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "region": head["region"],
                    "fleet_id": head["fleet_id"],
                    "private": private,
                    "releases": len(rel),
                    "delta": head["delta"],
                    "accountant": ("rdp-mixed" if mixed else "prv") if private else None,
                    "epsilon": eps if private else None,
                    "epsilon_prv": eps if private and not mixed else None,
                    "epsilon_rdp": eps_rdp if private else None,
                    "enforce_on": enforce_on,
                    "epsilon_distributed": both.get("distributed"),
                    "epsilon_own_noise": both.get("own_noise"),
                    "epsilon_budget": budget,
                    "epsilon_left": max(0.0, budget - eps) if private else None,
                    "torn_tail": lg.torn_tail is not None,
                }
            )
        )
        return
    con = Console()
    title = f"ledger {ledger} — region {head['region']}, fleet {head['fleet_id']}"
    if not private:
        title += " — NON-PRIVATE (no DP guarantee)"
    t = Table(title=title)
    for col in (
        "run",
        "round",
        "time",
        "model",
        "σ",
        "C",
        "q",
        "K",
        "steps",
        "ε PRV",
        "ε RDP",
        "‖Δ‖",
    ):
        t.add_column(col, justify="right" if col not in ("run", "time", "model") else "left")
    for r in rel:
        t.add_row(
            str(r["run_id"]),
            str(r["round"]),
            str(r["time"])[:16],
            str(r["model"]),
            f"{r['noise_multiplier']:g}",
            f"{r['clip_norm']:g}",
            f"{r['sample_rate']:.4g}",
            str(r["frames_per_vehicle"]),
            str(r["steps"]),
            _fmt_eps(r["epsilon_prv"]),
            _fmt_eps(r["epsilon_rdp"]),
            f"{r['update_norm']:.3f}",
        )
    con.print(t)
    if lg.torn_tail is not None:
        con.print("[yellow]torn last line ignored (a write interrupted by a crash; not counted)[/]")
    if mixed:
        con.print(
            f"total ε = {eps:.4f} (RDP composition of local and distributed releases, "
            f"enforced on the {enforce_on} assumption; distributed {both['distributed']:.4f}, "
            f"own noise {both['own_noise']:.4f}) at δ = {head['delta']:g}; "
            f"budget {budget:g}; left {max(0.0, budget - eps):.4f}"
        )
    elif private:
        con.print(
            f"total ε = {eps:.4f} (PRV; RDP {eps_rdp:.4f}) at δ = {head['delta']:g}; "
            f"budget {budget:g}; left {max(0.0, budget - eps):.4f}"
        )
    else:
        con.print("[bold red]NON-PRIVATE ledger: ε = ∞ (baseline runs only)[/]")


# ---- ε reports (docs/privacy-report.md) ----------------------------------------------------


@app.command("report")
def report(
    ledger: list[str] = typer.Option(..., "--ledger", help="Region ledger (repeat per region)."),
    out: str = typer.Option(..., "--out", help="Output file (one ledger) or directory."),
    fmt: str = typer.Option("json", "--format", help="json (canonical), md or html."),
    run: str | None = typer.Option(None, "--run", help="Report through this run's releases."),
    vehicles: list[str] = typer.Option(
        [], "--vehicles", help="REGION=PATH (data dir or id list) to flag shared vehicles."
    ),
) -> None:
    """Write the ε report of each region (and a global summary for several ledgers)."""
    from fedfsd.privacy.report_cli import run_report

    raise typer.Exit(run_report(ledger, out, fmt, run, vehicles))


@app.command("verify")
def verify(
    reports: list[str] = typer.Argument(
        None, help="REPORT.json files (reports and summaries); none: --ledger alone."
    ),
    ledger: list[str] = typer.Option(
        [], "--ledger", help="The region's LEDGER.jsonl (repeat for several regions)."
    ),
    receipts: str | None = typer.Option(
        None, "--receipts", help="The aggregator's run directory (receipts.jsonl)."
    ),
) -> None:
    """Recompute ε and check each report; with --ledger/--receipts, against what was released.

    Bare: the report alone. --ledger: hash chain, signatures, ledger_sha256, releases, σ floor,
    no fixed seed, ε recomputed from the ledger. --receipts: every update the aggregator
    received has a release with the same digest and parameters, signed by the ledger's key.
    """
    from fedfsd.privacy.report_cli import run_verify

    raise typer.Exit(run_verify(reports or [], ledger, receipts))
