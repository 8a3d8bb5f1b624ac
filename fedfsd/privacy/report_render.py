"""Markdown and HTML views of an ε report, for people; the JSON form stays canonical.

Each view has a plot: ε after each release against the budget for a region, ε per region for the
global summary. HTML embeds the PNG as base64 so the report is one self-contained file; Markdown
links a PNG written next to it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import cast

from fedfsd.proto.fedfsd.v1 import report_pb2 as pb


def _fmt(x: float, digits: int = 4) -> str:
    return "∞" if math.isinf(x) else f"{x:.{digits}g}"


def plot_png(rep: pb.EpsilonReport | pb.GlobalSummary) -> bytes:
    """PNG of ε per release (region) or per region (summary), with the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    try:
        if isinstance(rep, pb.GlobalSummary):
            names = [r.region for r in rep.regions]
            eps = [r.epsilon for r in rep.regions]
            ax.bar(names, eps, color="#4477aa", label="ε (PRV)")
            ax.scatter(
                names,
                [r.epsilon_budget for r in rep.regions],
                marker="_",
                s=900,
                color="#cc3311",
                label="budget",
                zorder=3,
            )
            ax.set_ylabel("ε")
            ax.set_title(f"ε per region at its δ (worst case {_fmt(rep.worst_case_epsilon, 3)})")
        else:
            x = list(range(1, len(rep.releases) + 1))
            ax.plot(x, [r.epsilon_prv for r in rep.releases], "o-", label="ε (PRV, headline)")
            ax.plot(x, [r.epsilon_rdp for r in rep.releases], "s--", label="ε (RDP cross-check)")
            ax.axhline(rep.budget.epsilon_budget, color="#cc3311", label="budget")
            labels = [f"{r.run_id[:8]}:{r.round}" for r in rep.releases]
            ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
            ax.set_xlabel("release (run:round)")
            ax.set_ylabel(f"cumulative ε at δ = {rep.accounting.delta:g}")
            ax.set_title(f"Region {rep.region}: privacy spent per round")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


# ---- a tiny document model shared by both renderers ----------------------------------------

Table = tuple[list[str], list[list[str]]]  # (head, rows)
Block = tuple[str, object]  # ("h", text) | ("p", text) | ("ul", [text]) | ("table", (head, rows))


def _release_kind(r: pb.Release) -> str:
    """ "update" for a DP-SGD release, "metrics <phase>: <names>" for a DP metric release."""
    from fedfsd.privacy.report import METRIC_MODEL

    if not r.model.startswith(METRIC_MODEL):
        return "update"
    phase, _, names = r.model[len(METRIC_MODEL) :].partition(":")
    return f"metrics ({phase}): {names}"


def _distributed_blocks(rep: pb.EpsilonReport) -> list[Block]:
    """Both ε of distributed noise, each with its assumption (the headline above is the enforced
    one, in RDP)."""
    d = rep.distributed
    rows = [
        [
            f"ε {d.assumption_distributed}",
            _fmt(d.epsilon_distributed),
            "yes" if d.enforce_on == "distributed" else "",
        ],
        [
            f"ε {d.assumption_own_noise}",
            _fmt(d.epsilon_own_noise),
            "yes" if d.enforce_on == "own_noise" else "",
        ],
    ]
    steps = [
        f"{s.rounds} round(s): q = {s.sample_rate:.4g}, noise-share variance μ = "
        f"{s.share_variance:.6g} per coordinate, t = {s.min_honest_regions}, scale s = "
        f"{s.scale:.6g}, C = {s.clip_norm:g}, d = {s.dimension}"
        for s in d.history
    ]
    blocks: list[Block] = [
        ("h", "Distributed noise (secure aggregation)"),
        ("table", (["ε under the assumption", "value", "budget enforced on it"], rows)),
        ("ul", [*steps, f"method: {d.method}"]),
    ]
    n_local = sum(1 for r in rep.releases if not r.distributed)
    if n_local:
        blocks.append(
            (
                "p",
                f"Mixed ledger: both ε above also compose the {n_local} local (Gaussian) "
                "release(s) listed below, which count the same under either assumption "
                "(the region added all of their noise). All of it is composed in RDP: PRV, the "
                "headline of a local-only ledger, cannot account the Skellam releases.",
            )
        )
    return blocks


def _region_blocks(rep: pb.EpsilonReport) -> list[Block]:
    a, m, u, b, p = rep.accounting, rep.mechanism, rep.unit, rep.budget, rep.provenance
    blocks: list[Block] = [
        ("h", f"ε report: region {rep.region}"),
        ("p", rep.statement),
    ]
    if not rep.private_training:
        blocks.append(("p", "WARNING: non-private baseline. There is no privacy guarantee."))
    blocks += [
        ("h", "Privacy guarantee"),
        (
            "table",
            (
                ["quantity", "value"],
                [
                    [f"ε ({a.headline_accountant.upper()}, headline)", _fmt(a.epsilon)],
                    [f"ε ({a.cross_check_accountant.upper()}, cross-check)", _fmt(a.epsilon_rdp)],
                    ["δ", f"{a.delta:g}"],
                    ["δ rule", a.delta_rule],
                    ["budget", f"{b.epsilon_budget:g}"],
                    ["remaining", _fmt(b.epsilon_remaining)],
                    ["budget used", f"{100 * b.fraction_used:.1f}%"],
                ],
            ),
        ),
    ]
    if rep.HasField("distributed"):
        blocks += _distributed_blocks(rep)
    if a.no_amplification_method:
        blocks.append(
            (
                "p",
                f"Non-Poisson sampling: ε without amplification by sampling = "
                f"{_fmt(a.epsilon_no_amplification)} ({a.no_amplification_method}).",
            )
        )
    blocks += [
        ("h", "Unit of privacy"),
        (
            "ul",
            [
                f"unit: {u.unit}",
                f"adjacency: {u.adjacency}",
                f"contribution bound: {u.contribution_bound} "
                f"(K ≤ {u.max_frames_per_vehicle_per_step} frames, C = {u.clip_norm:g})",
            ],
        ),
        ("h", "Trust model"),
        ("p", rep.trust.setting),
        (
            "table",
            (
                ["party", "trusted", "sees"],
                [[x.name, "yes" if x.trusted else "no", x.sees] for x in rep.trust.parties],
            ),
        ),
        ("h", "Scope"),
        ("p", "Covered:"),
        ("ul", list(rep.scope.covered)),
        ("p", "Not covered:"),
        ("ul", list(rep.scope.not_covered)),
        ("h", "Mechanism"),
        (
            "table",
            (
                ["parameter", "value"],
                [
                    ["mechanism", m.name],
                    ["sampling", f"{m.sampling} (amplification: {m.amplification_by_sampling})"],
                    [
                        "sample rate q",
                        f"{m.sample_rate:g} = {m.expected_vehicles_per_step} expected vehicles "
                        f"per step / {m.vehicles} vehicles",
                    ],
                    ["noise multiplier σ", f"{m.noise_multiplier:g}"],
                    ["clip norm C", f"{m.clip_norm:g}"],
                    ["frames per vehicle per step K", str(m.frames_per_vehicle)],
                    ["steps per round", str(m.steps_per_round)],
                    ["rounds (releases)", str(m.rounds)],
                    ["total steps", str(m.total_steps)],
                    ["same parameters every round", str(m.parameters_constant)],
                    ["normalisation", m.normalisation],
                    ["random numbers", m.rng],
                ],
            ),
        ),
        ("h", "ε per round"),
        ("plot", None),
        (
            "table",
            (
                [
                    "run",
                    "round",
                    "release",
                    "σ",
                    "C",
                    "q",
                    "K",
                    "steps",
                    "cum. steps",
                    "ε PRV",
                    "ε RDP",
                ],  # fmt: skip
                [
                    [
                        r.run_id,
                        str(r.round),
                        _release_kind(r),
                        f"{r.noise_multiplier:g}",
                        f"{r.clip_norm:g}",
                        f"{r.sample_rate:g}",
                        str(r.frames_per_vehicle),
                        str(r.steps),
                        str(r.cumulative_steps),
                        _fmt(r.epsilon_prv),
                        _fmt(r.epsilon_rdp),
                    ]
                    for r in rep.releases
                ],
            ),
        ),
        ("h", "Accountant history"),
        (
            "p",
            f"Accountants: {a.headline_accountant} (headline), {a.cross_check_accountant} "
            f"(cross-check); {a.implementation}.",
        ),
        (
            "table",
            (
                ["σ", "q", "steps"],
                [
                    [f"{h.noise_multiplier:g}", f"{h.sample_rate:g}", str(h.steps)]
                    for h in a.history
                ],
            ),
        ),
        ("h", "Provenance"),
        (
            "ul",
            [
                f"fleet id: {p.fleet_id}",
                f"runs: {', '.join(p.run_ids)}" + (f" (asked for {p.run_id})" if p.run_id else ""),
                f"training code version: {p.code_version}; report by fedfsd "
                f"{p.report_code_version}",
                f"ledger: {p.ledger_path} (sha256 {p.ledger_sha256})",
                f"generated: {p.generated}",
            ],
        ),
        ("h", "How to check this report"),
        (
            "p",
            "Run `fedfsd privacy verify` on the JSON form of this report: it recomputes ε from "
            "the accountant history with Opacus and with Google's dp-accounting and checks "
            "that q, steps, δ, the unit and the accountant are consistent.",
        ),
    ]
    if rep.notes:
        blocks += [("h", "Notes"), ("ul", list(rep.notes))]
    return blocks


def _global_blocks(g: pb.GlobalSummary) -> list[Block]:
    blocks: list[Block] = [
        ("h", "ε summary across regions"),
        ("p", g.statement),
        ("p", g.composition_rule),
        ("plot", None),
        (
            "table",
            (
                ["region", "fleet", "vehicles", "ε PRV", "ε RDP", "δ", "budget", "releases"],
                [
                    [
                        r.region,
                        r.fleet_id,
                        str(r.vehicles),
                        _fmt(r.epsilon),
                        _fmt(r.epsilon_rdp),
                        f"{r.delta:g}",
                        f"{r.epsilon_budget:g}",
                        str(r.releases),
                    ]
                    for r in g.regions
                ],
            ),
        ),
        ("h", "Vehicles in more than one region"),
        ("p", f"Overlap {'checked' if g.overlap_checked else 'NOT checked'}: {g.overlap_method}."),
    ]
    if g.overlaps:
        blocks.append(
            (
                "table",
                (
                    ["regions", "vehicles", "composed ε PRV", "composed ε RDP", "δ"],
                    [
                        [
                            "+".join(o.regions),
                            str(o.vehicles),
                            _fmt(o.epsilon),
                            _fmt(o.epsilon_rdp),
                            f"{o.delta:g}",
                        ]
                        for o in g.overlaps
                    ],
                ),
            )
        )
    blocks.append(
        (
            "p",
            f"Worst case over all vehicles: ε = {_fmt(g.worst_case_epsilon)} at "
            f"δ = {g.worst_case_delta:g}.",
        )
    )
    return blocks


def _blocks(rep: pb.EpsilonReport | pb.GlobalSummary) -> list[Block]:
    return _global_blocks(rep) if isinstance(rep, pb.GlobalSummary) else _region_blocks(rep)


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(rep: pb.EpsilonReport | pb.GlobalSummary, png_path: str | Path) -> str:
    """Markdown text; writes the plot to `png_path` and links it by file name."""
    png_path = Path(png_path)
    png_path.write_bytes(plot_png(rep))
    out: list[str] = []
    first = True
    for kind, body in _blocks(rep):
        if kind == "h":
            out.append(("# " if first else "## ") + str(body))
            first = False
        elif kind == "p":
            out.append(str(body))
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in cast(list[str], body)))
        elif kind == "plot":
            out.append(f"![ε per round against the budget]({png_path.name})")
        elif kind == "table":
            head, rows = cast(Table, body)
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
    "line-height:1.45}table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;"
    "padding:.25rem .5rem;text-align:left;vertical-align:top}th{background:#f3f3f3}"
    "img{max-width:100%}"
)


def to_html(rep: pb.EpsilonReport | pb.GlobalSummary) -> str:
    """One self-contained HTML page; the plot is an inline base64 PNG."""
    e = html.escape
    title = "ε summary" if isinstance(rep, pb.GlobalSummary) else f"ε report: {rep.region}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
    ]
    first = True
    for kind, body in _blocks(rep):
        if kind == "h":
            tag = "h1" if first else "h2"
            first = False
            out.append(f"<{tag}>{e(str(body))}</{tag}>")
        elif kind == "p":
            out.append(f"<p>{e(str(body))}</p>")
        elif kind == "ul":
            items = cast(list[str], body)
            out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in items) + "</ul>")
        elif kind == "plot":
            data = base64.b64encode(plot_png(rep)).decode()
            out.append(
                f'<img alt="ε per round against the budget" src="data:image/png;base64,{data}">'
            )
        elif kind == "table":
            head, rows = cast(Table, body)
            t = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
            t += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
            out.append("".join(t) + "</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
