"""The report's reconstruction figure: how well the FP SAE still reads each RTN width (engine/recon.py)."""

from __future__ import annotations

import math

import numpy as np

BLUE, ORANGE, GREEN = "#0072B2", "#E69F00", "#009E73"


def _val(row: dict, column: str) -> float:
    try:
        return float(row.get(column))
    except (TypeError, ValueError):
        return float("nan")


def fig_reconstruction_by_bits(group, figure_cls, new_figure, style):
    """Explained variance (and cosine similarity, and CE loss score when spliced) of the FP SAE on FP and on
    each RTN width."""
    f = figure_cls(
        "reconstruction_by_bits",
        "Does the FP SAE still reconstruct the compressed model's activations?",
        "The FP model's SAE applied, unchanged, to the read-outs of each RTN-compressed model: the fraction of "
        "their variance its reconstruction explains (SAELens's explained variance), the mean cosine similarity "
        "of reconstruction and read-out, and, when the sweep ran with <code>--splice</code>, the CE loss score "
        "(1: splicing the reconstruction in costs no loss; 0: as bad as zeroing the site). FP is the leftmost "
        "point; bits decrease to the right.",
    )
    rtn = [c for c in group.rtn if math.isfinite(c.value("explained_variance"))]
    fp_ev = _val(group.fp_row, "explained_variance")
    if not rtn or not math.isfinite(fp_ev):
        f.note = "Needs the reconstruction metrics (an SAE with a decoder) for FP and at least one RTN width."
        return f
    top = max(c.bits for c in rtn) + 2
    xs = np.array([top] + [c.bits for c in rtn])
    rows = [group.fp_row] + [c.row for c in rtn]
    fig = new_figure()
    ax = fig.add_subplot()
    series = [("explained_variance", "explained variance", "o-", BLUE),
              ("cossim", "cosine similarity", "s--", ORANGE),
              ("ce_loss_score", "CE loss score (spliced)", "^-.", GREEN)]
    shown = []
    for col, label, style_, color in series:
        ys = np.array([_val(r, col) for r in rows])
        if np.isfinite(ys).any():
            ax.plot(xs, ys, style_, color=color, lw=2, ms=7, label=label)
            shown.append((label, ys))
    ax.set_xticks(xs, ["FP"] + [f"INT{c.bits}" for c in rtn])
    ax.set_xlim(xs.max() + 0.5, xs.min() - 0.5)
    ax.set_xlabel("model the FP SAE reads (RTN weight precision)")
    ax.set_ylabel("reconstruction quality (1 = perfect)")
    style(ax)
    ax.legend(loc="lower left", frameon=False)
    f.draw(fig)
    f.alt = "; ".join(f"{label}: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(["FP"] + [f"INT{c.bits}" for c in rtn], ys))
                      for label, ys in shown)
    return f
