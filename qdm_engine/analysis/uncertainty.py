"""How sure is a figure? Block-bootstrap intervals of per-feature r and of the taxonomy percentages.

The run keeps each condition's float64 moments per bootstrap unit: a run of consecutive audit blocks
(about n_blocks / 64 blocks, never across a batch; see engine.runner). A bootstrap replicate draws U units
with replacement (multiplicities w_u) and pools their moments exactly as one audit over those units would:
with every unit mean taken relative to the full-sample mean g (so the squares see only unit-to-unit
spread, not the feature's size),
    n = sum w_u n_u,   S_x = sum w_u n_u (m_xu - g_x),   S_xx = sum w_u (M2x_u + n_u (m_xu - g_x)^2),
    S_xy = sum w_u (Cxy_u + n_u (m_xu - g_x)(m_yu - g_y)),
    M2x = S_xx - S_x^2 / n,   Cxy = S_xy - S_x S_y / n,   r = Cxy / sqrt(M2x M2y),
so a replicate costs a few [B, U] x [U, F] products, never a model pass. Resampling whole blocks keeps the
correlation between neighbouring tokens inside a unit, which a per-token bootstrap would ignore and so
understate the spread. The 95% interval is the 2.5th..97.5th percentile of the replicates' r (replicates
where r is undefined, a side constant over the drawn units, are left out; r_lo and r_hi are NaN when more
than half are).

The taxonomy percentages need more care: a share of features above a threshold is not a smooth statistic.
Every replicate's r carries sampling noise on top of the sample's own, so features near a threshold
cross it more often in replicates than their r does, and the replicates' shares sit to one side of the
sample's (at int6 on the default run, 8k tokens: survived 99.31% in the sample, 98.16..99.01% in the
replicates). That shift, mean(replicates) - p, is the bootstrap's estimate of the share's own bias at this budget
(here: the sample share is lower than the share at unlimited tokens), so the percentages get the
bias-corrected normal interval (2 p - mean) +- 1.96 sd(replicates), clipped to 0..100: an interval for the
share at unlimited tokens, which can lie beside the sample's share when the budget is small. (The basic
interval [2 p - q97.5, 2 p - q2.5] does the same correction but collapses to a point at 0 or 100%.) Each replicate classifies the features that are
active in the full sample (the audited set stays fixed).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from qdm_engine.analysis.taxonomy import Thresholds

DEFAULT_REPLICATES = 1000
MIN_FIRES = 30  # an active feature firing on fewer FP positions gets a warning: its r rests on few points
_FEATURE_CHUNK = 1024


def replicate_weights(n_units: int, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> np.ndarray:
    """[B, U] float64 multiplicities of each unit in each replicate (U draws with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=replicates).astype(np.float64)


def replicate_r(packed: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B, F] r of each replicate from unit moments `packed` [U, 9, F] (FeatureMoments.pack order)."""
    packed = np.asarray(packed, dtype=np.float64)
    n_u = packed[:, 0, :1]  # [U, 1]: n is the same for every feature
    n = weights @ n_u  # [B, 1]
    out = np.empty((weights.shape[0], packed.shape[2]))
    for lo in range(0, packed.shape[2], _FEATURE_CHUNK):
        p = packed[:, :, lo:lo + _FEATURE_CHUNK]
        mx, my, m2x, m2y, cxy = p[:, 1], p[:, 2], p[:, 3], p[:, 4], p[:, 5]
        tot = n_u.sum()
        dx = mx - (n_u * mx).sum(0) / tot
        dy = my - (n_u * my).sum(0) / tot
        sx, sy = weights @ (n_u * dx), weights @ (n_u * dy)
        with np.errstate(divide="ignore", invalid="ignore"):
            vx = weights @ (m2x + n_u * dx * dx) - sx * sx / n
            vy = weights @ (m2y + n_u * dy * dy) - sy * sy / n
            cov = weights @ (cxy + n_u * dx * dy) - sx * sy / n
            denom = np.sqrt(np.clip(vx, 0, None) * np.clip(vy, 0, None))
            r = np.where(denom > 0, cov / denom, np.nan)
        out[:, lo:lo + _FEATURE_CHUNK] = np.clip(r, -1.0, 1.0)
    return out


def _percentiles(reps: np.ndarray, q=(2.5, 97.5)) -> tuple[np.ndarray, np.ndarray]:
    """Per column percentiles over the defined replicates; NaN where more than half are undefined."""
    lo, hi = np.full(reps.shape[1], np.nan), np.full(reps.shape[1], np.nan)
    defined = np.isfinite(reps)
    full = defined.all(0)
    if full.any():
        lo[full], hi[full] = np.percentile(reps[:, full], q, axis=0)
    part = ~full & (defined.sum(0) * 2 > reps.shape[0])
    if part.any():
        lo[part], hi[part] = np.nanpercentile(reps[:, part], q, axis=0)
    return lo, hi


def _shares(r: np.ndarray, th: Thresholds) -> dict[str, np.ndarray]:
    """Per row of r [B, active features]: the survived / degraded / damaged percentages (NaN r: none)."""
    return {"survived": 100.0 * (r > th.survived).mean(1),
            "degraded": 100.0 * ((r >= th.damaged) & (r <= th.survived)).mean(1),
            "damaged": 100.0 * (r < th.damaged).mean(1)}


def intervals(packed: np.ndarray, active: np.ndarray, th: Thresholds = Thresholds(),
              replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Per-feature r_lo, r_hi and the summary intervals of one condition from its unit moments.

    Returns (table with feature, r_lo, r_hi; dict of survived/degraded/damaged _lo/_hi percentages and the
    number of units and replicates)."""
    packed = np.asarray(packed, dtype=np.float64)
    n_units = packed.shape[0]
    active = np.asarray(active, dtype=bool)
    reps = replicate_r(packed, replicate_weights(n_units, replicates, seed))
    r_lo, r_hi = _percentiles(reps)
    table = pd.DataFrame({"feature": np.arange(packed.shape[2], dtype=np.int64), "r_lo": r_lo, "r_hi": r_hi})
    stats = {"boot_units": n_units, "boot_replicates": replicates}
    if active.any():
        sample = replicate_r(packed, np.ones((1, n_units)))[0]  # the full sample's r (every unit once)
        for name, p in _shares(sample[None, active], th).items():
            v = _shares(reps[:, active], th)[name]
            centre, half = 2 * p[0] - v.mean(), 1.959964 * v.std(ddof=1)
            stats[f"{name}_lo"] = float(np.clip(centre - half, 0.0, 100.0))
            stats[f"{name}_hi"] = float(np.clip(centre + half, 0.0, 100.0))
    return table, stats


def few_fires_warning(features: pd.DataFrame, scored: int, positions: int, min_fires: int = MIN_FIRES,
                      where: str | None = None) -> str | None:
    """A warning line when active features fire on fewer than `min_fires` FP positions, or None.

    Says how many, their median interval width against the rest, and the token budget at which each of
    them would fire `min_fires` times at its observed rate."""
    act = features[features["active"]]
    fires = act["fp_rate"] * scored
    few = act[fires < min_fires]
    if few.empty or scored <= 0:
        return None
    width = (act["r_hi"] - act["r_lo"]) if "r_lo" in act else None
    budget = math.ceil(min_fires / float(few["fp_rate"].min()) * positions / scored)
    msg = (f"{len(few)} of {len(act)} active features fire on fewer than {min_fires} FP positions, so their r rests "
           f"on few points")
    if width is not None and width.notna().any():
        w_few, w_rest = width[few.index].median(), width.drop(few.index).median()
        at = f" at {where}" if where else ""
        msg += f" (median 95% interval width of r{at} {w_few:.3f}, against {w_rest:.3f} for the rest)"
    return msg + f"; --tokens {budget} would give each of them about {min_fires} firings"


def format_intervals(summary: pd.DataFrame) -> str:
    """One line per condition: the taxonomy percentages with their bootstrap intervals."""
    if "survived_lo" not in summary:
        return ""
    lines = []
    for row in summary.to_dict(orient="records"):
        if row.get("survived_lo") is None or pd.isna(row.get("survived_lo")):
            continue
        parts = [f"{name} {row[f'{name}_pct']:.2f}% [{row[f'{name}_lo']:.2f}, {row[f'{name}_hi']:.2f}]"
                 for name in ("survived", "degraded", "damaged")]
        lines.append(f"{row['condition']:<14}" + "  ".join(parts) + f"  median r width {row['r_width_median']:.3f}")
    if not lines:
        return ""
    units = int(summary["boot_units"].dropna().iloc[0])
    return (f"95% intervals of each share at unlimited tokens (block bootstrap over {units} runs of blocks, "
            "bias-corrected: the share measured at this budget can lie outside its interval):\n" + "\n".join(lines))


def add_intervals(summary: pd.DataFrame, features: dict[str, pd.DataFrame], unit_moments: dict[str, np.ndarray],
                  th: Thresholds, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> None:
    """Add r_lo, r_hi to each condition's table (after r) and the summary's interval columns, in place.

    `unit_moments[name]` is the condition's [U, 9, F] unit moments; conditions without any (several
    processes) get NaN."""
    cols = {}
    for name, df in features.items():
        packed = unit_moments.get(name)
        if packed is None or packed.shape[0] < 2:
            df.insert(df.columns.get_loc("r") + 1, "r_lo", np.nan)
            df.insert(df.columns.get_loc("r") + 2, "r_hi", np.nan)
            continue
        table, stats = intervals(packed, df["active"].to_numpy(), th, replicates, seed)
        df.insert(df.columns.get_loc("r") + 1, "r_lo", table["r_lo"].to_numpy())
        df.insert(df.columns.get_loc("r") + 2, "r_hi", table["r_hi"].to_numpy())
        act = df[df["active"]]
        stats["r_width_median"] = float((act["r_hi"] - act["r_lo"]).median()) if len(act) else float("nan")
        cols[name] = stats
    names = ("survived_lo", "survived_hi", "degraded_lo", "degraded_hi", "damaged_lo", "damaged_hi",
             "r_width_median", "boot_units", "boot_replicates")
    for col in names:
        summary[col] = [cols.get(c, {}).get(col, np.nan) for c in summary["condition"]]
