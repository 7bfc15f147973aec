"""Do two compression conditions damage the same features? (docs/METHOD.md section 8.)

Compares two conditions' per-feature tables from one run (same features, same FP statistics) over the
features active in the FP run: Jaccard overlap of the non-survived, damaged and degraded sets, Pearson
and Spearman correlation of damage scores `d = 1 - r`, and non-survival by FP firing-rate decile. Table
and column names follow the paper's published tables, with the two condition labels as prefixes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from qdm_engine.analysis.thresholds import DAMAGE, SURVIVAL, active_mask, check_thresholds, classify_active, require_columns
from qdm_engine.errors import QdmError

COLUMNS = ("feature", "r", "fp_rate", "active")
N_DECILES = 10


@dataclass(frozen=True)
class OverlapResult:
    """Overlap of two conditions; `a` and `b` are the labels used as column prefixes."""

    a: str
    b: str
    survival: float
    damage: float
    n_active: int
    n_undefined_a: int
    n_undefined_b: int
    n_damage_pairs: int  # active features with r defined in both conditions (the correlation's sample)
    pearson_damage: float
    spearman_damage: float
    sets: pd.DataFrame  # set_type, {a}_count, {b}_count, intersection_count, union_count, jaccard, {a}_only_count, {b}_only_count
    deciles: pd.DataFrame  # the published firing-rate decile table's columns

    def jaccard(self, set_type: str = "non_survived") -> float:
        """Jaccard of one set type by its short name: non_survived, damaged or degraded."""
        rows = self.sets[self.sets["set_type"].str.startswith(set_type + "_")]
        if len(rows) != 1:
            raise QdmError(f"unknown set type {set_type!r}: use non_survived, damaged or degraded")
        return float(rows["jaccard"].iloc[0])

    def to_text(self) -> str:
        """The plain-text report `qdm-engine overlap` prints."""
        fmt = lambda v: f"{v:.4f}"  # noqa: E731
        return "\n".join(
            [
                f"overlap of {self.a} and {self.b} over {self.n_active} features active in the FP run "
                f"(survived r > {self.survival:g}, damaged r < {self.damage:g})",
                self.sets.to_string(index=False, float_format=fmt),
                "",
                f"damage score d = 1 - r: Pearson {self.pearson_damage:.4f}, Spearman {self.spearman_damage:.4f} "
                f"over {self.n_damage_pairs} features with r defined in both "
                f"(undefined r: {self.a} {self.n_undefined_a}, {self.b} {self.n_undefined_b})",
                "",
                "by FP firing-rate decile (1 = rarest; % of the decile's active features):",
                self.deciles.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
            ]
        )

    def summary(self) -> dict:
        """One flat record, shaped like the paper's overlap summary table."""
        return {
            "a": self.a,
            "b": self.b,
            "n_active_features": self.n_active,
            f"jaccard_non_survived_corr_le_{self.survival:g}": self.jaccard("non_survived"),
            f"jaccard_damaged_corr_lt_{self.damage:g}": self.jaccard("damaged"),
            f"jaccard_degraded_{self.damage:g}_to_{self.survival:g}": self.jaccard("degraded"),
            "pearson_damage_score_corr": self.pearson_damage,
            "spearman_damage_score_corr": self.spearman_damage,
            "n_damage_pairs": self.n_damage_pairs,
            "n_undefined_a": self.n_undefined_a,
            "n_undefined_b": self.n_undefined_b,
        }


def _aligned(a_features: pd.DataFrame, b_features: pd.DataFrame, a: str, b: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables sorted by feature id, after checking they describe the same features of one FP run."""
    require_columns(a_features, COLUMNS, f"per-feature table of {a}")
    require_columns(b_features, COLUMNS, f"per-feature table of {b}")
    ta = a_features.sort_values("feature", kind="stable").reset_index(drop=True)
    tb = b_features.sort_values("feature", kind="stable").reset_index(drop=True)
    for name, t in ((a, ta), (b, tb)):
        if t["feature"].duplicated().any():
            raise QdmError(f"per-feature table of {name} repeats feature ids: rewrite it with qdm-engine")
    if len(ta) != len(tb) or not np.array_equal(ta["feature"].to_numpy(), tb["feature"].to_numpy()):
        raise QdmError(f"{a} and {b} cover different features: compare two conditions of one run")
    same_active = np.array_equal(active_mask(ta, a), active_mask(tb, b))
    same_rate = np.allclose(ta["fp_rate"].to_numpy(float), tb["fp_rate"].to_numpy(float), rtol=1e-12, atol=0, equal_nan=True)
    if not (same_active and same_rate):
        raise QdmError(f"{a} and {b} have different FP statistics: compare two conditions of one run")
    return ta, tb


def _correlation(fn, x: np.ndarray, y: np.ndarray) -> float:
    """Correlation, or NaN where it is undefined (fewer than 2 pairs or a constant side)."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(fn(x, y)[0])


def overlap(
    a_features: pd.DataFrame,
    b_features: pd.DataFrame,
    *,
    labels: tuple[str, str] = ("a", "b"),
    survival: float = SURVIVAL,
    damage: float = DAMAGE,
) -> OverlapResult:
    """Overlap of two conditions' per-feature tables over the features active in the FP run.

    Sets: non-survived = active and not survived (undefined features count as non-survived, never as
    survived), damaged `r < damage`, degraded `damage <= r <= survival`. Jaccard of an empty union is NaN.
    Damage-score correlations use the features whose r is defined in both conditions.
    """
    a, b = (str(x) for x in labels)
    if a == b:
        raise QdmError(f"both conditions are labelled {a!r}: compare two different conditions")
    check_thresholds(survival, damage)
    ta, tb = _aligned(a_features, b_features, a, b)
    active = active_mask(ta, a)
    n_active = int(active.sum())
    if n_active == 0:
        raise QdmError("no active features in the FP run: lower the active threshold or score more tokens")

    ra = ta["r"].to_numpy(np.float64)[active]
    rb = tb["r"].to_numpy(np.float64)[active]
    ones = np.ones(n_active, dtype=bool)
    ca = classify_active(ra, ones, survival=survival, damage=damage)
    cb = classify_active(rb, ones, survival=survival, damage=damage)

    set_masks = {
        f"non_survived_corr_le_{survival:g}": (ca != "survived", cb != "survived"),
        f"damaged_corr_lt_{damage:g}": (ca == "damaged", cb == "damaged"),
        f"degraded_{damage:g}_to_{survival:g}": (ca == "degraded", cb == "degraded"),
    }
    rows = []
    for set_type, (ma, mb) in set_masks.items():
        inter = int(np.count_nonzero(ma & mb))
        union = int(np.count_nonzero(ma | mb))
        rows.append(
            {
                "set_type": set_type,
                f"{a}_count": int(ma.sum()),
                f"{b}_count": int(mb.sum()),
                "intersection_count": inter,
                "union_count": union,
                "jaccard": inter / union if union else float("nan"),
                f"{a}_only_count": int(np.count_nonzero(ma & ~mb)),
                f"{b}_only_count": int(np.count_nonzero(mb & ~ma)),
            }
        )
    sets = pd.DataFrame(rows)

    da, db = 1.0 - ra, 1.0 - rb
    both = ~np.isnan(da) & ~np.isnan(db)
    pearson = _correlation(stats.pearsonr, da[both], db[both])
    spearman = _correlation(stats.spearmanr, da[both], db[both])

    deciles = firing_rate_deciles(ta["fp_rate"].to_numpy(np.float64)[active], ca, cb, da, db, labels=(a, b))
    return OverlapResult(
        a=a,
        b=b,
        survival=float(survival),
        damage=float(damage),
        n_active=n_active,
        n_undefined_a=int(np.count_nonzero(ca == "undefined")),
        n_undefined_b=int(np.count_nonzero(cb == "undefined")),
        n_damage_pairs=int(both.sum()),
        pearson_damage=pearson,
        spearman_damage=spearman,
        sets=sets,
        deciles=deciles,
    )


def firing_rate_deciles(
    fp_rate: np.ndarray,
    cls_a: np.ndarray,
    cls_b: np.ndarray,
    damage_a: np.ndarray,
    damage_b: np.ndarray,
    *,
    labels: tuple[str, str] = ("a", "b"),
) -> pd.DataFrame:
    """Survival, non-survival, damage % and mean damage score per FP firing-rate decile (active features).

    Bins are `pd.qcut(fp_rate, 10, duplicates="drop")`, so ties can merge deciles. Deciles are numbered
    1..10, 1 = rarest, here, in the printed table and in the report alike (the paper's published tables
    number them 0..9). Mean damage skips undefined features.
    """
    a, b = labels
    decile = pd.qcut(np.asarray(fp_rate, dtype=np.float64), N_DECILES, labels=False, duplicates="drop")
    frame = pd.DataFrame(
        {
            "firing_decile": decile,
            "fp_rate": fp_rate,
            f"{a}_survived": np.asarray(cls_a) == "survived",
            f"{b}_survived": np.asarray(cls_b) == "survived",
            f"{a}_non_survived": np.asarray(cls_a) != "survived",
            f"{b}_non_survived": np.asarray(cls_b) != "survived",
            f"{a}_damaged": np.asarray(cls_a) == "damaged",
            f"{b}_damaged": np.asarray(cls_b) == "damaged",
            f"{a}_damage": damage_a,
            f"{b}_damage": damage_b,
        }
    )
    g = frame.groupby("firing_decile", sort=True)
    out = pd.DataFrame(
        {
            "n_features": g.size(),
            "mean_firing_rate": g["fp_rate"].mean(),
            f"{a}_survived_pct": 100.0 * g[f"{a}_survived"].mean(),
            f"{b}_survived_pct": 100.0 * g[f"{b}_survived"].mean(),
            f"{a}_non_survived_pct": 100.0 * g[f"{a}_non_survived"].mean(),
            f"{b}_non_survived_pct": 100.0 * g[f"{b}_non_survived"].mean(),
            f"{a}_damaged_pct": 100.0 * g[f"{a}_damaged"].mean(),
            f"{b}_damaged_pct": 100.0 * g[f"{b}_damaged"].mean(),
            f"{a}_mean_damage": g[f"{a}_damage"].mean(),
            f"{b}_mean_damage": g[f"{b}_damage"].mean(),
        }
    )
    out.index = out.index.astype(np.int64) + 1  # qcut numbers bins from 0; people count deciles from 1
    return out.reset_index()
