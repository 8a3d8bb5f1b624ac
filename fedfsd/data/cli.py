"""`fedfsd data ...` commands: generate, validate and summarise fleet datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from fedfsd.errors import ExitCode, exit_for

app = typer.Typer(no_args_is_help=True)


@app.command()
def generate(
    out: Path = typer.Option(..., "--out", help="Dataset directory to create."),
    region: str = typer.Option(None, help="Built-in region profile: cn, eu, us, jp."),
    profile: Path = typer.Option(None, help="Region profile TOML (instead of --region)."),
    vehicles: int = typer.Option(200, min=1, help="Fleet size V (persistent vehicle ids)."),
    episodes: int = typer.Option(
        None, min=1, help="Simulated episodes (default 40; with --fleet-scale: automatic)."
    ),
    seed: int = typer.Option(0, help="Seed: same seed, same bytes, whatever --workers."),
    workers: int = typer.Option(None, min=1, help="Processes (default: CPU count)."),
    with_bev: bool = typer.Option(False, "--with-bev", help="Also provide BEV raster stacks."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
    fleet_scale: bool = typer.Option(
        False,
        "--fleet-scale",
        help="Short all-fleet episodes, 60 vehicles each: ~5x more vehicles per CPU-second "
        "(region's road, density, driver styles, weather unchanged; docs/data-format.md).",
    ),
    appearances: float = typer.Option(
        3.0, min=0.1, help="With --fleet-scale and no --episodes: episodes per vehicle."
    ),
    fleet_warmup: float = typer.Option(
        2.0,
        min=1.0,
        help="With --fleet-scale: warm-up seconds dropped after spawn (episode = warm-up + 6 s).",
    ),
) -> None:
    """Simulate a region's fleet and write Parquet tracks + manifest.json to --out."""
    if (region is None) == (profile is None):
        exit_for("give exactly one of --region or --profile")
    if episodes is None and not fleet_scale:
        episodes = 40
    from fedfsd.data.fleet_scale import FleetScale
    from fedfsd.data.generate import generate_dataset
    from fedfsd.data.profiles import ProfileError

    try:
        path = generate_dataset(
            profile if profile is not None else region,
            vehicles=vehicles,
            episodes=episodes,
            seed=seed,
            out=out,
            workers=workers,
            with_bev=with_bev,
            progress=True,
            overwrite=overwrite,
            fleet_scale=FleetScale(
                appearances=appearances, warmup_s=fleet_warmup, duration_s=fleet_warmup + 6.0
            )
            if fleet_scale
            else False,
        )
    except (ProfileError, FileExistsError, ValueError) as err:
        exit_for(str(err))
    _summary(path)


def _summary(path: Path) -> None:
    import json

    from rich.console import Console

    m = json.loads((path / "manifest.json").read_text())
    c = m["counts"]
    Console().print(
        f"[green]wrote[/green] {path}: region {m['region']}, fleet {m['fleet_id']}, "
        f"{m['vehicles']} vehicles, {m['episodes']} episodes, {c['fleet_rows']} fleet rows, "
        f"crash rate {c['crash_rate']:.1%}"
        + (" (fleet-scale)" if m.get("fleet_scale", {}).get("enabled") else ""),
        highlight=False,
    )
    _warn_crashes(c.get("crash_rate"))


def _warn_crashes(rate: float | None) -> None:
    from rich.console import Console

    from fedfsd.data.crashwarn import crash_warning

    if msg := crash_warning(rate):
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {msg}", highlight=False)


@app.command()
def validate(path: Path = typer.Argument(..., help="Dataset directory.")) -> None:
    """Check manifest, schema version, files, checksums, columns and values; exit 1 if bad."""
    from fedfsd.data.validate import DatasetError, validate_dataset

    try:
        m = validate_dataset(path)
    except DatasetError as err:
        exit_for(err, ExitCode.FAILED)  # the check ran and the dataset failed it
    typer.echo(f"ok: {path} ({m['region']}, {len(m['files'])} files, schema {m['schema_version']})")


@app.command()
def stats(
    path: Path = typer.Argument(..., help="Dataset directory."),
    split: str = typer.Option("all", help="train | val | test | all (feature summary)"),
) -> None:
    """Episodes, frames and vehicles per split, crash rate and a per-feature summary."""
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from fedfsd.data.feature_spec import FEATURE_NAMES, LABEL_NAMES
    from fedfsd.data.loader import load_with_split
    from fedfsd.data.splits import SPLITS, NoValidationSplit
    from fedfsd.data.validate import DatasetError

    if split not in SPLITS:
        exit_for(f"--split must be one of {', '.join(SPLITS)}")
    try:
        everything, parts = load_with_split(path, split="all")
    except DatasetError as err:
        exit_for(err)
    m = everything.manifest
    con = Console()
    per_split = Table("split", "episodes", "frames", "vehicles", title="episode-level splits")
    chosen = None
    for name in SPLITS:
        try:
            eps = parts.episodes(name)
        except NoValidationSplit:
            per_split.add_row(name, "-", "-", "- (predates validation splits)")
            if name == split:
                exit_for(f"{path}: dataset predates validation splits: regenerate it")
            continue
        sub = everything.select_episodes(eps)
        per_split.add_row(name, str(len(eps)), str(sub.n_frames), str(sub.n_vehicles))
        if name == split:
            chosen = sub
    con.print(per_split)
    fr = chosen
    if fr is None or fr.n_frames == 0:
        exit_for(f"{path}: split {split!r} has no usable frames")
    c = m.get("counts", {})
    per_v = fr.frames_per_vehicle()
    con.print(
        f"[bold]{fr.region}[/bold] ({split}): {fr.n_vehicles} vehicles, {fr.n_frames} frames, "
        f"{len(np.unique(fr.episodes))} episodes; frames/vehicle min {per_v.min()} "
        f"median {int(np.median(per_v))} max {per_v.max()}; crash rate "
        f"{c.get('crash_rate', 0.0):.1%}; rain episodes {c.get('rain_episodes', '?')}, "
        f"merge episodes {c.get('merge_episodes', '?')}",
        highlight=False,
    )
    _warn_crashes(c.get("crash_rate"))
    t = Table("name", "mean", "std", "min", "max", title="features (fixed scales) and labels")
    for names, arr in ((FEATURE_NAMES, fr.features), (LABEL_NAMES, fr.labels)):
        for j, n in enumerate(names):
            col = arr[:, j]
            t.add_row(
                n, f"{col.mean():.3f}", f"{col.std():.3f}", f"{col.min():.3f}", f"{col.max():.3f}"
            )
    con.print(t)
