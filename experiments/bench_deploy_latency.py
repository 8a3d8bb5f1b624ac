"""Round latency of the local TLS deployment with trivial work (2 regions).

Runs tests/apps/deploy_tiny (ServerApp: one train message per region per round, w ← mean(w+1);
ClientApp: adds 1) over the real stack: SuperLink with TLS + SuperNode auth, SuperNodes in
process isolation, fedfsd's region executors. Prints one table row per round and the median, and
compares the SuperNode's stock 3 s idle poll with fedfsd's launcher (0.5 s).

    .venv/bin/python experiments/bench_deploy_latency.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from fedfsd.deploy import federation
from fedfsd.deploy.federation import LocalFederation, RegionSpec

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "apps" / "deploy_tiny"
POLICY = (
    'region = "{r}"\nepsilon_budget = 8.0\ndelta = 1e-6\nmin_noise_multiplier = 0.8\n'
    "max_clip_norm = 1.0\nupdate_norm_bound = 5.0\n"
)


def measure(rounds: int, fast_poll: bool, tmp: Path) -> list[float]:
    """Per-round seconds as the ServerApp measured them (send → all replies back)."""
    regions = {}
    for r in ("eu", "us"):
        pol = tmp / f"{r}.toml"
        pol.write_text(POLICY.format(r=r))
        regions[r] = RegionSpec(
            tmp, pol, tmp / f"{r}.jsonl", clientapp="deploy_tiny_app:client", app_path=TINY
        )
    original = federation.supernode_argv
    federation.supernode_argv = lambda *a, **k: original(*a, **{**k, "fast_poll": fast_poll})
    try:
        with LocalFederation(tmp / f"fed-{fast_poll}", regions) as fed:
            fed.wait_connected(timeout=120)
            out = tmp / f"result-{fast_poll}.json"
            fed.run(
                {"num-server-rounds": rounds, "result-path": str(out)},
                timeout=60 + 30 * rounds,
                app_dir=TINY,
            )
    finally:
        federation.supernode_argv = original
    return [r["seconds"] for r in json.loads(out.read_text())["rounds"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-stock", action="store_true", help="only the fast-poll launcher")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for fast in [True] if args.skip_stock else [False, True]:
            secs = measure(args.rounds, fast, Path(d))
            rows.append(("fedfsd launcher (0.5 s)" if fast else "stock SuperNode (3 s)", secs))
    load = os.getloadavg()[0]
    print(f"\nround latency, 2 regions, trivial work, TLS + node auth (load avg {load:.1f}, "
          f"{os.cpu_count()} CPUs)")  # fmt: skip
    print("| SuperNode poll | rounds (s) | median (s) |\n|---|---|---|")
    for name, secs in rows:
        print(f"| {name} | {' '.join(f'{s:.2f}' for s in secs)} | {statistics.median(secs):.2f} |")


if __name__ == "__main__":
    main()
