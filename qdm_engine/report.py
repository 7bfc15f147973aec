"""The run report: PNG figures and one self-contained HTML page drawn from a stored run folder.

`make_report(run_dir)` reads what a sweep wrote (config.json, summary.csv, features/*.parquet), never
reruns a model, and writes the figures plus `report.html` into `RUN_DIR/report/`. The page embeds every
figure as a base64 data URI and needs no network and no JavaScript, so it can be mailed or archived
alone. A figure the run cannot support (one condition, no RTN or pruning condition, too few survived
features for the predictor) is left out with a note that says why; it is never an error.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from qdm_engine import __version__
from qdm_engine.analysis.overlap import firing_rate_deciles, overlap
from qdm_engine.analysis.predictor import STATISTICS, _model, fit_predictor, fp_statistics
from qdm_engine.analysis.results import list_conditions, load_config, load_features, load_summary
from qdm_engine.analysis.thresholds import DAMAGE, SURVIVAL, active_mask, classify_active
from qdm_engine.errors import QdmError
from qdm_engine.report_features import CSS as FEATURES_CSS

__all__ = ["FIGURES", "make_report"]

# The predictor figures use fit_predictor's CV exactly (recipe "ours": scaler fitted inside each fold).
N_SPLITS = 5
SEED = 0
DEFAULT_CONDITION = "int6"

# File stems of the figures, in the order the page shows them.
FIGURES = (
    "taxonomy",
    "correlation_by_bits",
    "dissociation",
    "rtn_vs_prune",
    "deciles",
    "predictor_roc",
    "predictor_quartiles",
    "failure_types",
    "reconstruction_by_bits",
)

# Okabe-Ito: distinguishable under the common colour-vision deficiencies and in greyscale print.
BLUE, ORANGE, GREEN, VERMILLION, SKY, PURPLE, GREY = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#7F7F7F")
CLASS_COLOURS = {"survived": BLUE, "degraded": ORANGE, "damaged": VERMILLION, "undefined": GREY}
QUARTILE_COLOURS = ("#C6DBEF", "#6BAED6", "#2171B5", "#08306B")  # one hue, light to dark: Q1 -> Q4
STAT_LABELS = {
    "rarity": "rarity\n(-log firing rate)",
    "log_mean_activation": "log mean\nactivation",
    "log_max_activation": "log peak\nactivation",
    "log_concentration": "log concentration\n(peak / mean)",
}
DPI = 150
DISPLAY_PX_PER_INCH = 108  # 11 pt figure text shows at about 16 CSS px, the page's body size


# ----------------------------------------------------------------------------------------------------
# The run as the report sees it


@dataclass(frozen=True)
class Condition:
    """One compressed condition of one SAE: its summary row and how it was compressed."""

    name: str  # as in summary.csv and features/ ('int6', or 'tag/int6' with several SAEs)
    short: str  # without the SAE tag
    method: str  # rtn, prune, prune-matched, fp (the null) or unknown
    bits: int | None
    row: dict  # its summary.csv row
    desc: dict = field(default_factory=dict)  # its entry in config.json's conditions (e.g. a matched target)

    def value(self, column: str) -> float:
        v = self.row.get(column)
        try:
            v = float(v)
        except (TypeError, ValueError):
            return float("nan")
        return v

    @property
    def is_rtn(self) -> bool:
        return self.method == "rtn" and self.bits is not None

    @property
    def is_prune(self) -> bool:
        return self.method.startswith("prune")


@dataclass
class Group:
    """The conditions audited through one SAE (a run has one group per SAE)."""

    tag: str | None  # None for a single-SAE run
    fp_row: dict
    conditions: list[Condition]
    identity: dict = field(default_factory=dict)

    def find(self, short: str) -> Condition | None:
        return next((c for c in self.conditions if c.short == short or c.name == short), None)

    @property
    def rtn(self) -> list[Condition]:
        return sorted((c for c in self.conditions if c.is_rtn), key=lambda c: -c.bits)

    @property
    def prune(self) -> list[Condition]:
        return [c for c in self.conditions if c.is_prune]


@dataclass
class Figure:
    """One figure section of the page: a PNG, or a note saying why it is missing."""

    key: str
    title: str
    how_to_read: str
    png: bytes | None = None
    caption: str = ""
    note: str = ""
    alt: str = ""
    width: int = 0  # display width in CSS px (figure inches x DISPLAY_PX_PER_INCH), so fonts read alike

    def draw(self, fig) -> None:
        """Render a matplotlib figure into this section's PNG."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
        self.png = buf.getvalue()
        self.width = round(fig.get_size_inches()[0] * DISPLAY_PX_PER_INCH)


def _method_of(name: str, method) -> tuple[str, int | None]:
    """(method, bits) from the summary's method column, or from the condition name when it is absent."""
    m = method if isinstance(method, str) and method else ""
    bits = re.fullmatch(r"int(\d+)", name)
    if not m:
        if bits:
            m = "rtn"
        elif name.startswith("prune"):
            m = "prune"
        elif name.startswith("fp"):
            m = "fp"
        else:
            m = "unknown"
    return m, (int(bits.group(1)) if bits and m == "rtn" else None)


def _groups(run_dir: Path, config: dict, summary: pd.DataFrame) -> list[Group]:
    if "condition" not in summary.columns or summary.empty:
        raise QdmError(f"'{run_dir}/summary.csv' has no condition rows; rerun the sweep that wrote this folder")
    stored = set(list_conditions(run_dir))
    multi = "sae" in summary.columns and summary["sae"].nunique(dropna=False) > 1
    identities = {s.get("tag"): s for s in config.get("saes") or []}
    described = {str(c.get("name")): c for c in config.get("conditions") or [] if isinstance(c, dict)}
    groups = []
    for tag, rows in (summary.groupby("sae", sort=False, dropna=False) if multi else [(None, summary)]):
        prefix = f"{tag}/" if multi else ""
        fp_row, conds = {}, []
        for row in rows.to_dict(orient="records"):
            name = str(row["condition"])
            short = name[len(prefix):] if name.startswith(prefix) else name
            method, bits = _method_of(short, row.get("method"))
            per_row = described.get(short, {}).get("group") is None and described.get(short, {}).get(
                "symmetric", True) and described.get(short, {}).get("scope", "blocks") == "blocks"
            if method == "rtn" and bits is None and math.isfinite(_num(row.get("bits"))) and per_row:
                bits = int(_num(row.get("bits")))  # an RTN condition named other than intN
            elif method == "rtn" and not per_row:
                method = "rtn-variant"  # group-wise / asymmetric / all-tensor RTN: not on the per-row bits curve
            if short == "fp" and method == "fp":
                fp_row = row
            elif name in stored:  # a condition without its per-feature table cannot be drawn
                conds.append(Condition(name, short, method, bits, row, described.get(short, {})))
        identity = identities.get(tag) or config.get("sae") or {}
        groups.append(Group(None if not multi else str(tag), fp_row, conds, identity))
    return groups


# ----------------------------------------------------------------------------------------------------
# Figures


def _new_figure(width: float = 8.0, height: float = 4.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot global state
    return fig


def _style(ax, grid_axis: str = "y") -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis=grid_axis, color="#DDDDDD", linewidth=0.8)
    ax.set_axisbelow(True)


def _fmt(v: float, spec: str) -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def _pct_decimals(values) -> int:
    """Decimals for a figure's percentage labels: one when every share is small (< 10) or every share is
    near 100 (> 90), where whole numbers would hide the differences the bars show; none otherwise."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return 1 if v.size and (v.max() < 10 or v.min() > 90) else 0


def _pct_label(v: float, decimals: int = 0) -> str:
    """A percentage for a bar label that never rounds a share to 0 or 100 when it is not exactly that.

    0.3% of a decile failing is not "0", and 99.7% surviving is not "100": those get one more decimal,
    or "<0.1" / ">99.9" when even that would round to the edge.
    """
    if v is None or not math.isfinite(v):
        return ""
    if v in (0.0, 100.0):
        return f"{v:.0f}"
    text = f"{v:.{decimals}f}"
    edge_low, edge_high = float(text) == 0.0 and v > 0.0, float(text) == 100.0 and v < 100.0
    if edge_low or edge_high:
        finer = f"{v:.{decimals + 1}f}"
        step = 10.0 ** -(decimals + 1)
        if edge_low and float(finer) == 0.0:
            return f"<{step:.{decimals + 1}f}"
        if edge_high and float(finer) == 100.0:
            return f">{100 - step:.{decimals + 1}f}"
        return finer
    return text


def fig_taxonomy(group: Group, th: dict) -> Figure:
    f = Figure(
        "taxonomy",
        "Which share of the features survived each compression?",
        f"Each bar is one compressed copy of the model. It splits the features that are active in the "
        f"full-precision (FP) model into those that <b>survived</b> (their activations still correlate "
        f"with FP at r&nbsp;&gt;&nbsp;{th['survived']:g}), were <b>degraded</b> "
        f"({th['damaged']:g}&nbsp;&le;&nbsp;r&nbsp;&le;&nbsp;{th['survived']:g}) or <b>damaged</b> "
        f"(r&nbsp;&lt;&nbsp;{th['damaged']:g}). <b>Undefined</b> features stopped varying once compressed "
        "(r cannot be computed); they are never counted as survived. Longer blue bars are better.",
    )
    conds = [c for c in group.conditions if math.isfinite(c.value("survived_pct"))]
    if not conds:
        f.note = "No compressed condition has active features, so there is nothing to split."
        return f
    names = [c.short for c in conds]
    parts = {
        "survived": [c.value("survived_pct") for c in conds],
        "degraded": [c.value("degraded_pct") for c in conds],
        "damaged": [c.value("damaged_pct") for c in conds],
        "undefined": [100.0 * np.nan_to_num(c.value("undefined_n")) / c.value("n_active")
                      if c.value("n_active") > 0 else 0.0 for c in conds],
    }
    if not any(parts["undefined"]):
        del parts["undefined"]
    fig = _new_figure(8.0, 1.3 + 0.45 * len(conds))
    ax = fig.add_subplot()
    y = np.arange(len(conds))
    left = np.zeros(len(conds))
    for cls, values in parts.items():
        values = np.nan_to_num(np.asarray(values, dtype=float))
        bars = ax.barh(y, values, left=left, color=CLASS_COLOURS[cls], label=cls, height=0.7,
                       edgecolor="white", linewidth=0.6)
        labels = [_pct_label(v, 1) if v >= 7 else "" for v in values]
        ax.bar_label(bars, labels=labels, label_type="center", fontsize=9,
                     color="black" if cls == "degraded" else "white")
        left += values
    lo, hi = (np.array([c.value(k) for c in conds]) for k in ("survived_lo", "survived_hi"))
    if np.isfinite(lo).any():  # the survived share's 95% block-bootstrap interval, at its bar's end
        s = np.array(parts["survived"], dtype=float)
        ax.errorbar(s, y, xerr=[np.clip(s - lo, 0, None), np.clip(hi - s, 0, None)], fmt="none", ecolor="black",
                    elinewidth=1.0, capsize=3, label="95% interval")
        f.caption = ("Whiskers: 95% block-bootstrap interval of the survived share, corrected for the bias a "
                     "small token budget gives it, so it can sit beside the bar's end (see the summary's "
                     "<code>survived_lo</code>, <code>survived_hi</code>).")
    ax.set_yticks(y, names)
    ax.invert_yaxis()  # first condition on top, as in the summary table
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of active features (%)")
    ax.set_ylabel("condition")
    _style(ax, "x")
    ax.legend(ncols=len(parts), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    f.draw(fig)
    f.alt = "Stacked bars of survived, degraded and damaged feature shares for " + ", ".join(names)
    return f


def fig_correlation_by_bits(group: Group, th: dict) -> Figure:
    f = Figure(
        "correlation_by_bits",
        "How fast does feature fidelity fall with fewer bits?",
        "Round-to-nearest (RTN) quantization at each bit width. For every active feature we correlate its "
        "activations in the compressed model with those in the FP model over the same tokens (Pearson r; "
        "1 means unchanged). The lines show the mean and the median of r over active features; dotted grey "
        "lines mark the survived (and, when in range, damaged) thresholds. Bits decrease to the right, i.e. "
        "compression grows.",
    )
    rtn = [c for c in group.rtn if math.isfinite(c.value("mean_r"))]
    if len(rtn) < 2:
        f.note = (f"Needs at least two RTN bit widths with active features; this run has "
                  f"{len(rtn)} ({', '.join(c.short for c in rtn) or 'none'}).")
        return f
    bits = np.array([c.bits for c in rtn])
    mean_r = np.array([c.value("mean_r") for c in rtn])
    median_r = np.array([c.value("median_r") for c in rtn])
    fig = _new_figure()
    ax = fig.add_subplot()
    curves = [ax.plot(bits, mean_r, "o-", color=BLUE, lw=2, ms=7, label="mean r")[0]]
    if np.isfinite(median_r).any():
        curves += ax.plot(bits, median_r, "s--", color=ORANGE, lw=1.5, ms=6, label="median r")
    values = [ax.annotate(f"{v:.3f}", (b, v), textcoords="offset points", xytext=(0, -16), ha="center", fontsize=9,
                          color=BLUE, bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.85))
              for b, v in zip(bits, mean_r)]
    lo = float(np.nanmin(np.concatenate([mean_r, median_r])))
    lo = min(lo, th["survived"]) - 0.06  # the damaged line only when the curves come near it
    ax.set_ylim(lo, 1.02)
    lines = [(value, what) for value, what in ((th["survived"], "survived"), (th["damaged"], "damaged"))
             if lo < value < 1.02]
    for value, _ in lines:
        ax.axhline(value, color=GREY, ls=":", lw=1)
    ax.set_xticks(bits, [f"INT{b}" for b in bits])
    ax.set_xlim(bits.max() + 0.4, bits.min() - 0.4)
    ax.set_xlabel("RTN weight precision (bits per weight)")
    ax.set_ylabel("correlation with FP activations (Pearson r)")
    _style(ax)
    ax.legend(loc="lower left", frameon=False)
    _label_thresholds(fig, ax, lines, curves, values)
    f.draw(fig)
    f.alt = "Mean feature correlation by RTN bit width: " + ", ".join(
        f"INT{b} {v:.3f}" for b, v in zip(bits, mean_r))
    return f


def _label_thresholds(fig, ax, lines, curves, taken_texts) -> None:
    """Name each threshold line where no curve, marker, value label or legend crosses the name.

    The first free spot of: right end above the line, right end below, left end above and below, the
    middle above and below (the curves usually fall through a threshold near the low-bit end, where a
    fixed right-hand label would be crossed). The layout is fixed first so measured boxes stay put.
    """
    from matplotlib.path import Path as MplPath
    from matplotlib.transforms import Bbox

    if not lines:
        return
    fig.canvas.draw()
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    paths, boxes = [], [t.get_window_extent(renderer) for t in taken_texts]
    for curve in curves:
        xy = ax.transData.transform(np.column_stack(curve.get_data()).astype(float))
        xy = xy[np.isfinite(xy).all(axis=1)]
        paths.append(MplPath(xy))
        half = curve.get_markersize() * fig.dpi / 72.0 / 2 + 1
        boxes += [Bbox.from_extents(x - half, y - half, x + half, y + half) for x, y in xy]
    if ax.get_legend() is not None:
        boxes.append(ax.get_legend().get_window_extent(renderer))
    inside = ax.get_window_extent(renderer)
    spots = [(0.995, "right", 3, "bottom"), (0.995, "right", -3, "top"), (0.005, "left", 3, "bottom"),
             (0.005, "left", -3, "top"), (0.5, "center", 3, "bottom"), (0.5, "center", -3, "top")]
    for value, what in lines:
        chosen = None
        for x, ha, dy, va in spots:
            t = ax.annotate(f"{what} threshold ({value:g})", (x, value), xycoords=("axes fraction", "data"),
                            textcoords="offset points", xytext=(0, dy), ha=ha, va=va, fontsize=8.5, color="#555555")
            box = t.get_window_extent(renderer).expanded(1.0, 1.0).padded(1.5)
            free = (not any(p.intersects_bbox(box, filled=False) for p in paths)
                    and not any(box.overlaps(b) for b in boxes)
                    and inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1)
            if chosen is None or free:
                if chosen is not None:
                    chosen[0].remove()
                chosen = (t, box)
                if free:
                    break
            else:
                t.remove()
        boxes.append(chosen[1])


def fig_dissociation(group: Group, th: dict) -> Figure:
    f = Figure(
        "dissociation",
        "Does perplexity tell you whether features survived?",
        "Each point is one compressed copy: across, how much worse it predicts the next token than the FP "
        "model (perplexity change, %); up, the share of active features that survived. The star marks the "
        "FP model itself. If perplexity were a good proxy for feature health, the points would fall on "
        "one smooth curve; points at similar perplexity change but very different survival (or the "
        "reverse) show that a perplexity check alone can miss feature damage.",
    )
    conds = [c for c in group.conditions
             if math.isfinite(c.value("dppl_pct")) and math.isfinite(c.value("survived_pct"))]
    if not conds:
        missing_ppl = group.conditions and not any(math.isfinite(c.value("dppl_pct")) for c in group.conditions)
        f.note = ("This run has no perplexities (it was run with --no-ppl)." if missing_ppl
                  else "No compressed condition has both a perplexity change and active features.")
        return f
    x = np.array([c.value("dppl_pct") for c in conds])
    y = np.array([c.value("survived_pct") for c in conds])
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot([0], [100], marker="*", ms=16, color="black", ls="none", label="FP (reference)")
    styles = {"rtn": ("o", BLUE, "RTN quantization"), "prune": ("s", ORANGE, "magnitude pruning"),
              "fp": ("^", GREY, "FP vs FP (null)")}
    seen = set()
    for c, xi, yi in zip(conds, x, y):
        kind = "prune" if c.is_prune else c.method if c.method in styles else "other"
        marker, colour, label = styles.get(kind, ("D", PURPLE, "other"))
        ax.plot([xi], [yi], marker=marker, ms=9, color=colour, ls="none",
                label=None if kind in seen else label, markeredgecolor="white")
        seen.add(kind)
    span = np.abs(np.append(x, 0.0))
    if span.max() > 50:  # paper-scale runs span 1% to several 100%: a symmetric log axis keeps both readable
        ax.set_xscale("symlog", linthresh=1.0)
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("perplexity change vs FP, ΔPPL (%, symmetric log scale)")
    else:
        ax.set_xlabel("perplexity change vs FP, ΔPPL (%)")
    ax.axvline(0, color="#BBBBBB", lw=0.8)
    ax.set_ylabel(f"features survived (% of active, r > {th['survived']:g})")
    ax.set_ylim(max(-2, min(y.min(), 100) - 8), 104)
    ax.set_yticks([t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= 100])  # no ticks above 100%
    xmin, xmax = min(x.min(), 0.0), max(x.max(), 0.0)
    pad = 0.12 * (xmax - xmin or 1.0)
    if ax.get_xscale() == "linear":
        ax.set_xlim(xmin - pad, xmax + pad)
    _style(ax, "both")
    ax.legend(loc="best", frameon=False, fontsize=9)
    _label_points(fig, ax, [c.short for c in conds], x, y)
    f.draw(fig)
    f.alt = "Perplexity change against survival: " + "; ".join(
        f"{c.short} {xi:+.2f}% ΔPPL, {yi:.1f}% survived" for c, xi, yi in zip(conds, x, y))
    return f


def _label_points(fig, ax, labels, x, y) -> None:
    """Name each point beside it, trying a dozen positions so labels overlap no label, point or legend.

    Close points (matched conditions sit almost on top of each other) are the common case this handles;
    the layout is fixed first so that measured label boxes stay where they are drawn.
    """
    fig.canvas.draw()
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    points = ax.transData.transform(np.column_stack([np.append(x, 0.0), np.append(y, 100.0)]))  # + the FP star
    half = 6 * fig.dpi / 72.0  # half a marker, in pixels
    taken = [(p[0] - half, p[1] - half, p[0] + half, p[1] + half) for p in points]
    if ax.get_legend() is not None:
        taken.append(tuple(ax.get_legend().get_window_extent(renderer).extents))
    inside = ax.get_window_extent(renderer)
    offsets = [(7, 5, "left", "bottom"), (7, -5, "left", "top"), (-7, 5, "right", "bottom"),
               (-7, -5, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top"),
               (14, 0, "left", "center"), (-14, 0, "right", "center"),
               (7, 18, "left", "bottom"), (-7, -18, "right", "top"), (7, -18, "left", "top"),
               (-7, 18, "right", "bottom")]
    for i in np.argsort(-np.asarray(y, float), kind="stable"):  # top points first
        chosen = None
        for dx, dy, ha, va in offsets:
            t = ax.annotate(labels[i], (x[i], y[i]), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                            fontsize=9.5, annotation_clip=False)
            b = t.get_window_extent(renderer)
            box = (b.x0 - 1, b.y0 - 1, b.x1 + 1, b.y1 + 1)
            free = all(box[2] < o[0] or box[0] > o[2] or box[3] < o[1] or box[1] > o[3] for o in taken)
            within = inside.x0 <= box[0] and box[2] <= inside.x1 and inside.y0 <= box[1] and box[3] <= inside.y1
            if free and within:
                if chosen is not None:
                    chosen[0].remove()
                chosen = (t, box)
                break
            if chosen is None:
                chosen = (t, box)  # nothing free so far: the first position stands in
            else:
                t.remove()
        taken.append(chosen[1])


def pick_pair(group: Group) -> tuple[Condition, Condition, str] | None:
    """(RTN condition, pruning condition, why) to compare feature by feature, or None.

    Matched pruning is paired with the RTN condition it was matched to. Otherwise the pruning condition
    (the one whose ΔPPL is closest to INT6's when there are several) is paired with the RTN condition of
    closest ΔPPL; without perplexities, INT6 (or the first RTN condition) stands in.
    """
    rtn, prune = group.rtn, group.prune
    if not rtn or not prune:
        return None
    dppl = lambda c: c.value("dppl_pct")  # noqa: E731
    for p in prune:
        target = group.find(str(p.desc.get("target") or ""))
        if p.method == "prune-matched" and target is not None and target.is_rtn:
            return target, p, f"{p.short} was matched to {target.short}'s perplexity"
    int6 = group.find(DEFAULT_CONDITION)
    p = prune[0]
    if len(prune) > 1 and int6 is not None and math.isfinite(dppl(int6)):
        p = min(prune, key=lambda c: abs(dppl(c) - dppl(int6)) if math.isfinite(dppl(c)) else math.inf)
    scored = [c for c in rtn if math.isfinite(dppl(c))]
    if math.isfinite(dppl(p)) and scored:
        r = min(scored, key=lambda c: abs(dppl(c) - dppl(p)))
        return r, p, (f"{r.short} is the RTN condition whose ΔPPL ({dppl(r):+.2f}%) is closest to "
                      f"{p.short}'s ({dppl(p):+.2f}%)")
    r = int6 if int6 is not None and int6.is_rtn else rtn[0]
    return r, p, f"no perplexities to match on, so {r.short} is used"


class _Features:
    """Per-feature tables of a run, loaded once each."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._cache: dict[str, pd.DataFrame] = {}

    def __call__(self, c: Condition) -> pd.DataFrame:
        if c.name not in self._cache:
            self._cache[c.name] = load_features(self.run_dir, c.name)
        return self._cache[c.name]


def fig_rtn_vs_prune(group: Group, th: dict, feats: _Features, pair) -> Figure:
    f = Figure(
        "rtn_vs_prune",
        "Do quantization and pruning damage the same features?",
        "Each dot is one feature that is active in the FP model: across, its correlation with FP under RTN "
        "quantization; up, under magnitude pruning of similar perplexity. Dotted lines mark the survived "
        "threshold on each axis. Dots near the diagonal were hurt equally by both methods; colour says "
        "which method(s) it survived. A high Jaccard overlap of the non-survived sets means the fragile "
        "features are a property of the features, not of the compression method.",
    )
    if pair is None:
        f.note = ("Needs one RTN and one pruning condition; this run has "
                  f"{len(group.rtn)} RTN and {len(group.prune)} pruning condition(s).")
        return f
    a, b, why = pair
    try:
        res = overlap(feats(a), feats(b), labels=(a.short, b.short), survival=th["survived"], damage=th["damaged"])
    except QdmError as exc:
        f.note = f"Could not compare {a.short} and {b.short}: {exc}"
        return f
    ta = feats(a).sort_values("feature", kind="stable")
    tb = feats(b).sort_values("feature", kind="stable")
    active = active_mask(ta)
    ra, rb = ta["r"].to_numpy(float)[active], tb["r"].to_numpy(float)[active]
    both = np.isfinite(ra) & np.isfinite(rb)
    sa, sb = ra > th["survived"], rb > th["survived"]
    groups = [
        ("survived both", sa & sb, BLUE, "o"),
        (f"survived {a.short} only", sa & ~sb, ORANGE, "^"),
        (f"survived {b.short} only", ~sa & sb, GREEN, "v"),
        ("survived neither", ~sa & ~sb, VERMILLION, "s"),
    ]
    n = int(both.sum())
    size, alpha = (14, 0.8) if n < 2000 else (5, 0.45)
    fig = _new_figure(7.2, 6.2)
    ax = fig.add_subplot()
    for label, mask, colour, marker in groups:
        m = mask & both
        ax.scatter(ra[m], rb[m], s=size, c=colour, marker=marker, alpha=alpha, linewidths=0,
                   label=f"{label} ({int(m.sum())})")
    lo = float(np.nanmin(np.concatenate([ra[both], rb[both], [th["survived"]]]))) if n else 0.0
    lo = max(-1.0, lo - 0.05)
    ax.plot([lo, 1.0], [lo, 1.0], color="#999999", lw=1, ls="--", zorder=0)
    ax.axvline(th["survived"], color=GREY, ls=":", lw=1)
    ax.axhline(th["survived"], color=GREY, ls=":", lw=1)
    ax.set_xlim(lo, 1.01)
    ax.set_ylim(lo, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(f"r under {a.short} (correlation with FP activations)")
    ax.set_ylabel(f"r under {b.short} (correlation with FP activations)")
    ax.set_title(f"Jaccard of non-survived sets {_fmt(res.jaccard('non_survived'), '.3f')}, "
                 f"Spearman of damage (1 − r) {_fmt(res.spearman_damage, '.3f')}", fontsize=10.5)
    _style(ax, "both")
    legend = ax.legend(loc="upper left", frameon=True, framealpha=0.9, fontsize=9, markerscale=1.6)
    for handle in legend.legend_handles:
        handle.set_alpha(1.0)
    f.draw(fig)
    undefined = int((~both).sum())
    f.caption = (f"Pairing: {html.escape(why)}. {n} active features drawn"
                 + (f"; {undefined} with an undefined r in either condition are not drawn." if undefined else "."))
    f.alt = f"Per-feature r under {a.short} against {b.short}"
    return f


def fig_deciles(group: Group, th: dict, feats: _Features, pair, focus: Condition | None) -> Figure:
    f = Figure(
        "deciles",
        "Are rare features more fragile?",
        "Active features are sorted by how often they fire in the FP model and cut into ten equally "
        "large groups (deciles; 1 = rarest). Each bar is the share of a decile's features that did "
        "<b>not</b> survive (r &le; survived threshold, or undefined). Under each decile number is the "
        "decile's mean FP firing rate (fraction of token positions where the feature is non-zero).",
    )
    try:
        if pair is not None:
            a, b, _ = pair
            table = overlap(feats(a), feats(b), labels=(a.short, b.short), survival=th["survived"],
                            damage=th["damaged"]).deciles
            series = [(a.short, table[f"{a.short}_non_survived_pct"], BLUE),
                      (b.short, table[f"{b.short}_non_survived_pct"], ORANGE)]
        elif focus is not None:
            t = feats(focus)
            active = active_mask(t)
            r = t["r"].to_numpy(float)[active]
            cls = classify_active(r, np.ones(r.size, bool), survival=th["survived"], damage=th["damaged"])
            if r.size == 0:
                raise QdmError(f"{focus.short} has no active features")
            table = firing_rate_deciles(t["fp_rate"].to_numpy(float)[active], cls, cls, 1 - r, 1 - r,
                                        labels=(focus.short, "same"))
            series = [(focus.short, table[f"{focus.short}_non_survived_pct"], BLUE)]
        else:
            f.note = "No compressed condition with per-feature results to split by firing rate."
            return f
    except QdmError as exc:
        f.note = f"Could not build the firing-rate deciles: {exc}"
        return f
    fig = _new_figure()
    ax = fig.add_subplot()
    x = np.arange(len(table))
    width = 0.8 / len(series)
    decimals = _pct_decimals(np.concatenate([np.asarray(v, dtype=float) for _, v, _ in series]))
    for i, (label, values, colour) in enumerate(series):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, color=colour, label=label)
        if len(series) == 1 or len(table) <= 10:
            ax.bar_label(bars, labels=[_pct_label(v, decimals) for v in values], fontsize=8, padding=1)
    ticks = [f"{int(d)}\n{rate:.1e}" if rate < 0.01 else f"{int(d)}\n{rate:.3f}"  # numbered 1..10 by overlap
             for d, rate in zip(table["firing_decile"], table["mean_firing_rate"])]
    ax.set_xticks(x, ticks, fontsize=8.5)
    ax.set_xlabel("FP firing-rate decile (1 = rarest), with its mean firing rate")
    ax.set_ylabel("features not survived (% of decile)")
    ax.set_ylim(0, max(5.0, float(np.nanmax([np.nanmax(v) for _, v, _ in series]))) * 1.15)
    _style(ax)
    ax.legend(frameon=False)
    f.draw(fig)
    if len(table) < 10:
        f.caption = f"Tied firing rates merged some deciles: {len(table)} groups."
    f.alt = "Non-survival by FP firing-rate decile for " + " and ".join(s[0] for s in series)
    return f


def _oof_roc(features: pd.DataFrame, survival: float):
    """Out-of-fold survival probabilities with fit_predictor's CV (recipe 'ours'), and the labels."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    stats = fp_statistics(features)
    r = features["r"].to_numpy(np.float64)[active_mask(features)]
    y = (classify_active(r, np.ones(r.size, bool), survival=survival, damage=survival) == "survived").astype(int)
    x = stats[list(STATISTICS)].to_numpy(np.float64)
    proba = np.full(y.size, np.nan)
    folds = []
    model = make_pipeline(StandardScaler(), _model(1.0))
    for train, test in StratifiedKFold(n_splits=N_SPLITS, shuffle=True, random_state=SEED).split(x, y):
        fitted = clone(model).fit(x[train], y[train])
        proba[test] = fitted.predict_proba(x[test])[:, 1]
        folds.append(test)
    return y, proba, folds


def fig_predictor(group: Group, th: dict, feats: _Features, focus: Condition | None,
                  why: str) -> tuple[Figure, Figure]:
    roc = Figure(
        "predictor_roc",
        "Can FP statistics alone predict which features survive?",
        "A logistic regression sees only four statistics of each feature measured on the FP model "
        "(how rare it is, its log mean and log peak activation, and how concentrated it is: peak / mean) "
        f"and predicts whether the feature survives (r &gt; {th['survived']:g}). It is scored by "
        f"{N_SPLITS}-fold stratified cross-validation, so every prediction is for a feature the model "
        "was not fitted on. The ROC curve trades the share of surviving features recognised (up) "
        "against the share of non-surviving features wrongly called survivors (across); the area under "
        "it (AUC) is 0.5 for guessing and 1 for a perfect ranking.",
    )
    quart = Figure(
        "predictor_quartiles",
        "Survival by quartile of each FP statistic",
        "For each statistic, active features are cut into four equally large groups, Q1 (lowest values) "
        "to Q4 (highest), and the bar is the share of the group that survived. A staircase means the "
        "statistic alone already separates fragile from robust features.",
    )
    if focus is None:
        roc.note = quart.note = why
        return roc, quart
    try:
        res = fit_predictor(feats(focus), recipe="ours", survival=th["survived"], n_splits=N_SPLITS, seed=SEED)
    except QdmError as exc:
        roc.note = quart.note = f"Skipped for {focus.short}: {exc}."
        return roc, quart
    from sklearn.metrics import roc_auc_score, roc_curve

    y, proba, folds = _oof_roc(feats(focus), th["survived"])
    fig = _new_figure(6.6, 5.6)
    ax = fig.add_subplot()
    for i, test in enumerate(folds):
        fpr, tpr, _ = roc_curve(y[test], proba[test])
        ax.plot(fpr, tpr, color="#AAAAAA", lw=1, label="single folds" if i == 0 else None)
    fpr, tpr, _ = roc_curve(y, proba)
    pooled = roc_auc_score(y, proba)
    ax.plot(fpr, tpr, color=BLUE, lw=2.5, label=f"all folds pooled (AUC {pooled:.3f})")
    ax.plot([0, 1], [0, 1], color=GREY, ls="--", lw=1, label="guessing (AUC 0.5)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate\n(non-survivors predicted to survive, fraction)")
    ax.set_ylabel("true positive rate\n(survivors predicted to survive, fraction)")
    ax.set_title(f"{focus.short}: CV ROC AUC {res.auc_mean:.3f} ± {res.auc_std:.3f}", fontsize=11)
    _style(ax, "both")
    ax.legend(loc="lower right", frameon=False, fontsize=9)
    roc.draw(fig)
    roc.caption = (f"{html.escape(why)} {res.n_samples} active features, {res.n_survived} survived "
                   f"({100 * res.frac_survived:.1f}%). Mean AUC over the {N_SPLITS} folds "
                   f"{res.auc_mean:.3f} ± {res.auc_std:.3f} (as <code>qdm-engine predict</code> reports); "
                   f"the pooled curve's AUC is {pooled:.3f}.")
    roc.alt = f"ROC curve of the survival predictor for {focus.short}, AUC {res.auc_mean:.3f}"

    q = res.quartiles
    fig = _new_figure(8.0, 4.6)
    ax = fig.add_subplot()
    stats = [s for s in STATISTICS if s in set(q["statistic"])]
    width = 0.2
    decimals = _pct_decimals(q[q["statistic"].isin(stats)]["survived_pct"])
    for k in range(4):
        values = [q[(q["statistic"] == s) & (q["quartile"] == k)]["survived_pct"] for s in stats]
        values = [float(v.iloc[0]) if len(v) else np.nan for v in values]
        bars = ax.bar(np.arange(len(stats)) + (k - 1.5) * width, values, width, color=QUARTILE_COLOURS[k],
                      label=f"Q{k + 1}" + (" (lowest)" if k == 0 else " (highest)" if k == 3 else ""),
                      edgecolor="white", linewidth=0.5)
        ax.bar_label(bars, labels=[_pct_label(v, decimals) for v in values], fontsize=8, padding=1)
    ax.set_xticks(np.arange(len(stats)), [STAT_LABELS.get(s, s) for s in stats])
    ax.set_ylabel("features survived (% of quartile)")
    ax.set_title(f"{focus.short}: survival by quartile", fontsize=11, pad=26)
    ax.set_xlabel("FP statistic the features are split by")
    ax.set_ylim(0, 112)
    _style(ax)
    ax.legend(ncols=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=9)
    quart.draw(fig)
    quart.caption = (f"{html.escape(focus.short)}. Overall {100 * res.frac_survived:.1f}% of active features survived. "
                     "log concentration = log peak - log mean, so those three statistics carry the same "
                     "information twice.")
    quart.alt = f"Survival by quartile of each FP statistic for {focus.short}"
    return roc, quart


def pick_focus(group: Group, condition: str | None) -> tuple[Condition | None, str]:
    """The condition of the feature-level figures: the user's, else the most compressed condition whose
    outcomes are still mixed (report_features.pick_mixed)."""
    if condition is not None:
        c = group.find(condition)
        if c is None:
            return None, f"This SAE has no condition '{condition}'."
        return c, ""
    from qdm_engine.report_features import pick_mixed

    return pick_mixed(group)


# ----------------------------------------------------------------------------------------------------
# The page

CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color: #1a1a1a;
       max-width: 1060px; margin: 2em auto; padding: 0 1.2em; line-height: 1.5; font-size: 16px; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { margin-top: 1.8em; } .sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.86em; }
th, td { padding: 0.3em 0.45em; border-bottom: 1px solid #e3e3e3; text-align: right; }
table.summary th, table.summary td { white-space: nowrap; font-variant-numeric: tabular-nums; }
table.summary tr.fp td { background: #fafafa; }
th { background: #f3f5f8; } td.l, th.l { text-align: left; }
table.id td { text-align: left; vertical-align: top; } table.id td:first-child { color: #555; white-space: nowrap; }
.scroll { overflow-x: auto; } code { font-size: 0.92em; background: #f3f3f3; padding: 0 0.2em; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92em; margin-top: 0.4em; }
.read { background: #f6f8fb; border-left: 4px solid #0072B2; padding: 0.6em 0.9em; }
.note { background: #fff6e5; border-left: 4px solid #E69F00; padding: 0.6em 0.9em; }
ul.glance li { margin: 0.25em 0; } footer { color: #777; font-size: 0.85em; margin-top: 3em; }
"""

SUMMARY_COLUMNS = [  # (column, header, format, explanation)
    ("condition", "condition", None, "compressed copy of the model (fp: the original)"),
    ("ppl", "PPL", ".3f", "perplexity on the audit tokens (lower is better)"),
    ("dppl_pct", "ΔPPL %", "+.2f", "perplexity change vs FP, in %"),
    ("ppl_sliding", "PPL sliding", ".3f", "sliding-window perplexity (qdm-engine ppl)"),
    ("dppl_sliding_pct", "ΔPPL sliding %", "+.2f", "sliding-window perplexity change vs FP, in %"),
    ("mean_r", "mean r", ".3f", "mean correlation of active features with FP"),
    ("median_r", "median r", ".3f", "median correlation of active features with FP"),
    ("survived_pct", "survived %", ".2f", "active features with r above the survived threshold"),
    ("degraded_pct", "degraded %", ".2f", "active features between the thresholds"),
    ("damaged_pct", "damaged %", ".2f", "active features with r below the damaged threshold"),
    ("n_active", "active", "d", "features firing on more than the active rate of FP positions"),
    ("undefined_n", "undefined", "d", "active features whose r is undefined (constant once compressed)"),
    ("n_tokens", "tokens", "d", "scored token positions"),
    ("explained_variance", "expl. var.", ".4f", "variance of this model's read-outs the FP SAE's reconstruction explains"),
    ("ce_loss_score", "CE score", ".4f", "spliced CE loss score of the FP SAE on this model (sweep --splice)"),
]


def _cell(v, spec: str | None) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and not math.isfinite(v)):
        return "&ndash;"
    if spec is None:
        return html.escape(str(v))
    try:
        return format(int(v) if spec == "d" else float(v), spec)
    except (TypeError, ValueError):
        return html.escape(str(v))


def summary_table(summary: pd.DataFrame) -> str:
    cols = [c for c in SUMMARY_COLUMNS if c[0] in summary.columns]
    extra = []
    if "sae" in summary.columns and summary["sae"].nunique() > 1:
        extra = [("sae", "SAE", None, "SAE tag")]
    method = summary["method"] if "method" in summary.columns else None
    head = "".join(f'<th class="{"l" if spec is None else ""}" title="{html.escape(tip)}">{html.escape(h)}</th>'
                   for _, h, spec, tip in extra + cols[:1]) + "<th class=\"l\">method</th>" + "".join(
        f'<th title="{html.escape(tip)}">{html.escape(h)}</th>' for _, h, _, tip in cols[1:])
    rows = []
    for row in summary.to_dict(orient="records"):
        name = str(row.get("condition"))
        short = name.rsplit("/", 1)[-1]
        m, bits = _method_of(short, row.get("method") if method is not None else None)
        desc = {"rtn": f"RTN {bits}-bit" if bits else "RTN", "fp": "original" if short == "fp" else "FP null",
                "prune": "pruning", "prune-matched": "matched pruning"}.get(m, m)
        if m.startswith("prune") and math.isfinite(_num(row.get("sparsity"))):
            desc += f" {100 * _num(row.get('sparsity')):.1f}%"
        if extra:  # several SAEs: the SAE column holds the tag, the condition column the rest
            row = {**row, "condition": short}
        cells = "".join(f'<td class="l">{_cell(row.get(c), s)}</td>' for c, _, s, _ in extra + cols[:1])
        cells += f'<td class="l">{html.escape(desc)}</td>'
        cells += "".join(f"<td>{_cell(row.get(c), s)}</td>" for c, _, s, _ in cols[1:])
        rows.append(f'<tr class="fp">{cells}</tr>' if short == "fp" else f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}' \
           f"</tbody></table></div>"


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _identity_rows(config: dict, th: dict) -> list[tuple[str, str]]:
    model, sae, tok = config.get("model") or {}, config.get("sae") or {}, config.get("tokens") or {}
    versions = config.get("versions") or {}
    saes = config.get("saes") or ([{"hook": config.get("hook"), **sae}] if sae else [])
    rows = [("model", " ".join(x for x in [
        str(model.get("source", "unknown")),
        f"({model['class']}" + (f", {model['n_params']:,} parameters" if model.get("n_params") else "") + ")"
        if model.get("class") else "",
        f"commit {model['commit']}" if model.get("commit") else ""] if x))]
    if model.get("dtype") or config.get("dtype"):
        dtype = model.get("dtype") or config.get("dtype")
        rows.append(("model dtype, device", f"{dtype}, {config.get('device', '?')}"))
    for s in saes:
        what = str(s.get("source", "unknown"))
        if s.get("release"):
            what = f"{s['release']} / {s.get('sae_id')}"
        detail = ", ".join(x for x in [s.get("architecture"), f"{s['d_sae']:,} features" if s.get("d_sae") else None,
                                        f"d_in {s['d_in']}" if s.get("d_in") else None] if x)
        label = f"SAE {s['tag']}" if len(saes) > 1 and s.get("tag") else "SAE"
        rows.append((label, f"{what} ({detail})" if detail else what))
        rows.append((f"read-out site{' of ' + s['tag'] if len(saes) > 1 and s.get('tag') else ''}",
                     str(s.get("hook") or s.get("hook_name") or config.get("hook", "?"))))
    if tok:
        text = str(tok.get("text", "?"))
        sha = tok.get("text_sha256")
        rows.append(("audit text", text + (f" (sha256 {sha[:16]}…)" if sha else "")))
        bits = [f"{tok['scored_positions']:,} scored positions" if tok.get("scored_positions") else None,
                f"{tok['n_blocks']:,} blocks of {tok.get('block_len')}" if tok.get("n_blocks") else None,
                ("BOS prepended, not scored" if tok.get("bos") else "no BOS") if "bos" in tok else None]
        rows.append(("tokens", ", ".join(b for b in bits if b)))
        if tok.get("calibration"):
            cal = tok["calibration"]
            rows.append(("matched-pruning calibration", f"{cal.get('blocks')} blocks of {cal.get('text')}, "
                                                        f"disjoint from the audit ({cal.get('disjoint')})"))
    rows.append(("thresholds", f"active: FP firing rate &gt; {th['active']:g}; survived: r &gt; {th['survived']:g}; "
                               f"damaged: r &lt; {th['damaged']:g}"))
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "platform")
                     + (f"; {versions['platform']}" if versions.get("platform") else "")))
    if config.get("started"):
        wall = config.get("wall_seconds")
        took = f" ({wall:.1f} s)" if isinstance(wall, (int, float)) else ""
        rows.append(("run started", f"{config['started']}{took}"))
    if config.get("command"):
        rows.append(("command", "<code>" + html.escape(" ".join(map(str, config["command"]))) + "</code>"))
    return [(k, v if k in ("thresholds", "command") else html.escape(v)) for k, v in rows]


def _glance(group: Group, th: dict) -> list[str]:
    """Two or three plain sentences a reader can take away without reading the figures."""
    out = []
    n_active = _num(group.fp_row.get("n_active"))
    d_sae = (group.identity or {}).get("d_sae")
    if math.isfinite(n_active):
        out.append(f"{int(n_active):,}" + (f" of the SAE's {int(d_sae):,}" if d_sae else "")
                   + " features are active (fire on more than "
                   f"{100 * th['active']:g}% of FP token positions); every percentage below is of these.")
    scored = [c for c in group.conditions if c.method != "fp" and math.isfinite(c.value("survived_pct"))]
    for c in scored:
        if c.short == DEFAULT_CONDITION or len(scored) == 1:
            out.append(f"<b>{html.escape(c.short)}</b>: perplexity {_fmt(c.value('dppl_pct'), '+.2f')}% vs FP, "
                       f"{c.value('survived_pct'):.1f}% of features survived, {c.value('damaged_pct'):.1f}% damaged, "
                       f"mean r {_fmt(c.value('mean_r'), '.3f')}.")
    quiet = [c for c in scored if math.isfinite(c.value("dppl_pct")) and abs(c.value("dppl_pct")) < 5.0]
    if quiet:
        worst = min(quiet, key=lambda c: c.value("survived_pct"))
        if worst.value("survived_pct") < 95.0:
            out.append(f"Perplexity can miss feature damage: <b>{html.escape(worst.short)}</b> changes perplexity "
                       f"by only {worst.value('dppl_pct'):+.2f}%, yet {100 - worst.value('survived_pct'):.1f}% of "
                       "features did not survive.")
    return out


INTRO = """
<p>A sparse autoencoder (SAE) splits a language model's internal activations at one layer into many
<em>features</em>, most of which fire rarely and stand for something recognisable. This report checks
whether those features are still there after the model is compressed. The full-precision (FP) model and
each compressed copy read the <em>same</em> tokens; the same frozen SAE encodes both models' activations at
the same layer; and for every feature we compute the Pearson correlation <b>r</b> between its FP and its
compressed activations over all token positions. r&nbsp;=&nbsp;1 means the feature behaves exactly as
before. Features are then called <b>survived</b> (r&nbsp;&gt;&nbsp;{s:g}), <b>degraded</b> or
<b>damaged</b> (r&nbsp;&lt;&nbsp;{d:g}); only <b>active</b> features (those firing on more than
{a:g}% of FP positions) are counted.</p>
<p>Compression methods: <b>RTN INT<i>b</i></b> rounds each weight of the transformer blocks to <i>b</i>
bits (one scale per output row); <b>prune-<i>s</i></b> sets the fraction <i>s</i> of smallest weights of each
tensor to zero. The usual acceptance test for a compressed model is its <b>perplexity</b> (how surprised
it is by the text; lower is better); the point of this audit is that perplexity and feature survival can
disagree. The method follows "Perplexity Can Miss SAE Feature Damage Under Quantization"
(arXiv:2606.03002).</p>
"""


def _mpl_version() -> str:
    import matplotlib

    return html.escape(matplotlib.__version__)


def _figure_html(n: int, f: Figure) -> str:
    head = f"<h3>Figure {n}. {f.title}</h3>\n"
    if f.png is None:  # no figure: the note alone, without instructions for reading it
        return head + f'<p class="note"><b>Not drawn.</b> {html.escape(f.note)}</p>\n'
    head += f'<p class="read"><b>How to read it.</b> {f.how_to_read}</p>\n'
    data = base64.b64encode(f.png).decode("ascii")
    caption = f"<figcaption>{f.caption}</figcaption>" if f.caption else ""
    return head + (f'<figure><img src="data:image/png;base64,{data}" width="{f.width}" alt="{html.escape(f.alt)}">'
                   f"{caption}</figure>\n")


def _page(config: dict, summary: pd.DataFrame, th: dict, sections: list[tuple[Group, list[Figure]]],
          run_dir: Path, damaged: dict | None = None) -> str:
    model = (config.get("model") or {}).get("source", "a model")
    ident = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in _identity_rows(config, th))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>SAE feature survival: {html.escape(str(model))}</title>",
        f"<style>{CSS}{FEATURES_CSS}</style></head><body>",
        "<h1>Do the SAE features survive compression?</h1>",
        f'<p class="sub">qdm-engine report for <b>{html.escape(str(model))}</b>, run folder '
        f"<code>{html.escape(run_dir.name)}</code></p>",
        "<h2>What was measured</h2>",
        INTRO.format(s=th["survived"], d=th["damaged"], a=100 * th["active"]),
    ]
    for group, _ in sections:
        glance = _glance(group, th)
        if glance:
            title = "At a glance" + (f": SAE {html.escape(group.tag)}" if group.tag else "")
            parts += [f"<h2>{title}</h2>", '<ul class="glance">' + "".join(f"<li>{g}</li>" for g in glance) + "</ul>"]
    parts += [
        "<h2>The run</h2>",
        f'<table class="id">{ident}</table>',
        "<h2>Summary</h2>",
        "<p>One row per condition (hover a column header for its meaning). Percentages are of active "
        "features; <i>undefined</i> counts active features whose r cannot be computed.</p>",
        summary_table(summary),
    ]
    n = 0
    for group, figures in sections:
        tag = f" for SAE {html.escape(group.tag)}" if group.tag else ""
        parts.append(f"<h2>Figures{tag}</h2>")
        for f in figures:
            n += 1
            parts.append(_figure_html(n, f))
        if (damaged or {}).get(group.tag):
            parts += [f"<h2>Most damaged features{tag}</h2>", damaged[group.tag]]
    parts += [
        f"<footer>Generated by qdm-engine {html.escape(__version__)} (matplotlib {_mpl_version()}) on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from the stored run folder; no model was "
        "rerun. The PNG files beside this page are the same figures.</footer>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------------


def _thresholds(config: dict) -> dict:
    th = config.get("thresholds") or {}
    return {"active": float(th.get("active", 1e-3)), "survived": float(th.get("survived", SURVIVAL)),
            "damaged": float(th.get("damaged", DAMAGE))}


def make_report(run_dir: str | Path, out: str | Path | None = None, *, condition: str | None = None) -> Path:
    """Write the figures and `report.html` of a run folder into `out` (default RUN_DIR/report); returns the page.

    `condition` picks the condition of the feature-level figures and of the most damaged features (default:
    the most compressed condition whose outcomes are still mixed). Raises QdmError for a folder that is
    not a run, or a condition the run does not have.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise QdmError("the report needs matplotlib: pip install matplotlib") from None
    run = Path(run_dir).expanduser()
    config = load_config(run)
    try:
        summary = load_summary(run)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        raise QdmError(f"'{run_dir}' has no readable summary.csv; it is not a complete run folder") from None
    th = _thresholds(config)
    groups = _groups(run, config, summary)
    if condition is not None and not any(g.find(condition) for g in groups):
        names = [c.name for g in groups for c in g.conditions]
        raise QdmError(f"condition '{condition}' is not in run '{run_dir}'; it has: {', '.join(names) or 'none'}")

    from qdm_engine.report_features import damaged_section, fig_failure_types
    from qdm_engine.report_recon import fig_reconstruction_by_bits

    feats = _Features(run)
    sections, damaged = [], {}
    for group in groups:
        pair = pick_pair(group)
        focus, why = pick_focus(group, condition)
        figures = [fig_taxonomy(group, th), fig_correlation_by_bits(group, th), fig_dissociation(group, th),
                   fig_rtn_vs_prune(group, th, feats, pair), fig_deciles(group, th, feats, pair, focus),
                   *fig_predictor(group, th, feats, focus, why),
                   fig_failure_types(group, run, Figure, _new_figure, _style),
                   fig_reconstruction_by_bits(group, Figure, _new_figure, _style)]
        sections.append((group, figures))
        damaged[group.tag] = damaged_section(run, group, focus)

    out = run / "report" if out is None else Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = set()
        for group, figures in sections:
            prefix = f"{group.tag}-" if group.tag else ""
            for f in figures:
                if f.png is not None:
                    path = out / f"{prefix}{f.key}.png"
                    path.write_bytes(f.png)
                    written.add(path.name)
        for stale in out.glob("*.png"):  # figures of an earlier report that this run no longer supports
            if stale.name not in written and any(stale.stem == k or stale.stem.endswith("-" + k) for k in FIGURES):
                stale.unlink()
        page = out / "report.html"
        tmp = out / ".report.html.partial"
        tmp.write_text(_page(config, summary, th, sections, run, damaged), encoding="utf-8")
        os.replace(tmp, page)
    except OSError as exc:
        raise QdmError(f"cannot write the report to '{out}' ({exc.strerror or exc}); pass --out DIR") from None
    return page
