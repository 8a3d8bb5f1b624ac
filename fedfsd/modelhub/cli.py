"""`fedfsd model ...`: public pretraining, and the hand-off of a model: evaluate, export."""

from __future__ import annotations

from pathlib import Path

import typer

from fedfsd.errors import exit_for
from fedfsd.modelhub.handoff_cli import register

app = typer.Typer(no_args_is_help=True)
register(app)  # evaluate, export (fedfsd/modelhub/handoff_cli.py)


@app.command("pretrain")
def pretrain(
    data: list[Path] = typer.Option(..., help="A PUBLIC dataset directory (repeat for several)."),
    out: Path = typer.Option(..., help="Where to write the model (.npz, plus a .json sidecar)."),
    steps: int = typer.Option(
        2000, min=0, help="Non-private SGD steps on the pooled train splits."
    ),
    lr: float = typer.Option(0.1, min=0.0, help="Learning rate (plain SGD)."),
    vehicles_per_step: int = typer.Option(64, min=1, help="Expected vehicles per step (Poisson)."),
    eval_every: int = typer.Option(
        None, min=1, help="Score on the val splits every K steps (default: steps / 20)."
    ),
    seed: int = typer.Option(None, help="Fix the vehicle sampling seed (reproducible runs)."),
    allow_nonpublic: bool = typer.Option(
        False,
        "--allow-nonpublic",
        help="Accept datasets whose region is not 'public' (never real region data).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the sidecar JSON on stdout."),
) -> None:
    """Train the MLP on PUBLIC simulated data (outside every region's ε) as the federation's start.

    Pools the train splits, keeps the checkpoint with the best FDE@3s on the pooled validation
    splits (the prior, residual zero, is candidate 0), writes OUT and OUT.json atomically. Hand
    OUT to the aggregator as its initial model. Region data is refused: it must never be pooled.
    """
    import sys

    from rich.console import Console

    try:
        from fedfsd.data.validate import DatasetError, read_manifest
        from fedfsd.data.vehicles import load_vehicle_frames
        from fedfsd.modelhub.display import SelectionView
        from fedfsd.modelhub.files import save_model
        from fedfsd.modelhub.pretrain import NonPublicData, check_public, pretrain_model
    except ImportError as e:  # pragma: no cover - broken install
        exit_for(f"cannot import training code: {e}")

    trains, vals = [], []
    for d in data:
        try:
            check_public(read_manifest(d), str(d), allow_nonpublic)
            trains.append(load_vehicle_frames(d, split="train"))
            vals.append(load_vehicle_frames(d, split="val"))
        except (NonPublicData, DatasetError, OSError, ValueError) as e:
            exit_for(str(e) if isinstance(e, NonPublicData) else f"{d}: {e}")
    if len({f.fleet_id for f in trains}) != len(trains):
        exit_for("the same fleet was given twice (its vehicles would count twice)")

    con = Console(stderr=as_json)
    if allow_nonpublic and any(f.region != "public" for f in trains):
        con.print("[bold red]--allow-nonpublic: pooling datasets that are not 'public'[/]")
    view = SelectionView(con, steps, "pretrain")
    try:
        with view.running():
            weights, info = pretrain_model(
                trains,
                vals,
                "mlp",
                steps=steps,
                lr=lr,
                vehicles_per_step=vehicles_per_step,
                seed=seed,
                eval_every=eval_every,
                on_step=view.on_step,
                on_eval=view.on_eval,
            )
    except ValueError as e:
        exit_for(e)
    info["datasets"] = [str(d.resolve()) for d in data]
    try:
        side = save_model(out, weights, info)
    except OSError as e:
        exit_for(f"{out}: {e}")
    if as_json:
        sys.stdout.write(side.read_text())
        return
    con.print(view.table(info["best_step"]))
    con.print(
        f"val FDE@3s {info['val_fde_start']:.3f} m (prior) → {info['val_fde']:.3f} m "
        f"(step {info['best_step']}); public data, outside every region's ε"
    )
    con.print(f"wrote {out} and {side} (sha256 {info['weights_sha256'][:12]}…)")
