"""Secure aggregation's added CPU time and bytes per stage, at the MLP's size, 3 and 4 regions.

All parties run in this one process, one after another, through the real fedfsd.secagg state
machines (real X25519/Ed25519/AES); CPU seconds are `time.process_time` around each party's own
call, so they do not include the network. Bytes are the stage messages' lengths (what would ride
a Flower record), against the plain round's float32 update (the ArrayRecord payload, 4·d bytes).
The ring width comes from the design note's overflow analysis with the given schedule.

    .venv/bin/python experiments/bench_secagg.py [--regions 3,4] [--repeats 5] [--model mlp]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

from fedfsd.data.feature_spec import N_FEATURES, N_LABELS
from fedfsd.models import build_model
from fedfsd.secagg import AggregatorSession, Quantizer, RegionSession, RoundParams

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("cn", "eu", "jp", "us", "br", "in", "au", "kr")
STAGES = ("quantise", "advertise", "share keys", "masked input", "unmask")


def model_dim(model: str) -> int:
    m = build_model(model, N_FEATURES, N_LABELS, **({"in_channels": 3} if model != "mlp" else {}))
    return int(sum(t.numel() for t in m.state_dict().values()))


def cpu(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def one_round(
    n: int,
    dim: int,
    quant: Quantizer,
    xs: list[np.ndarray],
    rnd: int,
    lt: dict,
    pub: dict,
    dropped: int = 0,
) -> dict[str, dict[str, float]]:
    """CPU seconds (region mean, aggregator total) and bytes (per region) of every stage.

    The last `dropped` regions share keys and then send no masked input (the aggregator then
    rebuilds their pairwise masks from the survivors' shares of their mask keys).
    """
    names = NAMES[:n]
    live = names[: n - dropped]
    t = n // 2 + 1
    params = RoundParams("bench", rnd, tuple(sorted(names)), t, quant.bit_width, dim)
    agg = AggregatorSession(params, pub)
    regs = {r: RegionSession(r, lt[r], pub) for r in names}
    region_cpu: dict[str, float] = defaultdict(float)
    agg_cpu: dict[str, float] = defaultdict(float)
    up: dict[str, float] = defaultdict(float)
    down: dict[str, float] = defaultdict(float)

    z = {}
    for r, x in zip(names, xs, strict=True):
        z[r], c = cpu(lambda x=x: quant.encode(x, np.random.default_rng(rnd)))
        region_cpu["quantise"] += c / n

    setup, c = cpu(agg.setup_message)
    agg_cpu["advertise"] += c
    for r in names:
        msg, c = cpu(lambda r=r: regs[r].on_setup(setup))
        region_cpu["advertise"] += c / n
        down["advertise"] += len(setup) / n
        up["advertise"] += len(msg) / n
        _, c = cpu(lambda msg=msg: agg.receive_advertisement(msg))
        agg_cpu["advertise"] += c

    keys, c = cpu(agg.keys_message)
    agg_cpu["share keys"] += c
    for r in names:
        msg, c = cpu(lambda r=r: regs[r].on_keys(keys))
        region_cpu["share keys"] += c / n
        down["share keys"] += len(keys) / n
        up["share keys"] += len(msg) / n
        _, c = cpu(lambda msg=msg: agg.receive_shares(msg))
        agg_cpu["share keys"] += c

    routed, c = cpu(agg.routed_messages)
    agg_cpu["masked input"] += c
    for r in live:
        msg, c = cpu(lambda r=r: regs[r].on_routed(routed[r], z[r]))
        region_cpu["masked input"] += c / len(live)
        down["masked input"] += len(routed[r]) / len(live)
        up["masked input"] += len(msg) / len(live)
        _, c = cpu(lambda msg=msg: agg.receive_masked_input(msg))
        agg_cpu["masked input"] += c

    req, c = cpu(agg.unmask_request)
    agg_cpu["unmask"] += c
    for r in live:
        msg, c = cpu(lambda r=r: regs[r].on_unmask(req))
        region_cpu["unmask"] += c / len(live)
        down["unmask"] += len(req) / len(live)
        up["unmask"] += len(msg) / len(live)
        _, c = cpu(lambda msg=msg: agg.receive_unmask(msg))
        agg_cpu["unmask"] += c
    total, c = cpu(agg.result)
    agg_cpu["unmask"] += c

    err = np.max(np.abs(quant.decode_sum(total) - sum(xs[: len(live)])))
    assert err <= n / quant.scale, err  # the bench is also a check: the sum came back
    return {"region_cpu": region_cpu, "agg_cpu": agg_cpu, "up": up, "down": down}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regions", default="3,4", help="comma-separated region counts")
    ap.add_argument("--repeats", type=int, default=5, help="rounds per count (median reported)")
    ap.add_argument("--dropped", default="0,1", help="regions dropping before masked input")
    ap.add_argument("--model", default="mlp", choices=["mlp", "bev_cnn"])
    ap.add_argument("--scale", type=float, default=2.0**12, help="quantisation scale s")
    ap.add_argument("--clip", type=float, default=1.0, help="per-vehicle clip norm C")
    ap.add_argument("--cap", type=int, default=256, help="sampled vehicles per step, region cap")
    ap.add_argument("--noise-multiplier", type=float, default=2.176)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "out" / "bench_secagg")
    args = ap.parse_args()

    dim = model_dim(args.model)
    lt = {r: Ed25519PrivateKey.generate() for r in NAMES}
    pub = {r: k.public_key() for r, k in lt.items()}
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for n in [int(v) for v in args.regions.split(",")]:
        t = n // 2 + 1
        # Skellam shares of variance (σ s C)^2 / t, all n regions add one: summed std below
        noise_std = math.sqrt(n / t) * args.noise_multiplier * args.scale * args.clip
        quant = Quantizer.fitted(args.scale, args.cap * args.clip, n, noise_std)
        xs = [rng.normal(size=dim) * 0.01 for _ in range(n)]
        for drop in [int(v) for v in args.dropped.split(",")]:
            runs = [one_round(n, dim, quant, xs, i, lt, pub, drop) for i in range(args.repeats)]
            for part in ("region_cpu", "agg_cpu", "up", "down"):
                keys = sorted({k for r in runs for k in r[part]}, key=STAGES.index)
                for k in keys:
                    med = statistics.median(r[part].get(k, 0.0) for r in runs)
                    rows.append({"regions": n, "dropped": drop, "threshold": t,
                                 "bit_width": quant.bit_width, "part": part, "stage": k,
                                 "value": med})  # fmt: skip
    plain = 4 * dim
    out = {"model": args.model, "dim": dim, "plain_update_bytes": plain, "rows": rows,
           "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_secagg.json").write_text(json.dumps(out, indent=1))

    tab = Table(title=f"secagg per round, {args.model} d={dim}; plain update {plain:,} B up")
    cols = ("R", "dropped", "t", "b", "stage", "region CPU ms", "aggregator CPU ms")
    for col in (*cols, "up B/region", "down B/region"):
        tab.add_column(col, justify="right")
    by = defaultdict(dict)
    for r in rows:
        key = (r["regions"], r["dropped"], r["threshold"], r["bit_width"], r["stage"])
        by[key][r["part"]] = r["value"]
    for (n, drop, t, b, stage), v in by.items():
        tab.add_row(
            str(n), str(drop), str(t), str(b), stage,
            f"{1e3 * v.get('region_cpu', 0):.1f}", f"{1e3 * v.get('agg_cpu', 0):.1f}",
            f"{v.get('up', 0):,.0f}", f"{v.get('down', 0):,.0f}",
        )  # fmt: skip
    Console(width=132).print(tab)
    for n, drop in sorted({(r["regions"], r["dropped"]) for r in rows}):
        sel = [r for r in rows if r["regions"] == n and r["dropped"] == drop]
        up = sum(r["value"] for r in sel if r["part"] == "up")
        down = sum(r["value"] for r in sel if r["part"] == "down")
        rc = sum(r["value"] for r in sel if r["part"] == "region_cpu")
        ac = sum(r["value"] for r in sel if r["part"] == "agg_cpu")
        print(
            f"R={n}, {drop} dropped: per region up {up:,.0f} B "
            f"(plain {plain:,} B, x{up / plain:.2f}), "
            f"extra down {down:,.0f} B; region CPU {1e3 * rc:.0f} ms, aggregator CPU "
            f"{1e3 * ac:.0f} ms per round"
        )
    print(f"wrote {args.out / 'bench_secagg.json'}")


if __name__ == "__main__":
    main()
