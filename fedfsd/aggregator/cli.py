"""`fedfsd aggregator ...`: the global side's SuperLink and federation runs.

Heavy imports (flwr, cryptography) happen inside the commands so `fedfsd --help` stays fast.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from fedfsd.errors import ExitCode, exit_for
from fedfsd.run_config import default, help_text

app = typer.Typer(no_args_is_help=True)

_DIR_HELP = "Aggregator state directory (PKI, Flower connection, state database, runs)."


@app.command("start")
def start(
    dir: Path = typer.Option(Path(".fedfsd/aggregator"), "--dir", help=_DIR_HELP),
    fleet_address: str = typer.Option(
        "0.0.0.0:9092", help="Fleet API (gRPC) address: the ONLY port regions dial."
    ),
    control_port: int = typer.Option(
        8000, help="Control/Runtime API port (HTTPS, bound to 127.0.0.1: admin side only)."
    ),
    san: list[str] = typer.Option(
        [], "--san", help="Extra DNS name/IP regions dial, for the server certificate."
    ),
    ca: Path = typer.Option(None, help="Bring your own CA certificate (else a throwaway PKI)."),
    cert: Path = typer.Option(None, help="Server certificate (with --ca and --key)."),
    key: Path = typer.Option(None, help="Server private key (with --ca and --cert)."),
    insecure: bool = typer.Option(False, "--insecure", help="Development only: no TLS/auth."),
    allow_serverapp: list[str] = typer.Option(
        [],
        "--allow-serverapp",
        help="sha256 of a ServerApp bundle this aggregator may run (repeatable; default: "
        "fedfsd's packaged app only). Any other bundle pushed with `flwr run` is refused.",
    ),
    any_serverapp: bool = typer.Option(
        False, "--any-serverapp", help="Development only: run any pushed ServerApp bundle."
    ),
) -> None:
    """Start the SuperLink with TLS and SuperNode authentication; stays up until Ctrl-C."""
    from fedfsd.deploy import pki
    from fedfsd.deploy.admin import (
        DEV_WARNING,
        AggregatorDir,
        block_until_interrupted,
        need_file,
        parse_host_port,
        warn,
    )
    from fedfsd.deploy.control import write_connection_config
    from fedfsd.deploy.federation import superlink_argv
    from fedfsd.deploy.processes import ProcessError, ProcessGroup, flower_env, wait_for_port

    d = AggregatorDir(dir.resolve())
    fleet_host, fleet_port = parse_host_port(fleet_address, "--fleet-address")
    server = None
    if insecure:
        warn(DEV_WARNING)
    elif ca or cert or key:
        server = pki.ServerPKI(
            ca_cert=need_file(ca, "--ca"),
            ca_key=Path("/nonexistent"),
            server_cert=need_file(cert, "--cert"),
            server_key=need_file(key, "--key"),
        )
    elif (d.pki / "server.pem").is_file():
        server = pki.ServerPKI(
            d.pki / "ca.crt", d.pki / "ca.key", d.pki / "server.pem", d.pki / "server.key"
        )
    else:
        server = pki.create_server_pki(d.pki, list(san))
    if server is not None and san:
        have = set(pki.server_sans(server.server_cert))
        if missing := [s for s in san if s not in have]:
            exit_for(f"server certificate lacks SANs {missing}; delete {d.pki} to re-create it")
    d.runs.mkdir(parents=True, exist_ok=True)
    control = f"127.0.0.1:{control_port}"
    write_connection_config(d.flwr_home, control, server.ca_cert if server else None)
    from fedfsd.deploy.appbundle import app_digest

    digests = None if any_serverapp else (list(allow_serverapp) or [app_digest()])
    argv = superlink_argv(
        fleet_address, "127.0.0.1", control_port, d.database, server, digests, d.security_log
    )
    group = ProcessGroup(d.logs)
    try:
        proc = group.start("superlink", argv, env=flower_env())
        probe = "127.0.0.1" if fleet_host in ("0.0.0.0", "::") else fleet_host
        wait_for_port(probe, fleet_port, 60, proc)
        wait_for_port("127.0.0.1", control_port, 60, proc)
    except ProcessError as err:
        group.stop_all()
        exit_for(str(err).splitlines()[0])
    typer.echo(f"SuperLink up: Fleet API (gRPC{'' if insecure else '+TLS'}) {fleet_address}")
    typer.echo(f"Control API {control} (loopback only); logs {d.logs}")
    typer.echo(
        "ServerApp bundles allowed: "
        + ("any (--any-serverapp)" if digests is None else ", ".join(digests))
        + f"; refusals logged to {d.security_log}"
    )
    if server is not None:
        typer.echo(f"CA for regions: {server.ca_cert}")
        typer.echo(f"register regions: fedfsd aggregator register PUBKEY --dir {d.root}")
    code = block_until_interrupted([proc], "the SuperLink")
    group.stop_all()
    raise typer.Exit(code)


_SCHEDULE_NOTE = "Default: from --plan, else the run config's default"


def _scheduled(key: str) -> str:
    """Help of a schedule flag: what it is, then where its default comes from (and the value)."""
    return f"{help_text(key)} {_SCHEDULE_NOTE} ({default(key)})."


def schedule_config(plan: Path | None, explicit: dict[str, object]) -> dict[str, object]:
    """The schedule keys to send: the plan file's, overridden by flags given explicitly (not None).

    Keys neither sets are left out, so the app's run-config defaults apply.
    """
    from fedfsd.aggregator.settings import SettingsError, read_plan

    schedule: dict[str, object] = {}
    if plan is not None:
        try:
            schedule = read_plan(plan.resolve())
        except SettingsError as err:
            raise SettingsError(str(err).replace("run config plan", "--plan")) from None
    schedule.update({k: v for k, v in explicit.items() if v is not None})
    return schedule


@app.command("run")
def run(
    dir: Path = typer.Option(Path(".fedfsd/aggregator"), "--dir", help=_DIR_HELP),
    plan: Path = typer.Option(
        None,
        "--plan",
        help="A `fedfsd privacy plan --json` file: sets rounds, local steps, vehicles per step, "
        "σ, lr, clip norm and frames per vehicle. Explicit flags below override the plan.",
    ),
    rounds: int = typer.Option(None, min=1, help=_scheduled("num-server-rounds")),
    min_regions: int = typer.Option(default("min-regions"), min=1, help=help_text("min-regions")),
    round_timeout: float = typer.Option(
        default("round-timeout"), min=1, help=help_text("round-timeout")
    ),
    node_wait: float = typer.Option(default("node-wait"), min=1, help=help_text("node-wait")),
    local_steps: int = typer.Option(None, min=1, help=_scheduled("local-steps")),
    lr: float = typer.Option(None, min=0, help=_scheduled("lr")),
    noise_multiplier: float = typer.Option(None, min=0, help=_scheduled("noise-multiplier")),
    clip_norm: float = typer.Option(None, min=0, help=_scheduled("clip-norm")),
    vehicles_per_step: int = typer.Option(None, min=1, help=_scheduled("vehicles-per-step")),
    frames_per_vehicle: int = typer.Option(None, min=1, help=_scheduled("frames-per-vehicle")),
    model: str = typer.Option(default("model"), help=help_text("model")),
    initial_model: Path = typer.Option(
        None,
        "--initial-model",
        help="Round-0 weights (.npz, state_dict names; e.g. pretrained on public data). Its "
        "sha256 is recorded in the checkpoint, rounds.jsonl and every region's ledger.",
    ),
    server_optimizer: str = typer.Option(
        default("server-optimizer"), help=help_text("server-optimizer")
    ),
    server_momentum: float = typer.Option(
        default("server-momentum"), min=0, max=0.999, help=help_text("server-momentum")
    ),
    server_lr: float = typer.Option(default("server-lr"), min=0, help=help_text("server-lr")),
    evaluate_every: int = typer.Option(
        default("evaluate-every"), min=1, help=help_text("evaluate-every")
    ),
    update_norm_bound: float = typer.Option(
        default("update-norm-bound"), min=0, help=help_text("update-norm-bound")
    ),
    run_dir: Path = typer.Option(None, help="Checkpoints/metrics (default: DIR/runs/<time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN_DIR's last checkpoint."),
    app_dir: Path = typer.Option(None, "--app", help="Flower app dir (default: packaged app)."),
    region_keys: Path = typer.Option(
        None, help="JSON/TOML mapping region -> Ed25519 public key (docs/deploy.md)."
    ),
    secure_aggregation: bool = typer.Option(
        False, "--secure-aggregation", help=help_text("secure-aggregation")
    ),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait for the run to finish."),
    timeout: float = typer.Option(3600.0, help="Seconds to wait with --wait."),
) -> None:
    """Start a federation run on the running SuperLink (`flwr run` underneath)."""
    import uuid

    from fedfsd.aggregator.outcome import SUMMARY_JSON, report_run, write_run_ids
    from fedfsd.aggregator.settings import SettingsError
    from fedfsd.aggregator.status import remember_run
    from fedfsd.deploy.admin import AggregatorDir, warn
    from fedfsd.deploy.appbundle import PACKAGED_APP_DIR
    from fedfsd.deploy.control import ControlClient, RunFailed

    explicit: dict[str, object] = {
        "num-server-rounds": rounds,
        "local-steps": local_steps,
        "lr": lr,
        "noise-multiplier": noise_multiplier,
        "clip-norm": clip_norm,
        "vehicles-per-step": vehicles_per_step,
        "frames-per-vehicle": frames_per_vehicle,
    }
    try:
        schedule = schedule_config(plan, explicit)
    except SettingsError as err:
        exit_for(err)
    if initial_model is not None and not initial_model.is_file():
        exit_for(f"--initial-model: {initial_model} is not a file")
    if secure_aggregation and region_keys is None:
        exit_for("--secure-aggregation needs --region-keys (the regions' long-term keys)")
    d = AggregatorDir(dir.resolve())
    d.require_started()
    if resume and run_dir is None:
        exit_for("--resume needs the --run-dir of the interrupted run")
    if run_dir is None:
        run_dir = d.runs / time.strftime("%Y%m%d-%H%M%S")
    run_dir = run_dir.resolve()
    if resume and not run_dir.is_dir():
        exit_for(f"--resume: {run_dir} does not exist")
    from fedfsd.aggregator import checkpoint as ck

    fedfsd_run_id = uuid.uuid4().hex[:12]  # the id regions record; shown beside Flower's
    if resume:  # refuse here, before `flwr run`, what the ServerApp would refuse later
        try:
            if (prev := ck.load_checkpoint(run_dir)) is None:
                exit_for(
                    f"--resume: {run_dir / ck.CHECKPOINT} is missing; refusing to start a new "
                    "run there (it would spend the regions' privacy budget again)"
                )
            fedfsd_run_id = prev.run_id
        except ck.CheckpointError as err:
            exit_for(f"--resume: {err}")
    elif existing := ck.holds_a_run(run_dir):
        exit_for(
            f"{run_dir} already holds a run ({', '.join(existing)}); "
            "use --resume or a new --run-dir"
        )
    app_path = (app_dir or PACKAGED_APP_DIR).resolve()
    if not (app_path / "pyproject.toml").is_file():
        exit_for(f"--app: {app_path} has no pyproject.toml")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "min-regions": min_regions,
        "round-timeout": round_timeout,
        "node-wait": node_wait,
        "evaluate-timeout": round_timeout,
        "evaluate-every": evaluate_every,
        **schedule,
        "model": model,
        "server-optimizer": server_optimizer,
        "server-momentum": server_momentum,
        "server-lr": server_lr,
        "update-norm-bound": update_norm_bound,
        "run-dir": str(run_dir),
        "run-id": fedfsd_run_id,
        "resume": resume,
    }
    if region_keys is not None:
        if not region_keys.is_file():
            exit_for(f"--region-keys: {region_keys} does not exist")
        cfg["region-keys"] = str(region_keys.resolve())
    if secure_aggregation:
        cfg["secure-aggregation"] = True
    if initial_model is not None:
        cfg["initial-model"] = str(initial_model.resolve())
    from fedfsd.aggregator.settings import parse_settings

    try:  # refuse here, with one line, what the ServerApp would refuse later
        settings = parse_settings(cfg)
    except SettingsError as err:
        exit_for(err)
    if settings.initial_model:
        from fedfsd.aggregator.initial_model import InitialModelError
        from fedfsd.aggregator.server_app import initial_model as load_round0

        try:
            _, sha = load_round0(settings)
        except InitialModelError as err:
            exit_for(err)
        typer.echo(f"round-0 model {settings.initial_model} (sha256 {sha})")
    import tomllib

    try:
        declared = tomllib.loads((app_path / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
            "config"
        ]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        exit_for(f"--app: {app_path}/pyproject.toml has no readable [tool.flwr.app.config] ({err})")
    if dropped := sorted(set(cfg) - set(declared)):  # `flwr run` refuses undeclared keys
        warn(f"{app_path} does not declare {', '.join(dropped)}: not sent")
    cfg = {k: v for k, v in cfg.items() if k in declared}
    control = ControlClient(d.flwr_home, d.root)
    try:
        run_id = control.start_run(cfg, app_path)
        write_run_ids(run_dir, fedfsd_run_id, run_id)
        remember_run(d.root, run_id, fedfsd_run_id, run_dir)
        typer.echo(
            f"started run {run_id} (fedfsd run id {fedfsd_run_id}: ledgers and "
            f"`fedfsd privacy report --run`); run dir {run_dir}"
        )
        if not wait:
            return
        status = control.wait_run(run_id, timeout, poll=2.0)
    except RunFailed as err:
        exit_for(str(err).splitlines()[0] if str(err) else "run failed", ExitCode.FAILED)
    if not report_run(run_dir, status):
        exit_for(
            f"run {run_id} (fedfsd {fedfsd_run_id}) ended {status} with fewer successful rounds "
            f"than asked; see {run_dir / SUMMARY_JSON}, {d.logs} and "
            f"`FLWR_HOME={d.flwr_home} flwr log {run_id} fedfsd --show`",
            ExitCode.FAILED,
        )
    typer.secho(f"run {run_id} {status}; results in {run_dir}", fg=typer.colors.GREEN)


@app.command("register")
def register(
    public_key: Path = typer.Argument(..., help="The region's public key (OpenSSH, NIST EC)."),
    dir: Path = typer.Option(
        Path(".fedfsd/aggregator"), "--dir", help="The aggregator's state directory."
    ),
) -> None:
    """Allow a region's SuperNode key on the SuperLink (formerly `fedfsd region register`)."""
    from fedfsd.deploy.admin import AggregatorDir, need_file
    from fedfsd.deploy.control import ControlClient, ControlError

    d = AggregatorDir(dir.resolve())
    d.require_started()
    key = need_file(public_key, "PUBLIC_KEY")
    try:
        from fedfsd.flower.flwr_cli import load_node_public_key

        load_node_public_key(key)
    except (Exception, SystemExit) as err:  # flwr exits on a bad key
        exit_for(f"{key}: not an OpenSSH NIST-curve EC public key ({err})")
    try:
        node_id = ControlClient(d.flwr_home, d.root).register(key)
    except ControlError as err:
        exit_for(str(err).splitlines()[0], ExitCode.USAGE)
    from fedfsd.aggregator.status import remember_region
    from fedfsd.flower.node_refusals import remember_key

    remember_region(d.root, node_id, key.name.removesuffix(".pub"))
    # so that a refusal of this key, once unregistered, names its region in security.jsonl
    remember_key(d.root, key, key.name.removesuffix(".pub"))
    typer.secho(f"registered {key.name}: SuperNode id {node_id}", fg=typer.colors.GREEN)


@app.command("status")
def status(
    dir: Path = typer.Option(Path(".fedfsd/aggregator"), "--dir", help=_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Regions by name (registered, connected), the current run and round, ε per region."""
    import json

    from rich.console import Console

    from fedfsd.aggregator.status import NoAggregator, collect, render
    from fedfsd.deploy.admin import AggregatorDir
    from fedfsd.deploy.control import ControlClient

    d = AggregatorDir(dir.resolve())
    try:
        doc = collect(d.root, ControlClient(d.flwr_home, d.root))
    except NoAggregator as err:
        exit_for(str(err), ExitCode.FAILED)
    if as_json:
        typer.echo(json.dumps(doc, indent=1, sort_keys=True))
    else:
        Console(width=160).print(render(doc))
