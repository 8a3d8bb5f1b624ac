"""`metrics.png`: the global model's FDE (or the run's plot metric) and ε spent, per region.

Why: the first plot showed only the loss; what a run is judged by is the final displacement
error on each region's test episodes and how much of each region's budget it took. Rounds
without an evaluation are gaps, not repeats (metrics.csv marks them with `evaluated` 0).
"""

from __future__ import annotations

import math
from pathlib import Path

from fedfsd.aggregator import checkpoint as ck

EVALUATED = "evaluated"  # metrics.csv: region "*", value 1 (evaluated) or 0 (not this round)
ALL_REGIONS = "*"


def _series(rows: list[dict[str, str]], metric: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["metric"] != metric or r["region"] == ALL_REGIONS:
            continue
        try:
            v = float(r["value"])
        except ValueError:
            continue
        if math.isfinite(v):
            out.setdefault(r["region"], []).append((int(r["round"]), v))
    return {k: sorted(v) for k, v in out.items()}


def plot_run(run_dir: Path, metric: str = "loss") -> Path | None:
    """PNG with FDE (else `metric`) per region and ε per region by round; None without data."""
    run_dir = Path(run_dir)
    rows = ck.read_csv(run_dir / ck.METRICS_CSV)
    shown = "fde" if _series(rows, "fde") else metric
    model = _series(rows, shown)
    eps = _series(
        [
            {"round": r["round"], "region": r["region"], "metric": "epsilon", "value": r["epsilon"]}
            for r in ck.read_csv(run_dir / ck.EPSILON_CSV)
        ],
        "epsilon",
    )
    if not model and not eps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for region, pts in sorted(model.items()):
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=region)
    ax1.set_xlabel("round")
    ax1.set_ylabel(shown)
    ax1.set_title(f"global model: {shown} on each region's test episodes")
    if not model:
        ax1.text(0.5, 0.5, f"no {shown} released", ha="center", transform=ax1.transAxes)
    for region, pts in sorted(eps.items()):
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=region)
    budgets = {
        r["region"]: float(r["epsilon_budget"])
        for r in ck.read_csv(run_dir / ck.EPSILON_CSV)
        if r.get("epsilon_budget")
    }
    for region, b in sorted(budgets.items()):
        ax2.axhline(b, linestyle=":", color="grey")
        ax2.annotate(f"{region} budget", (0, b), fontsize=7, color="grey")
    ax2.set_xlabel("round")
    ax2.set_ylabel("ε spent (PRV)")
    ax2.set_title("privacy spent per region")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path = run_dir / ck.METRICS_PNG
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
