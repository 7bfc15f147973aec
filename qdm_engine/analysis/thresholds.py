"""Apply the taxonomy thresholds to stored per-feature tables (docs/METHOD.md sections 5 and 9).

The threshold grid is recomputed from each condition's stored correlations `r`, so no model is rerun.
`classify_active` is `taxonomy.classify`'s rule applied to a stored table's `active` column (so the run's own
active threshold is respected) at any survival/damage pair; `overlap` and `predictor` use it and
`require_columns`, so every analysis table counts a feature the same way: survived `r > s`, damaged
`r < d`, degraded otherwise, undefined when an active feature has no correlation (never survived).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from qdm_engine.errors import QdmError

SURVIVAL = 0.9
DAMAGE = 0.5
SURVIVAL_GRID = (0.80, 0.85, 0.90, 0.95)
DAMAGE_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)
CLASSES = ("survived", "degraded", "damaged", "undefined", "inactive")


def require_columns(features: pd.DataFrame, columns: Iterable[str], what: str = "per-feature table") -> None:
    """Raise QdmError naming the missing columns, so a wrong file fails with a message, not a KeyError."""
    if not isinstance(features, pd.DataFrame):
        raise QdmError(f"{what} must be a pandas DataFrame, got {type(features).__name__}: load it with load_features")
    missing = [c for c in columns if c not in features.columns]
    if missing:
        raise QdmError(
            f"{what} lacks column(s) {', '.join(missing)}: pass a features/<condition>.parquet table written by qdm-engine"
        )


def check_thresholds(survival: float, damage: float) -> None:
    """Reject a threshold pair that would let one feature be both survived and damaged."""
    for name, value in (("survival", survival), ("damage", damage)):
        if not np.isfinite(value) or not -1.0 <= value <= 1.0:
            raise QdmError(f"{name} threshold {value!r} is not a correlation: use a value in [-1, 1]")
    if damage > survival:
        raise QdmError(f"damage threshold {damage} exceeds survival threshold {survival}: use damage <= survival")


def active_mask(features: pd.DataFrame, what: str = "per-feature table") -> np.ndarray:
    """The `active` column as a bool array (features firing above the run's active threshold in FP)."""
    active = features["active"].to_numpy()
    if active.dtype != bool:
        if pd.isna(active).any() or not np.isin(active, [0, 1]).all():
            raise QdmError(f"{what} column 'active' holds non-boolean values: rewrite the table with qdm-engine")
        active = active.astype(bool)
    return active


def classify_active(r, active, *, survival: float = SURVIVAL, damage: float = DAMAGE) -> np.ndarray:
    """Class of each feature (one of CLASSES) from its correlation and its stored FP `active` flag."""
    check_thresholds(survival, damage)
    r = np.asarray(r, dtype=np.float64)
    active = np.asarray(active, dtype=bool)
    if r.shape != active.shape:
        raise QdmError(f"r has shape {r.shape} but active has {active.shape}: pass one value per feature")
    with np.errstate(invalid="ignore"):
        cls = np.select(
            [~active, np.isnan(r), r > survival, r < damage],
            ["inactive", "undefined", "survived", "damaged"],
            default="degraded",
        )
    return cls.astype(object)


def _checked_grid(values: Sequence[float], name: str) -> np.ndarray:
    grid = np.asarray(list(values), dtype=np.float64).ravel()
    if grid.size == 0:
        raise QdmError(f"empty {name} threshold grid: pass at least one value")
    return grid


def threshold_grid(
    features: pd.DataFrame,
    *,
    survival: Sequence[float] = SURVIVAL_GRID,
    damage: Sequence[float] = DAMAGE_GRID,
) -> pd.DataFrame:
    """Survived / degraded / damaged / undefined % of active features for every threshold pair.

    One row per (survival_threshold, damage_threshold) cell, survival-major. Percentages are over all
    active features, undefined ones included, so the four percentages of a row sum to 100.
    """
    require_columns(features, ("feature", "r", "active"))
    s_grid = _checked_grid(survival, "survival")
    d_grid = _checked_grid(damage, "damage")
    for s in s_grid:
        for d in d_grid:
            check_thresholds(float(s), float(d))
    active = active_mask(features)
    r = features["r"].to_numpy(dtype=np.float64)[active]
    n_active = int(active.sum())
    if n_active == 0:
        raise QdmError("no active features in the table: lower the active threshold or score more tokens")
    defined = ~np.isnan(r)
    rd = r[defined]
    n_undefined = n_active - int(defined.sum())
    rows = []
    for s in s_grid:
        n_surv = int(np.count_nonzero(rd > s))
        for d in d_grid:
            n_dam = int(np.count_nonzero(rd < d))
            n_deg = rd.size - n_surv - n_dam
            rows.append(
                {
                    "survival_threshold": float(s),
                    "damage_threshold": float(d),
                    "n_active": n_active,
                    "n_survived": n_surv,
                    "n_degraded": n_deg,
                    "n_damaged": n_dam,
                    "n_undefined": n_undefined,
                    "survived_pct": 100.0 * n_surv / n_active,
                    "degraded_pct": 100.0 * n_deg / n_active,
                    "damaged_pct": 100.0 * n_dam / n_active,
                    "undefined_pct": 100.0 * n_undefined / n_active,
                }
            )
    return pd.DataFrame(rows)


def threshold_grid_run(
    tables: Mapping[str, pd.DataFrame],
    *,
    survival: Sequence[float] = SURVIVAL_GRID,
    damage: Sequence[float] = DAMAGE_GRID,
) -> pd.DataFrame:
    """`threshold_grid` for every condition of a run, stacked with a leading `condition` column."""
    if not tables:
        raise QdmError("no conditions to tabulate: pass at least one per-feature table")
    frames = []
    for name, features in tables.items():
        grid = threshold_grid(features, survival=survival, damage=damage)
        grid.insert(0, "condition", name)
        frames.append(grid)
    return pd.concat(frames, ignore_index=True)
