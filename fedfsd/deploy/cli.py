"""`fedfsd deploy`: a whole TLS federation on one machine, plus PKI/key helpers.

`fedfsd deploy --data eu=DIR --data us=DIR` starts the SuperLink, registers one key per region,
starts one SuperNode + executor per region and runs one federation (or, with --stay-up, waits
for Ctrl-C so runs can be started with `flwr`/`fedfsd aggregator run --dir RUN_DIR/...`).
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedfsd.errors import ExitCode, exit_for

app = typer.Typer(no_args_is_help=False, invoke_without_command=True)


def _pairs(values: list[str], what: str) -> dict[str, Path]:

    out: dict[str, Path] = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            exit_for(f"{what} must look like REGION=PATH, got {item!r}")
        out[name] = Path(path)
    return out


@app.callback()
def deploy(
    ctx: typer.Context,
    data: list[str] = typer.Option([], "--data", help="REGION=DATASET_DIR, once per region."),
    policy: list[str] = typer.Option(
        [], "--policy", help="REGION=POLICY_TOML (default: a conservative generated policy)."
    ),
    run_dir: Path = typer.Option(Path("runs/deploy"), help="Logs, PKI, ledgers, checkpoints."),
    rounds: int = typer.Option(3, min=1, help="Rounds of the one federation run."),
    local_steps: int = typer.Option(20, min=1, help="Local DP steps per round."),
    round_timeout: float = typer.Option(120.0, min=1, help="Seconds to wait for replies."),
    stay_up: bool = typer.Option(False, "--stay-up", help="Run nothing; stay up until Ctrl-C."),
    san: list[str] = typer.Option([], "--san", help="Extra SAN for the server certificate."),
    insecure: bool = typer.Option(False, "--insecure", help="Development only: no TLS/auth."),
) -> None:
    """Run a TLS federation of the given regions' datasets on this machine."""
    if ctx.invoked_subcommand is not None:
        return
    from fedfsd.deploy.admin import DEV_WARNING, default_policy_text, warn

    datasets = _pairs(data, "--data")
    policies = _pairs(policy, "--policy")
    if not datasets:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    if unknown := sorted(set(policies) - set(datasets)):
        exit_for(f"--policy for region(s) without --data: {', '.join(unknown)}")
    for name, path in datasets.items():
        if not (path / "manifest.json").is_file():
            exit_for(f"--data {name}: {path} is not a fedfsd dataset (no manifest.json)")
    if insecure:
        warn(DEV_WARNING)

    from fedfsd.config import PolicyError, load_policy
    from fedfsd.deploy.appbundle import app_digest
    from fedfsd.deploy.federation import LocalFederation, RegionSpec, RunFailed
    from fedfsd.deploy.processes import ProcessError

    run_dir = run_dir.resolve()
    regions: dict[str, RegionSpec] = {}
    digest = app_digest()
    for name, path in datasets.items():
        rdir = run_dir / "regions" / name
        rdir.mkdir(parents=True, exist_ok=True)
        pol = policies.get(name)
        if pol is None:
            pol = rdir / "policy.toml"
            pol.write_text(default_policy_text(path, name, [digest]))
        try:
            load_policy(pol)
        except PolicyError as err:
            exit_for(err)
        regions[name] = RegionSpec(path, pol, rdir / "ledger.jsonl")

    try:
        with LocalFederation(run_dir, regions, tls=not insecure, server_names=list(san)) as fed:
            fed.wait_connected(timeout=120)
            typer.echo(
                f"{len(regions)} regions connected to Fleet API {fed.fleet_address} "
                f"({'insecure' if insecure else 'TLS + node auth'}); "
                f"Control API {fed.control_address}; logs {fed.logs}"
            )
            if stay_up:
                typer.echo(f"FLWR_HOME={fed.flwr_home} flwr run <app> fedfsd   (Ctrl-C stops)")
                from fedfsd.deploy.admin import block_until_interrupted

                raise typer.Exit(block_until_interrupted(list(fed.group.procs.values()), "all"))
            out = run_dir / "aggregator"
            cfg = {
                "num-server-rounds": rounds,
                "local-steps": local_steps,
                "min-regions": len(regions),
                "round-timeout": round_timeout,
                "node-wait": round_timeout,
                "evaluate-timeout": round_timeout,
                "run-dir": str(out),
            }
            run_id = fed.run(cfg, timeout=rounds * 3 * round_timeout + 120)
            typer.secho(f"run {run_id} finished; results in {out}", fg=typer.colors.GREEN)
    except (ProcessError, RunFailed) as err:
        exit_for(str(err).splitlines()[0], ExitCode.FAILED)


@app.command("pki")
def make_pki(
    out: Path = typer.Option(..., help="Directory for ca.crt, server.pem and their keys."),
    san: list[str] = typer.Option([], "--san", help="DNS name/IP regions dial (repeatable)."),
) -> None:
    """Create a throwaway CA and SuperLink certificate (SANs: localhost, 127.0.0.1, --san)."""
    from fedfsd.deploy import pki

    paths = pki.create_server_pki(out, list(san))
    sans = ", ".join(pki.server_sans(paths.server_cert))
    typer.echo(f"CA {paths.ca_cert}; server certificate {paths.server_cert} for {sans}")


@app.command("keygen")
def keygen(
    name: str = typer.Argument(..., help="Region name (file name of the key pair)."),
    out: Path = typer.Option(Path("."), help="Directory for NAME and NAME.pub."),
) -> None:
    """Create a region's SuperNode key pair (P-384, OpenSSH format); register NAME.pub."""
    from fedfsd.deploy import pki

    if not name.replace("-", "").replace("_", "").isalnum():
        exit_for(f"region name must be alphanumeric (with - or _), got {name!r}")
    keys = pki.create_node_keys(out, name)
    typer.echo(f"private key {keys.private_key} (keep it in the region); public {keys.public_key}")
