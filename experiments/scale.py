"""Scale: how the cost of a round grows with the number of regions (Flower simulation engine).

    .venv/bin/python experiments/scale.py --quick          # 4 and 8 virtual regions
    .venv/bin/python experiments/scale.py                  # 4, 16, 64 virtual regions
    .venv/bin/python experiments/scale.py --tiny           # smoke run (tests)

Each size runs in its own child process: `flwr.simulation.run_simulation` with fedfsd's real
ServerApp (`fedfsd.aggregator.server_app.make_server_app`) and real region ClientApp
(`fedfsd.region.client_app.make_client_app`). In simulation a virtual node has only
`partition-id` in its node config; the ClientApp then runs partition i as the synthetic region
`sim<i>` (`make_synthetic_frames`, `sim-vehicles` × `sim-frames`, its own policy from the sim-*
run-config keys and its own ledger), with vehicle-level DP as in production.

Measured per size: rounds per minute (from the aggregator's `rounds.jsonl` round seconds;
round 1 includes Ray start-up and is reported apart), accepted updates, and peak memory: the
largest sum of resident memory (VmRSS) over the child and every process below it (Ray's GCS,
raylet and workers), sampled every 0.25 s from /proc.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer
from common import bad_option, console, machine, out_dir, rich_table, write_json

from fedfsd.deploy.processes import descendants, terminate

HERE = Path(__file__).resolve()
CRASHED = "Simulation Runtime crashed"  # Flower's log line when Ray or the backend failed


# -- memory of a process tree ----------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mib(root: int) -> tuple[float, int]:
    """(sum of VmRSS in MiB, number of processes) for `root` and everything below it."""
    pids = {root} | descendants(root)
    return sum(rss_kib(p) for p in pids) / 1024.0, len(pids)


def kill_tree(root: int) -> None:
    """SIGTERM, then SIGKILL, the child and everything below it (Ray leaves daemons behind)."""
    terminate(descendants(root) | {root}, grace=1.0)


# -- one size, in a child process ------------------------------------------------------------------
def child(n_regions: int, cfg: dict[str, Any], run_dir: Path) -> None:
    """Run the simulation for one size (called in a fresh process)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation

    from fedfsd.aggregator.server_app import make_server_app
    from fedfsd.region.client_app import make_client_app

    server_cfg = {
        "num-server-rounds": cfg["rounds"],
        "local-steps": cfg["local_steps"],
        "vehicles-per-step": cfg["vehicles_per_step"],
        "frames-per-vehicle": 4,
        "noise-multiplier": 1.0,
        "lr": 0.5,
        "min-regions": n_regions,
        "round-timeout": cfg["round_timeout"],
        "update-norm-bound": 5.0,
        "run-dir": str(run_dir / "aggregator"),
        "run-id": f"scale-{n_regions}",
    }
    client_cfg = {
        "sim-vehicles": cfg["vehicles"],
        "sim-frames": cfg["frames"],
        "sim-epsilon-budget": 1000.0,
        "sim-ledger-dir": str(run_dir / "ledgers"),
    }
    run_simulation(
        server_app=make_server_app(server_cfg),
        client_app=make_client_app(client_cfg),
        num_supernodes=n_regions,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cfg["ray_cpus"]},
        },
    )


def run_size(n: int, cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Start the child for `n` regions, sample its memory until it exits, read its rounds."""
    run_dir = folder / "work" / f"n{n}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    log = (run_dir / "simulation.log").open("w")
    argv = [sys.executable, str(HERE), "--child", str(n), "--child-cfg", json.dumps(cfg),
            "--out", str(folder)]  # fmt: skip
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip
    peak, peak_procs = 0.0, 0
    timeout = cfg["size_timeout"]
    try:
        while proc.poll() is None:
            mib, count = tree_rss_mib(proc.pid)
            if mib > peak:
                peak, peak_procs = mib, count
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{n} regions: still running after {timeout:.0f} s")
            if CRASHED in (run_dir / "simulation.log").read_text(errors="replace"):
                break  # Flower logged the crash but its ServerApp thread may wait on nodes
            time.sleep(0.25)
    finally:
        kill_tree(proc.pid)
        log.close()
    wall = time.monotonic() - t0
    rounds_path = run_dir / "aggregator" / "rounds.jsonl"
    rounds = (
        [json.loads(x) for x in rounds_path.read_text().splitlines() if x.strip()]
        if rounds_path.exists()
        else []
    )
    if proc.returncode != 0 or len(rounds) < cfg["rounds"]:
        # (Ray's node start-up has a fixed 30 s limit: on an overloaded machine it can fail.)
        tail = (run_dir / "simulation.log").read_text()[-2000:]
        raise RuntimeError(f"{n} regions: simulation failed (rc {proc.returncode}):\n{tail}")
    secs = [float(r["seconds"]) for r in rounds]
    later = secs[1:] or secs
    return {
        "regions": n,
        "wall_s": wall,
        "round_s": secs,
        "first_round_s": secs[0],
        "median_round_s": statistics.median(later),
        "rounds_per_minute": 60.0 / statistics.median(later),
        "accepted_per_round": [len(r["accepted"]) for r in rounds],
        "peak_rss_mib": peak,
        "processes_at_peak": peak_procs,
    }


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["regions"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(n, [r["rounds_per_minute"] for r in rows], marker="o")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("virtual regions")
    ax1.set_ylabel("rounds per minute (after round 1)")
    ax2.plot(n, [r["peak_rss_mib"] for r in rows], marker="o", color="tab:red")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("virtual regions")
    ax2.set_ylabel("peak resident memory, whole process tree (MiB)")
    for ax in (ax1, ax2):
        ax.set_xticks(n, [str(x) for x in n])
        ax.set_ylim(bottom=0)
    fig.suptitle("Flower simulation engine: real ServerApp + ClientApp, vehicle-level DP")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SIZES: dict[str, dict[str, Any]] = {
    "full": {"regions": [4, 16, 64, 256], "rounds": 3, "local_steps": 5},
    "quick": {"regions": [4, 8], "rounds": 3, "local_steps": 5},
    "tiny": {"regions": [2], "rounds": 2, "local_steps": 1},
}
BASE = {"vehicles": 32, "frames": 20, "vehicles_per_step": 8, "round_timeout": 600.0,
        "ray_cpus": 2, "size_timeout": 1800.0}  # fmt: skip


def main(
    quick: bool = typer.Option(False, help="4 and 8 regions"),
    tiny: bool = typer.Option(False, help="2 regions, 2 rounds: a smoke test only"),
    out: str = typer.Option(None, help="output folder (default experiments/out/scale)"),
    regions: str = typer.Option(None, help="comma-separated region counts, e.g. 4,16,64"),
    rounds: int = typer.Option(None, help="rounds per size"),
    child_n: int = typer.Option(None, "--child", hidden=True),
    child_cfg: str = typer.Option(None, "--child-cfg", hidden=True),
) -> None:
    """Run every size, print the table, write scale.json and scale.png."""
    folder = out_dir("scale", out)
    if child_n is not None:
        child(child_n, json.loads(child_cfg), folder / "work" / f"n{child_n}")
        return
    if quick and tiny:
        bad_option("choose one of --quick and --tiny")
    cfg = {**BASE, **SIZES["tiny" if tiny else "quick" if quick else "full"]}
    if regions:
        try:
            cfg["regions"] = [int(x) for x in regions.split(",")]
        except ValueError:
            bad_option(f"--regions must be integers separated by commas, got {regions!r}")
        if any(n < 1 for n in cfg["regions"]):
            bad_option("--regions must be ≥ 1")
    if rounds is not None:
        if rounds < 1:
            bad_option("--rounds must be ≥ 1")
        cfg["rounds"] = rounds
    # A SIGTERM (e.g. a test's timeout) must still run run_size's cleanup of the Ray tree.
    signal.signal(signal.SIGTERM, _terminate)
    rows = []
    for n in cfg["regions"]:
        console.print(f"simulating {n} regions …")
        try:
            rows.append(run_size(n, cfg, folder))
        except (RuntimeError, TimeoutError) as err:
            console.print(f"[red]error:[/] {err}")
            raise SystemExit(1) from None
        write_json(folder / "scale.json", {"config": cfg, "machine": machine(), "sizes": rows})
    doc = {
        "config": cfg,
        "machine": machine(),
        "sizes": rows,
        "notes": [
            "one child process per size: run_simulation with fedfsd's ServerApp and ClientApp "
            "(synthetic virtual regions sim<i>, vehicle-level DP, own ledger each)",
            "rounds per minute from the aggregator's rounds.jsonl (median of rounds after the "
            "first; the first includes Ray start-up)",
            "peak memory: max over 0.25 s samples of the summed VmRSS of the child and all its "
            "descendants (Ray GCS, raylet, workers); shared pages are counted once per process",
            f"Ray given {cfg['ray_cpus']} CPUs, 1 CPU per virtual node: at most "
            f"{cfg['ray_cpus']} regions train at once",
            "shared 2-core machine, other work running: timings are noisy",
        ],
    }
    write_json(folder / "scale.json", doc)
    plot(rows, folder / "scale.png")
    console.print(
        rich_table(
            "Flower simulation: cost against the number of regions",
            [
                "regions",
                "round 1 s",
                "median round s",
                "rounds/min",
                "accepted/round",
                "peak RSS MiB",
                "processes",
                "wall s",
            ],
            [
                [
                    r["regions"],
                    r["first_round_s"],
                    r["median_round_s"],
                    r["rounds_per_minute"],
                    min(r["accepted_per_round"]),
                    r["peak_rss_mib"],
                    r["processes_at_peak"],
                    r["wall_s"],
                ]
                for r in rows
            ],
        )  # fmt: skip
    )
    console.print(f"wrote {folder / 'scale.json'} and {folder / 'scale.png'}")


if __name__ == "__main__":
    typer.run(main)
