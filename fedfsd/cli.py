"""The `fedfsd` command: one sub-command group per kind of user (see DESIGN.md).

Each group lives next to the code it drives and keeps heavy imports (torch, flwr) inside its
commands, so `fedfsd --help` stays fast.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import typer

from fedfsd.aggregator.cli import app as aggregator_app
from fedfsd.aggregator.cli import register as aggregator_register
from fedfsd.data.cli import app as data_app
from fedfsd.deploy.cli import app as deploy_app
from fedfsd.modelhub.cli import app as model_app
from fedfsd.privacy.cli import app as privacy_app
from fedfsd.region.cli import app as region_app

# Flower's telemetry and update check are on by default; fedfsd never phones home.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

app = typer.Typer(
    name="fedfsd",
    help=(
        "Federated training of self-driving models with vehicle-level differential privacy.\n\n"
        "Regional operators run `fedfsd region ...`, the global ML team `fedfsd aggregator ...`, "
        "privacy reviewers `fedfsd privacy ...`. `fedfsd demo` runs a whole local federation."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(data_app, name="data", help="Generate, validate and summarise fleet logs.")
app.add_typer(privacy_app, name="privacy", help="ε calculator, ledgers, reports, verification.")
app.add_typer(region_app, name="region", help="Run a region: local training and its SuperNode.")
app.add_typer(aggregator_app, name="aggregator", help="Run the global aggregator (SuperLink).")
app.add_typer(deploy_app, name="deploy", help="A whole TLS federation on one machine.")
app.add_typer(
    model_app, name="model", help="Models: pretrain, evaluate in a region, export for the vehicle."
)


@region_app.command(
    "register",
    deprecated=True,
    help="Moved to `fedfsd aggregator register` (an aggregator-side command); this alias remains.",
)
@functools.wraps(aggregator_register)
def _region_register_alias(*args: Any, **kwargs: Any) -> None:
    """`fedfsd region register`: the old name, kept so existing scripts keep working."""
    typer.secho(
        "`fedfsd region register` moved to `fedfsd aggregator register`; use that name.",
        err=True,
        fg=typer.colors.YELLOW,
    )
    aggregator_register(*args, **kwargs)


@app.command()
def demo(
    rounds: int = typer.Option(None, help="Federated rounds (default: the demo's own)."),
    out: str = typer.Option("runs", help="Directory under which runs/<id>/ is written."),
    data_cache: str = typer.Option(
        ".fedfsd/demo-data", help="Where generated fleet data is cached."
    ),
    vehicles: int = typer.Option(
        None, min=20, help="Fleet vehicles per region (default: the demo's own)."
    ),
    local_steps: int = typer.Option(
        None,
        min=1,
        help="Step budget of each region's non-private models (its own and the personalised "
        "one; default: the demo's own).",
    ),
    secure_aggregation: bool = typer.Option(
        False,
        "--secure-aggregation",
        help="Run every round as a secure-aggregation DP-FedSGD step with distributed noise: "
        "each region's policy says trust_model = 'distributed', σ from the planner's "
        "distributed mode (default 30 rounds), both ε per region reported.",
    ),
    min_honest: int = typer.Option(
        None,
        "--min-honest",
        help="t: regions' min_honest_regions and the Shamir threshold (default: the smallest "
        "the protocol allows, 2 of 3). Only with --secure-aggregation.",
    ),
    enforce_on: str = typer.Option(
        None,
        "--enforce-on",
        help="The ε each region's budget is enforced on: distributed (default in the demo) or "
        "own_noise. Only with --secure-aggregation.",
    ),
) -> None:
    """Generate fleet data for cn, eu, us, run a TLS federation with vehicle-level DP, report."""
    from fedfsd.demo import run_demo

    raise typer.Exit(
        run_demo(
            rounds=rounds,
            out=out,
            data_cache=data_cache,
            vehicles=vehicles,
            local_steps=local_steps,
            secure_aggregation=secure_aggregation,
            min_honest=min_honest,
            enforce_on=enforce_on,
        )
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
