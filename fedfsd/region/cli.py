"""`fedfsd region ...` commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedfsd.errors import ExitCode, exit_for
from fedfsd.run_config import LOCAL_TRIAL, help_text

if TYPE_CHECKING:  # the CLI imports torch, Flower and the data side only when a command runs
    from rich.console import Console

    from fedfsd.config import RegionPolicy, TrainRequest
    from fedfsd.data.vehicles import VehicleFrames
    from fedfsd.deploy.processes import ProcessGroup
    from fedfsd.privacy.local_round import LocalRoundResult

app = typer.Typer(no_args_is_help=True)

WORKERS_HELP = (
    "Training processes (one thread each); vehicles are sharded across them, one worker "
    "samples and adds the noise, so the guarantee and the ledger line are one worker's."
)
DEVICE_HELP = "cpu, cuda or cuda:N (refused when no CUDA device is present)."


def _check_device(device: str, workers: int, *, private: bool = True) -> None:
    """--device / --workers refused before any data is loaded (exit 2)."""
    from fedfsd.privacy.device import check_device

    try:
        check_device(device, workers, private=private)
    except ValueError as e:
        exit_for(e)


@app.command("train-local")
def train_local(
    data: Path = typer.Option(None, help="Fleet dataset directory (its train split is used)."),
    policy: Path = typer.Option(..., help="The region's policy TOML."),
    ledger: Path = typer.Option(..., help="The region's privacy ledger (created if absent)."),
    steps: int = typer.Option(..., help="Local steps (capped by the policy's max_local_steps)."),
    model: str = typer.Option(LOCAL_TRIAL.model, help=help_text("model")),
    non_private: bool = typer.Option(
        False, "--non-private", help="Baseline WITHOUT differential privacy (labelled everywhere)."
    ),
    run_id: str = typer.Option("local", help="Run id recorded on the ledger."),
    round_idx: int = typer.Option(
        None, "--round", help="Round index (default: the next unused one for this run)."
    ),
    lr: float = typer.Option(LOCAL_TRIAL.lr, help=help_text("lr")),
    noise_multiplier: float = typer.Option(
        LOCAL_TRIAL.noise_multiplier, help=help_text("noise-multiplier")
    ),
    clip_norm: float = typer.Option(LOCAL_TRIAL.clip_norm, help=help_text("clip-norm")),
    vehicles_per_step: int = typer.Option(
        LOCAL_TRIAL.vehicles_per_step, help=help_text("vehicles-per-step")
    ),
    frames_per_vehicle: int = typer.Option(
        LOCAL_TRIAL.frames_per_vehicle, help=help_text("frames-per-vehicle")
    ),
    init: Path = typer.Option(None, help="Start from these weights (.npz); default: fresh model."),
    out: Path = typer.Option(None, help="Write the released weights here (.npz)."),
    seed: int = typer.Option(None, help="Fix sampling and noise seeds (tests only: not secret)."),
    synthetic: int = typer.Option(
        None, hidden=True, help="Use a synthetic in-memory fleet of N vehicles (tests, demos)."
    ),
    workers: int = typer.Option(1, help=WORKERS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Train one local round outside any federation; print ε spent and left."""
    from rich.console import Console

    _check_device(device, workers, private=not non_private)

    fields = {
        "local_steps": steps,
        "lr": lr,
        "noise_multiplier": noise_multiplier,
        "clip_norm": clip_norm,
        "vehicles_per_step": vehicles_per_step,
        "frames_per_vehicle": frames_per_vehicle,
        "model": model,
    }
    pol, request = _trial_request(policy, steps, fields)
    frames = _trial_frames(data, synthetic, model, pol.region)
    weights = _start_weights(init, model, frames, data)
    if round_idx is None:
        round_idx = _next_round(ledger, run_id)
    con = Console()
    if non_private:
        con.print("[bold red]NON-PRIVATE baseline: no differential privacy, ε = ∞[/]")
    res = _trial_round(
        con,
        frames,
        pol,
        ledger,
        weights,
        request,
        run_id,
        round_idx,
        private=not non_private,
        seed=seed,
        workers=workers,
        device=device,
    )
    if out is not None:
        import numpy as np

        np.savez(out, allow_pickle=False, **res.new_weights)
    _print_trial(con, res, run_id, round_idx, pol.delta)


def _trial_request(policy: Path, steps: int, fields: dict) -> tuple[RegionPolicy, TrainRequest]:
    """The region's policy and the request; a bad flag or policy stops with exit 2."""
    from pydantic import ValidationError

    from fedfsd.config import PolicyError, TrainRequest, load_policy
    from fedfsd.models import MODEL_NAMES

    if fields["model"] not in MODEL_NAMES:
        exit_for(f"--model must be one of {', '.join(MODEL_NAMES)}, not {fields['model']!r}")
    if steps < 1:
        exit_for("--steps must be >= 1")
    try:
        return load_policy(policy), TrainRequest(**fields)
    except PolicyError as e:
        exit_for(e)
    except ValidationError as e:
        err = e.errors()[0]
        exit_for(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}")


def _trial_frames(
    data: Path | None, synthetic: int | None, model: str, region: str
) -> VehicleFrames:
    """The training frames: the dataset's train split, or a synthetic fleet (tests, demos)."""
    if synthetic is not None:
        from fedfsd.data.testing import make_synthetic_frames

        return make_synthetic_frames(
            synthetic, 20, seed=0, with_bev=model == "bev_cnn", region=region
        )
    if data is None:
        exit_for("--data is required")
    from fedfsd.data.validate import DatasetError
    from fedfsd.data.vehicles import load_vehicle_frames

    try:
        frames = load_vehicle_frames(data, split="train")
    except (DatasetError, OSError, ValueError) as e:
        exit_for(f"{data}: {e}")
    return frames


def _start_weights(init: Path | None, model: str, frames: VehicleFrames, data: Path | None) -> dict:
    """The weights the round starts from: --init, or a fresh registry model."""
    import numpy as np

    from fedfsd.models import build_model, get_weights

    if model == "bev_cnn" and frames.bev is None:
        exit_for(f"{data}: --model bev_cnn needs a dataset generated --with-bev")
    if init is not None:
        try:
            with np.load(init) as z:
                return {k: z[k].astype(np.float32) for k in z.files}
        except (OSError, ValueError) as e:
            exit_for(f"{init}: cannot read weights: {e}")
    kw = (
        {"in_channels": int(frames.bev.shape[1])}
        if model == "bev_cnn" and frames.bev is not None
        else {}
    )
    return get_weights(build_model(model, frames.features.shape[1], frames.labels.shape[1], **kw))


def _next_round(ledger: Path, run_id: str) -> int:
    """The next round index this run has not released on the ledger."""
    from fedfsd.privacy.ledger import Ledger, LedgerError

    lg = Ledger(ledger)
    try:
        done = [r["round"] for r in lg.releases() if r["run_id"] == run_id] if lg.exists() else []
    except LedgerError as e:
        exit_for(e)
    return max(done, default=-1) + 1


def _trial_round(
    con: Console,
    frames: VehicleFrames,
    pol: RegionPolicy,
    ledger: Path,
    weights: dict,
    request: TrainRequest,
    run_id: str,
    round_idx: int,
    *,
    private: bool,
    seed: int | None,
    workers: int = 1,
    device: str = "cpu",
) -> LocalRoundResult:
    """run_local_round behind a progress bar; a refusal or failure stops with its exit code."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from fedfsd.config import PolicyError
    from fedfsd.privacy.accounting import AccountantError
    from fedfsd.privacy.distributed import WorkerFailed
    from fedfsd.privacy.ledger import LedgerError
    from fedfsd.privacy.local_round import BudgetExceeded, run_local_round

    try:
        with Progress(
            TextColumn("[bold]round {task.fields[rnd]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            console=con,
            transient=True,
        ) as prog:
            total = min(request.local_steps, pol.max_local_steps)
            task = prog.add_task("train", total=total, rnd=round_idx)
            return run_local_round(
                frames,
                pol,
                ledger,
                weights,
                request,
                run_id,
                round_idx,
                request.model,
                private=private,
                seed=seed,
                progress=lambda s, n: prog.update(task, completed=s),
                workers=workers,
                device=device,
            )
    except (BudgetExceeded, PolicyError, LedgerError, AccountantError, ValueError) as e:
        exit_for(e)
    except WorkerFailed as e:  # nothing was recorded or released
        exit_for(e)


def _print_trial(
    con: Console, res: LocalRoundResult, run_id: str, round_idx: int, delta: float
) -> None:
    """What left (or that nothing did) and the ε spent and left."""
    what = "re-used cached release (no new spend)" if res.cached else "released"
    if res.private:
        con.print(
            f"{what}: run {run_id} round {round_idx}, {res.steps} steps, "
            f"q = {res.sample_rate:.4g}, "
            f"σ = {res.params.noise_multiplier:g}, C = {res.params.clip_norm:g}, "
            f"‖Δ‖ = {res.update_norm:.3f}"
        )
        con.print(
            f"ε spent = {res.epsilon:.4f} (PRV; RDP {res.epsilon_rdp:.4f}) at δ = {delta:g}; "
            f"budget {res.budget:g}; ε left = {res.epsilon_left:.4f}"
        )
    else:
        con.print(
            f"{what} (NON-PRIVATE): run {run_id} round {round_idx}, {res.steps} steps; "
            "ε spent = ∞, ε left = n/a"
        )


@app.command("keygen")
def keygen(
    ledger: Path = typer.Option(..., help="The region's privacy ledger (the key goes next to it)."),
    key: Path = typer.Option(None, help="Key file (default: LEDGER.key)."),
) -> None:
    """Create the region's Ed25519 ledger/manifest signing key (0600) and print its public key.

    Send the public key (LEDGER.key.pub, or the hex printed) to the global team out of band;
    they list it in the aggregator's `region-keys` file (docs/deploy.md).
    """
    from fedfsd.privacy import signing

    path = key or signing.ledger_key_path(ledger)
    try:
        k = signing.generate_key(path)
    except (signing.SigningKeyError, OSError) as e:
        exit_for(e)
    typer.echo(f"private key {path} (mode 0600; never leaves the region)")
    typer.echo(f"public key  {signing.public_path(path)}")
    typer.echo(f"public key (hex) {signing.public_hex(k.public_key())}")


@app.command("finetune")
def finetune(
    data: Path = typer.Option(
        ..., help="The region's fleet dataset (train split trains, val selects)."
    ),
    model: Path = typer.Option(..., help="The received global model (.npz of weights)."),
    ledger: Path = typer.Option(
        ..., help="The region's ledger: the personalised model is recorded there."
    ),
    out: Path = typer.Option(..., help="Where to write the personalised model (.npz, plus .json)."),
    max_steps: int = typer.Option(2000, min=0, help="At most this many non-private steps."),
    eval_every: int = typer.Option(100, min=1, help="Score on validation episodes every K steps."),
    lr: float = typer.Option(0.1, min=0.0, help="Learning rate (plain SGD)."),
    vehicles_per_step: int = typer.Option(64, min=1, help="Expected vehicles per step (Poisson)."),
    frames_per_vehicle: int = typer.Option(8, min=1, help="K: frames of one vehicle per step."),
    patience: int = typer.Option(
        0, min=0, help="Stop after this many evaluations without improvement (0: never)."
    ),
    seed: int = typer.Option(None, help="Fix the vehicle sampling seed (reproducible runs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Personalise the global model on this region's data WITHOUT DP; it never leaves the region.

    Trains on the TRAIN split, keeps the checkpoint with the best FDE@3s on the VALIDATION split
    (the received model is candidate 0, so the result is never worse there), writes OUT (.npz)
    and OUT.json atomically, and records the model in the region's ledger as not released: the
    egress guard then refuses to send it. Test episodes are never read.
    """
    import json
    import sys

    from rich.console import Console

    try:
        from fedfsd.data.validate import DatasetError
        from fedfsd.data.vehicles import load_vehicle_frames
        from fedfsd.modelhub.display import SelectionView
        from fedfsd.modelhub.files import load_weights
        from fedfsd.privacy.ledger import Ledger, LedgerError
        from fedfsd.region.finetune import (
            describe,
            finetune_model,
            record_personalised,
            write_personal_model,
        )
    except ImportError as e:  # pragma: no cover - broken install
        exit_for(f"cannot import training code: {e}")

    try:
        received = load_weights(model)
    except (OSError, ValueError) as e:
        exit_for(f"{model}: cannot read weights: {e}")
    arch = "mlp" if any(k.startswith("net.") for k in received) else "bev_cnn"
    lg = Ledger(ledger)
    if not lg.exists():
        exit_for(
            f"{ledger}: no such ledger; give the region's own ledger (the one its egress path "
            "reads) so that the personalised model is recorded and never released"
        )
    try:
        frames_train = load_vehicle_frames(data, split="train")
        frames_val = load_vehicle_frames(data, split="val")
    except (DatasetError, OSError, ValueError) as e:
        exit_for(f"{data}: {e}")
    try:
        head = lg.header
    except LedgerError as e:
        exit_for(e)
    if (head["region"], head["fleet_id"]) != (frames_train.region, frames_train.fleet_id):
        exit_for(
            f"{ledger}: ledger is for {head['region']}/{head['fleet_id']}, the dataset is "
            f"{frames_train.region}/{frames_train.fleet_id}"
        )

    con = Console(stderr=as_json)
    con.print(
        "[bold yellow]personalising WITHOUT differential privacy: the result stays in this "
        "region (recorded in its ledger, refused by its egress guard)[/]"
    )
    view = SelectionView(con, max_steps, f"finetune {frames_train.region}")
    try:
        with view.running():
            res = finetune_model(
                frames_train,
                frames_val,
                received,
                arch,
                max_steps=max_steps,
                eval_every=eval_every,
                lr=lr,
                vehicles_per_step=vehicles_per_step,
                frames_per_vehicle=frames_per_vehicle,
                patience=patience or None,
                seed=seed,
                on_step=view.on_step,
                on_eval=view.on_eval,
            )
    except ValueError as e:
        exit_for(e)
    desc = describe(res, frames_train, frames_val)
    desc["dataset"] = str(data.resolve())
    desc["base_model_file"] = str(model.resolve())
    try:
        side = write_personal_model(out, res, desc)
        rec = record_personalised(ledger, desc, out)
    except (OSError, LedgerError) as e:
        exit_for(e)
    if as_json:
        sys.stdout.write(json.dumps({**desc, "sidecar": str(side), "ledger_time": rec["time"]}))
        sys.stdout.write("\n")
        return
    con.print(view.table(res.steps))
    what = (
        f"selected step {res.steps}"
        if res.improved
        else "no step beat the received model on validation: kept it unchanged"
    )
    con.print(
        f"val FDE@3s {res.val_fde_before:.3f} m → {res.val_fde_after:.3f} m ({what}; "
        f"{res.steps_run} steps run{', stopped early' if res.stopped_early else ''})"
    )
    con.print(f"wrote {out} and {side}; recorded in {ledger} as personalised, NOT released")


# ---- deployment: a region's SuperNode + executor (deploy engineer) ----


@app.command("start")
def start(
    superlink: str = typer.Option(..., help="The aggregator's Fleet API, HOST:PORT."),
    ca: Path = typer.Option(None, help="CA certificate that signed the SuperLink's certificate."),
    key: Path = typer.Option(None, help="This region's private key (its public key registered)."),
    policy: Path = typer.Option(..., help="This region's policy TOML (region-owned)."),
    data: Path = typer.Option(..., help="This region's fleet dataset directory."),
    ledger: Path = typer.Option(..., help="This region's privacy ledger (JSONL)."),
    runtime_port: int = typer.Option(9094, help="Local Runtime API port (127.0.0.1 only)."),
    clientapp: str = typer.Option(
        "fedfsd.region.client_app:app", help="Locally installed ClientApp (module:attr)."
    ),
    log_dir: Path = typer.Option(None, help="Logs (default: next to the ledger)."),
    insecure: bool = typer.Option(False, "--insecure", help="Development only: no TLS/auth."),
    workers: int = typer.Option(1, help=WORKERS_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Run this region: a SuperNode (process isolation) + the region's own executor."""
    from fedfsd.deploy.admin import block_until_interrupted
    from fedfsd.deploy.processes import ProcessError, ProcessGroup

    _check_device(device, workers)
    pol_path, pol = _start_policy(superlink, policy, data)
    _start_checks(ledger, data, pol, runtime_port)
    ca_path, key_path = _start_credentials(superlink, ca, key, insecure, pol.region)
    ledger, logs = _start_dirs(ledger, log_dir)
    node_cfg = {
        "region": pol.region,
        "data-dir": str(data.resolve()),
        "policy": str(pol_path),
        "ledger": str(ledger),
        **training_node_config(workers, device),
    }
    group = ProcessGroup(logs)
    try:
        procs = _start_processes(
            group, superlink, runtime_port, node_cfg, ca_path, key_path, pol_path, clientapp, logs
        )
    except ProcessError as err:
        group.stop_all()
        exit_for(f"region {pol.region}: {_start_failure(err)} (logs {logs})", ExitCode.FAILED)
    typer.secho(
        f"region {pol.region} connected to {superlink}; executor serves {clientapp} "
        f"(allow-list: {len(pol.allowed_app_digests) or 'any'} digest(s)); logs {logs}",
        fg=typer.colors.GREEN,
    )
    code = block_until_interrupted(procs, f"region {pol.region}")
    group.stop_all()
    raise typer.Exit(code)


def training_node_config(workers: int, device: str) -> dict[str, int | str]:
    """The node-config keys the ClientApp trains with (absent at the defaults: one CPU worker)."""
    cfg: dict[str, int | str] = {}
    if workers != 1:
        cfg["workers"] = workers
    if device != "cpu":
        cfg["device"] = device
    return cfg


def _start_policy(superlink: str, policy: Path, data: Path) -> tuple[Path, RegionPolicy]:
    """The checked --superlink, the region's policy file and policy, and a dataset (exit 2)."""
    from fedfsd.config import PolicyError, load_policy
    from fedfsd.deploy.admin import need_file, parse_host_port

    parse_host_port(superlink, "--superlink")
    pol_path = need_file(policy, "--policy")
    try:
        pol = load_policy(pol_path)
    except PolicyError as err:
        exit_for(err)
    if not (data / "manifest.json").is_file():
        exit_for(f"--data: {data} is not a fedfsd dataset (no manifest.json)")
    return pol_path, pol


def _start_checks(ledger: Path, data: Path, pol: RegionPolicy, runtime_port: int) -> None:
    """The same ledger/dataset refusal as train-local, and a taken runtime port named."""
    from fedfsd.errors import FedfsdError
    from fedfsd.region.startcheck import check_ledger_matches, check_runtime_port

    try:
        check_ledger_matches(ledger, data, pol)
        check_runtime_port(runtime_port)
    except FedfsdError as err:
        exit_for(f"region {pol.region}: {err}", err.exit_code)


def _start_credentials(
    superlink: str, ca: Path | None, key: Path | None, insecure: bool, region: str
) -> tuple[Path | None, Path | None]:
    """The CA and node key; the SuperLink's certificate is probed now, not after a 120 s wait."""
    from fedfsd.deploy.admin import DEV_WARNING, need_file, warn

    if insecure:
        warn(DEV_WARNING)
        return None, None
    ca_path, key_path = need_file(ca, "--ca"), need_file(key, "--key")
    from fedfsd.deploy.tlsprobe import tls_problem

    if problem := tls_problem(superlink, ca_path):
        exit_for(f"region {region}: {problem}", ExitCode.FAILED)
    return ca_path, key_path


def _start_dirs(ledger: Path, log_dir: Path | None) -> tuple[Path, Path]:
    """The ledger's directory and the log directory, created (exit 2 when they cannot be)."""
    ledger = ledger.resolve()
    logs = (log_dir or ledger.parent / "logs").resolve()
    try:
        ledger.parent.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        exit_for(f"--ledger/--log-dir: cannot create {err.filename}: {err.strerror}")
    return ledger, logs


def _start_processes(
    group: ProcessGroup,
    superlink: str,
    runtime_port: int,
    node_cfg: dict,
    ca_path: Path | None,
    key_path: Path | None,
    pol_path: Path,
    clientapp: str,
    logs: Path,
) -> list:
    """The SuperNode, then the region's own executor; returns once the SuperLink accepted it."""
    from fedfsd.deploy.federation import executor_argv, supernode_argv
    from fedfsd.deploy.processes import flower_env, wait_for_port, wait_until

    node = group.start(
        "supernode",
        supernode_argv(superlink, runtime_port, node_cfg, ca_path, key_path),
        env=flower_env(),
    )
    wait_for_port("127.0.0.1", runtime_port, 60, node)
    execu = group.start(
        "executor",
        executor_argv(runtime_port, pol_path, clientapp, None, logs / "decisions.jsonl"),
        env=flower_env(),
    )
    wait_until(lambda: "SuperNode ID:" in node.log_tail(100_000), 120, "the SuperLink", node)
    return [node, execu]


def _start_failure(err: Exception) -> str:
    """One line saying why the region did not come up (the SuperLink's refusal named as such)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if any("Failed to activate SuperNode" in ln for ln in lines):
        return (
            "the SuperLink refused this region (Failed to activate SuperNode: "
            "is its public key registered with `fedfsd aggregator register`?)"
        )
    return next((ln for ln in lines if "Failed to" in ln), lines[0] if lines else "failed")
