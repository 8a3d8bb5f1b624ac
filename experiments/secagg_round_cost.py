"""A plain round against a secure-aggregation round on the same 3-region TLS federation.

    .venv/bin/python experiments/secagg_round_cost.py      # ≈ 4 min on 2 cores

Starts the real deployment (`fedfsd.deploy.federation.LocalFederation`: SuperLink with TLS and
SuperNode authentication, a SuperNode and the region's own executor per region) on three tiny
generated fleets whose policies say `trust_model = "distributed"`, `min_honest_regions = 2`, and
runs four one-round runs in order: plain (one local DP-SGD step), secure, plain, secure. It prints
each round's wall time (`rounds.jsonl` `seconds`, which includes the evaluation exchange) and,
for secure rounds, each stage's seconds and protocol bytes from `secagg_transcript.jsonl` (the
model copy the routed stage carries is not counted; it replaces the train message's copy).
The second plain run is expected to fail: a ledger that holds a distributed release refuses a
local release (fedfsd.privacy.ledger: the local accountant would under-count).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from fedfsd.data.testing import generate_fleets
from fedfsd.deploy.federation import LocalFederation, RegionSpec

REGIONS = ("eu", "jp", "us")
RUN = {
    "num-server-rounds": 1,
    "local-steps": 1,
    "vehicles-per-step": 4,
    "frames-per-vehicle": 4,
    "noise-multiplier": 1.0,
    "clip-norm": 1.0,
    "server-lr": 0.5,
    "min-regions": 3,
    "round-timeout": 120.0,
    "node-wait": 120.0,
    "evaluate-timeout": 5.0,
}
ORDER = (("plain", False), ("secure", True), ("plain2", False), ("secure2", True))
POLICY = (
    'region = "{r}"\nepsilon_budget = 50.0\ndelta = 1e-3\nmin_noise_multiplier = 1.0\n'
    'max_clip_norm = 1.0\nupdate_norm_bound = 5.0\ntrust_model = "distributed"\n'
    "min_honest_regions = 2\n"
)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="secagg-cost-"))
    try:
        generate_fleets(root, REGIONS, vehicles=12, episodes=2, seeds=range(1, len(REGIONS) + 1))
        regions = {}
        for r in REGIONS:
            pol = root / f"{r}.toml"
            pol.write_text(POLICY.format(r=r))
            regions[r] = RegionSpec(
                root / "data" / r,
                pol,
                root / "ledgers" / r / "ledger.jsonl",
                node_config={"peer-keys": str(root / "deploy" / "region-keys.json")},
            )
        out: dict[str, dict] = {}
        with LocalFederation(root / "deploy", regions, tls=True) as fed:
            fed.wait_connected(list(REGIONS), timeout=120)
            for name, secure in ORDER:
                rd = root / name
                fed.run(
                    {**RUN, "secure-aggregation": secure, "run-dir": str(rd)},
                    timeout=400,
                    check=False,
                )
                rounds = [json.loads(x) for x in (rd / "rounds.jsonl").read_text().splitlines()]
                row: dict = {"status": rounds[0]["status"], "round_seconds": rounds[0]["seconds"]}
                tr = rd / "secagg_transcript.jsonl"
                if tr.exists():
                    row["stages"] = json.loads(tr.read_text().splitlines()[-1])["stages"]
                out[name] = row
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
