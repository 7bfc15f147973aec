"""Feature taxonomy (docs/METHOD.md section 5): active / survived / degraded / damaged, with configurable thresholds.

Over active features (FP firing rate > `active`): survived r > `survived`, damaged r < `damaged`,
degraded otherwise. An active feature whose r is undefined (zero variance on a side, e.g. it never
fires once compressed) is 'undefined': counted and reported, never survived.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from qdm_engine.analysis.thresholds import CLASSES, check_thresholds, classify_active
from qdm_engine.errors import QdmError

__all__ = ["CLASSES", "Thresholds", "classify", "summarize"]


@dataclass(frozen=True)
class Thresholds:
    active: float = 1e-3  # FP firing rate above which a feature is audited (the reference code's value)
    survived: float = 0.9  # r above this: survived
    damaged: float = 0.5  # r below this: damaged

    def __post_init__(self):
        if not 0.0 <= self.active < 1.0:
            raise QdmError(f"active-rate threshold must be in [0, 1), got {self.active}")
        check_thresholds(self.survived, self.damaged)

    def to_dict(self) -> dict:
        return asdict(self)


def classify(r: np.ndarray, fp_rate: np.ndarray, th: Thresholds = Thresholds()) -> np.ndarray:
    """Class label per feature (one of CLASSES): active means FP firing rate above `th.active`."""
    active = np.asarray(fp_rate, dtype=np.float64) > th.active
    return classify_active(r, active, survival=th.survived, damage=th.damaged)


def summarize(features: pd.DataFrame) -> dict:
    """Table-1 figures of one condition's per-feature table: percentages are of active features."""
    active = features[features["active"]]
    n = len(active)
    counts = active["cls"].value_counts()
    r = active["r"].dropna()
    pct = lambda c: 100.0 * counts.get(c, 0) / n if n else float("nan")  # noqa: E731
    return {
        "n_active": n,
        "mean_r": float(r.mean()) if len(r) else float("nan"),
        "median_r": float(r.median()) if len(r) else float("nan"),
        "survived_pct": pct("survived"),
        "degraded_pct": pct("degraded"),
        "damaged_pct": pct("damaged"),
        "undefined_n": int(counts.get("undefined", 0)),
    }
