"""The report's feature-level parts: which condition the feature figures show, the failure-type figure,
and the "most damaged features" section with contexts (qdm_engine.analysis.features does the work)."""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from qdm_engine.analysis.features import FAILURE_TYPES, context_line, features_payload, type_counts  # noqa: F401

MIXED = (10.0, 90.0)  # survived % within this range: the outcomes are still mixed
TYPE_COLOURS = {"survived": "#0072B2", "rescaled": "#56B4E9", "misfires": "#E69F00", "dies": "#D55E00",
                "new firing": "#CC79A7"}
N_FEATURES, N_CONTEXTS = 10, 3


def _compression(c) -> tuple:
    """Sort key, larger = more compressed: perplexity change when known, else fewer bits / more sparsity."""
    dppl = c.value("dppl_pct")
    if math.isfinite(dppl):
        return (1, dppl)
    if c.bits is not None:
        return (0, -c.bits)
    sparsity = c.value("sparsity")
    return (0, sparsity * 100 - 100 if math.isfinite(sparsity) else -math.inf)


def pick_mixed(group) -> tuple[object | None, str]:
    """The most compressed condition whose survival is still mixed (within MIXED); else the most mixed."""
    with_active = [c for c in group.conditions if c.method != "fp" and math.isfinite(c.value("survived_pct"))]
    if not with_active:
        return None, "This run has no compressed condition with active features to predict survival for."
    mixed = [c for c in with_active if MIXED[0] <= c.value("survived_pct") <= MIXED[1]]
    if mixed:
        c = max(mixed, key=_compression)
        return c, (f"{c.short} is shown: the most compressed condition whose outcomes are still mixed "
                   f"({c.value('survived_pct'):.1f}% survived; pass --condition to choose).")
    c = min(with_active, key=lambda c: abs(c.value("survived_pct") - 50.0))
    return c, (f"No condition keeps between {MIXED[0]:g}% and {MIXED[1]:g}% of its features; {c.short} is shown "
               f"because its survival ({c.value('survived_pct'):.1f}%) is the most mixed (pass --condition to choose).")


def fig_failure_types(group, run_dir: Path, figure_cls, new_figure, style):
    """Stacked bars: active features of each condition by failure type."""
    f = figure_cls(
        "failure_types",
        "How did the features fail?",
        "Each bar splits one condition's active features by failure type (<code>qdm-engine features</code> "
        "defines them): <b>survived</b> (r above the survived threshold, same size), <b>rescaled</b> (r above "
        "it, but the activation at the feature's top FP positions shrank or grew by more than 1.3x, which r "
        "cannot see), <b>misfires</b> (fires about as often, in the wrong places or amounts), <b>dies</b> "
        "(fires less than a fifth as often) and <b>new firing</b> (fires more than twice as often).",
    )
    conds = [c for c in group.conditions if c.method != "fp" and math.isfinite(c.value("survived_pct"))]
    if not conds:
        f.note = "No compressed condition has active features, so there is nothing to split."
        return f
    counts = [type_counts(run_dir, c.name) for c in conds]
    fig = new_figure(8.0, 1.3 + 0.45 * len(conds))
    ax = fig.add_subplot()
    y = np.arange(len(conds))
    left = np.zeros(len(conds))
    for t in FAILURE_TYPES:
        n = np.array([k[t] for k in counts], dtype=float)
        tot = np.array([max(1, sum(k.values())) for k in counts], dtype=float)
        v = 100.0 * n / tot
        bars = ax.barh(y, v, left=left, color=TYPE_COLOURS[t], label=t, height=0.7, edgecolor="white", linewidth=0.6)
        ax.bar_label(bars, labels=[f"{x:.1f}" if x >= 7 else "" for x in v], label_type="center", fontsize=9,
                     color="black" if t in ("misfires", "rescaled") else "white")
        left += v
    ax.set_yticks(y, [c.short for c in conds])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of active features (%)")
    style(ax, "x")
    ax.legend(ncols=len(FAILURE_TYPES), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    f.draw(fig)
    f.alt = "Stacked bars of failure types for " + ", ".join(c.short for c in conds)
    return f


def _num(v, spec: str) -> str:
    return "&ndash;" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _context_html(ctx: dict) -> str:
    parts = []
    for t in ctx["tokens"]:
        text = html.escape(t["text"].replace("\n", "\u21b5"))
        parts.append(f"<mark>{text}</mark>" if t["fires"] else text)
    return "".join(parts)


def damaged_section(run_dir: Path, group, cond) -> str:
    """HTML: the failure-type breakdown per condition and the most damaged features of `cond` with contexts."""
    if cond is None:
        return ""
    rows = []
    for c in group.conditions:
        if c.method == "fp" or not math.isfinite(c.value("survived_pct")):
            continue
        k = type_counts(run_dir, c.name)
        tot = max(1, sum(k.values()))
        rows.append(f'<tr><td class="l">{html.escape(c.short)}</td>'
                    + "".join(f"<td>{k[t]} ({100 * k[t] / tot:.1f}%)</td>" for t in FAILURE_TYPES) + "</tr>")
    out = ["<h3>Failure types per condition</h3>",
           '<div class="scroll"><table><tr><th class="l">condition</th>'
           + "".join(f"<th>{t}</th>" for t in FAILURE_TYPES) + "</tr>" + "".join(rows) + "</table></div>"]
    payload = features_payload(run_dir, cond.name, worst=N_FEATURES, n_contexts=N_CONTEXTS)
    out.append(f"<h3>The {len(payload['features'])} most damaged features of {html.escape(cond.short)}</h3>")
    out.append(f"<p>Lowest r first, with its 95% block-bootstrap interval. Each context is the text around one of "
               f"the feature's top FP positions, the firing token highlighted, with the FP and the {html.escape(cond.short)} "
               f"activation there. <code>qdm-engine features RUN_DIR --condition {html.escape(cond.name)}</code> "
               "lists more.</p>")
    if not any(r["contexts"] for r in payload["features"]):
        out.append('<p class="note">This run folder has no <code>topk.parquet</code> / <code>tokens.parquet</code> '
                   "(written by sweeps from this version on), so no contexts are shown.</p>")
    out.append('<div class="scroll"><table class="feats"><tr><th>feature</th><th class="l">type</th><th>r [95%]</th>'
               "<th>firing FP &rarr; compressed</th><th>magnitude</th><th class=\"l\">top FP contexts</th></tr>")
    for r in payload["features"]:
        name = f'<a href="{html.escape(r["neuronpedia"])}">{r["feature"]}</a>' if r["neuronpedia"] else str(r["feature"])
        ctx = "<br>".join(f'<span class="act">{c["fp_act"]:.2f} &rarr; {c["c_act"]:.2f}</span> {_context_html(c)}'
                          for c in r["contexts"])
        out.append(f"<tr><td>{name}</td><td class=\"l\">{html.escape(str(r['type']))}</td>"
                   f"<td class=\"nw\">{_num(r['r'], '.3f')} [{_num(r['r_lo'], '.2f')}, {_num(r['r_hi'], '.2f')}]</td>"
                   f"<td>{100 * (r['fp_rate'] or 0):.2f}% &rarr; {100 * (r['c_rate'] or 0):.2f}%</td>"
                   f"<td>&times;{_num(r['mag_ratio'], '.2f')}</td><td class=\"l ctx\">{ctx}</td></tr>")
    out.append("</table></div>")
    return "\n".join(out)


CSS = """
table.feats td { vertical-align: top; } td.ctx { font-family: "DejaVu Sans Mono", Menlo, monospace;
  font-size: 0.92em; white-space: pre-wrap; max-width: 600px; } td.ctx mark { background: #ffd54a; }
span.act { color: #555; font-variant-numeric: tabular-nums; } td.nw { white-space: nowrap; }
"""
