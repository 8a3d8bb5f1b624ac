"""`fedfsd model evaluate` and `fedfsd model export`: the hand-off from the run to the vehicle.

Registered on `fedfsd model` by `fedfsd.modelhub.cli`. Errors print one `error: …` line and exit
non-zero through `fedfsd.errors.exit_for` (a damaged dataset with the message `fedfsd data
validate` prints).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from fedfsd.errors import InputError, exit_for


def _load(model: Path) -> Any:
    from fedfsd.modelhub.meta import load_model

    return load_model(model)


def _frames(data: Path, split: str) -> Any:
    from fedfsd.data.validate import DatasetError
    from fedfsd.modelhub.evaluate import load_frames

    try:
        return load_frames(data, split)
    except DatasetError as e:
        exit_for(e)


def evaluate(
    model: Path = typer.Option(
        ..., help="Model file (.npz; its .json sidecar is read if present)."
    ),
    data: Path = typer.Option(..., help="Dataset directory on local disk (docs/data-format.md)."),
    split: str = typer.Option("test", help="test | train | all (episodes, never frames)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON document."),
) -> None:
    """Score MODEL on a local dataset, beside the constant-velocity prior alone.

    Runs inside the region: reads local files only, sends nothing, writes no ledger entry.
    """
    from fedfsd.errors import FedfsdError
    from fedfsd.modelhub.evaluate import evaluate_model
    from fedfsd.modelhub.files import jsonable

    try:
        loaded = _load(model)
        frames = _frames(data, split)
        result = evaluate_model(loaded, data, split, frames=frames)
    except FedfsdError as e:
        exit_for(e)
    if as_json:
        sys.stdout.write(json.dumps(jsonable(result), allow_nan=False) + "\n")
        return
    _print_table(result, loaded)


def _print_table(result: dict[str, Any], loaded: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    d = result["dataset"]
    t = Table(
        title=f"{loaded.path.name} on {d['region']} / {d['fleet_id']} ({d['split']} split, "
        f"{result['frames']} frames, {result['vehicles']} vehicles); lower is better"
    )
    for col in ("", "ADE (m)", "FDE@3s (m)", "accel MAE (m/s²)", "loss"):
        t.add_column(col, justify="right" if col else "left")
    for who, label in (("model", "model"), ("constant_velocity", "constant-velocity prior")):
        r = result[who]
        t.add_row(label, *(f"{r[k]:.4f}" for k in ("ade", "fde", "accel_mae", "loss")))
    con = Console()
    con.print(t)
    con.print(f"features: {d['feature_schema']}; model schema: {loaded.schema_source}")
    con.print("nothing left this machine (local files only, no ledger entry)")


def export(
    model: Path = typer.Option(..., help="Model file (.npz) to export."),
    fmt: str = typer.Option(..., "--format", help="onnx | torchscript"),
    out: Path = typer.Option(..., help="Where to write the graph (card: OUT.card.json/.md)."),
    data: Path = typer.Option(
        None, help="Dataset whose frames the parity check uses (default: random inputs)."
    ),
    split: str = typer.Option("test", help="Split of --data for the parity check."),
    evaluation: list[Path] = typer.Option(
        [], help="A `fedfsd model evaluate --json` output to put in the card (repeatable)."
    ),
    tolerance: float = typer.Option(1e-4, help="Fail when max abs parity difference exceeds it."),
) -> None:
    """Export MODEL with its prior and scaling (ONNX/TorchScript), check parity, write a card."""
    from fedfsd.errors import FedfsdError
    from fedfsd.modelhub.card import build_card, write_card
    from fedfsd.modelhub.evaluate import check_compatible
    from fedfsd.modelhub.export import export_model

    try:
        loaded = _load(model)
        frames = None
        if data is not None:
            frames = _frames(data, split)
            check_compatible(loaded, frames, str(data))
        evals = []
        for p in evaluation:
            try:
                evals.append(json.loads(p.read_text()))
            except (OSError, ValueError) as e:
                raise InputError(f"--evaluation {p}: not an evaluate --json output ({e})") from None
        info = export_model(loaded, fmt, out, frames)
        card = build_card(loaded, info, evals, out)
        js, md = write_card(card, out)
    except FedfsdError as e:
        exit_for(e)
    par = info["parity"]
    typer.echo(
        f"wrote {out} ({fmt}, {info['bytes']:,} bytes); parity vs torch on {par['frames']} "
        f"{par['source']} ({par['runtime']}): max abs diff {par['max_abs_diff']:.3g}"
    )
    typer.echo(f"card: {js} and {md}")
    if not par["max_abs_diff"] <= tolerance:
        exit_for(f"parity {par['max_abs_diff']:.3g} exceeds --tolerance {tolerance:g}", 1)


def register(app: typer.Typer) -> None:
    """Add the hand-off commands to `fedfsd model`."""
    app.command("evaluate")(evaluate)
    app.command("export")(export)
