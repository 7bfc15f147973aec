"""Can FP statistics alone predict which features survive compression? (docs/METHOD.md section 7.)

Per active feature, four statistics of the FP run: rarity `-log p`, `log mean`, `log peak` and
`log concentration = log(peak / mean)`. An L2 logistic regression (C = 1, lbfgs) on standardised
statistics predicts survival (`r > 0.9`); 5-fold stratified CV (shuffled, seed 0) gives the ROC AUC.

Two recipes differ only in where the scaler is fitted: `ours` fits it inside each CV fold (a Pipeline,
so held-out features never inform the scaling); `paper` fits it on all features before CV, as the
reference code did. Coefficients come from one full-data fit, which is the same for both recipes.

log concentration = log peak - log mean exactly, so the coefficients of log mean, log peak and log
concentration are not separately identifiable: their VIFs are infinite and only the L2 penalty picks
one split among equally good fits. Read those three together, not one by one; rarity's stands alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from qdm_engine.analysis.thresholds import SURVIVAL, active_mask, classify_active, require_columns
from qdm_engine.errors import QdmError

COLUMNS = ("feature", "r", "fp_rate", "fp_mean", "fp_peak", "active")
STATISTICS = ("rarity", "log_mean_activation", "log_max_activation", "log_concentration")
RECIPES = ("ours", "paper")
CLIP = 1e-8
VIF_INF_TOL = 1e-10  # 1 - R^2 below this (VIF above 1e10) is exact collinearity up to rounding

COLLINEARITY_NOTE = (
    "log_concentration = log_max_activation - log_mean_activation exactly, so the three coefficients are "
    "not separately identifiable (infinite VIF); the L2 penalty picks one split among equally good fits."
)


@dataclass(frozen=True)
class PredictorResult:
    """Cross-validated survival predictor for one condition."""

    recipe: str
    survival: float
    n_samples: int  # active features
    n_survived: int
    n_undefined: int  # active features with r undefined, labelled not survived
    auc_mean: float
    auc_std: float  # population std (ddof 0) of the fold AUCs, as the paper reported
    fold_auc: tuple[float, ...]
    coefficients: pd.DataFrame  # property, standardized_coef, abs_coef; full-data fit, sorted by |coef|
    quartiles: pd.DataFrame  # statistic, quartile, n_features, lo, hi, survived_pct
    vif: pd.DataFrame  # property, vif, collinear, vif_without_concentration
    notes: tuple[str, ...] = field(default=())

    @property
    def frac_survived(self) -> float:
        return self.n_survived / self.n_samples

    def to_text(self, condition: str | None = None) -> str:
        """The plain-text report `qdm-engine predict` prints."""
        where = {"ours": "scaler fitted inside each CV fold", "paper": "scaler fitted on all features before CV"}
        quartiles = self.quartiles.pivot(index="statistic", columns="quartile", values="survived_pct")
        quartiles = quartiles.loc[[s for s in STATISTICS if s in quartiles.index]]
        quartiles.columns = [f"Q{int(q) + 1}" for q in quartiles.columns]
        lines = [
            f"survival predictor{f' for {condition}' if condition else ''} (recipe {self.recipe}: {where[self.recipe]})",
            f"active features {self.n_samples}, survived (r > {self.survival:g}) {self.n_survived} "
            f"({100 * self.frac_survived:.2f}%), undefined r {self.n_undefined}",
            f"{len(self.fold_auc)}-fold CV ROC AUC {self.auc_mean:.4f} +- {self.auc_std:.4f} "
            f"(folds {' '.join(f'{v:.4f}' for v in self.fold_auc)})",
            "",
            "standardised coefficients (full-data fit):",
            self.coefficients.to_string(index=False, float_format=lambda v: f"{v:.4f}"),
            "",
            "variance inflation factors (inf: exactly collinear):",
            self.vif.to_string(index=False, float_format=lambda v: f"{v:.3f}"),
            "",
            "survival % by quartile of each statistic (Q1 lowest):",
            quartiles.to_string(float_format=lambda v: f"{v:.1f}"),
        ]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready record shaped like the paper's phase5_summary.json entry (VIF inf becomes None)."""
        vif = [
            {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}
            for row in self.vif.to_dict("records")
        ]
        return {
            "recipe": self.recipe,
            "survival_threshold": self.survival,
            "n_samples": self.n_samples,
            "n_undefined": self.n_undefined,
            "frac_survived": self.frac_survived,
            "cv_auc_mean": self.auc_mean,
            "cv_auc_std": self.auc_std,
            "cv_fold_auc": list(self.fold_auc),
            "coefficients": self.coefficients.to_dict("records"),
            "survival_by_quartile": self.quartiles.to_dict("records"),
            "vif": vif,
            "notes": list(self.notes),
        }


def fp_statistics(features: pd.DataFrame) -> pd.DataFrame:
    """The four predictor statistics of each active feature (columns `feature` + STATISTICS).

    Arguments of the logs are clipped at 1e-8; log concentration is computed as log peak - log mean of
    the clipped values, which equals log(peak / mean) for every active feature.
    """
    require_columns(features, COLUMNS)
    active = active_mask(features)
    t = features.loc[active]
    raw = t[["fp_rate", "fp_mean", "fp_peak"]].to_numpy(np.float64)
    if not np.isfinite(raw).all():
        raise QdmError("non-finite fp_rate, fp_mean or fp_peak among active features: rewrite the table with qdm-engine")
    log_p, log_mean, log_peak = np.log(np.clip(raw, CLIP, None)).T
    return pd.DataFrame(
        {
            "feature": t["feature"].to_numpy(),
            "rarity": -log_p,
            "log_mean_activation": log_mean,
            "log_max_activation": log_peak,
            "log_concentration": log_peak - log_mean,
        }
    )


def vif_table(stats: pd.DataFrame, columns=STATISTICS) -> pd.DataFrame:
    """Variance inflation factor of each statistic, `1 / (1 - R^2)` of regressing it on the others.

    A statistic that the others reproduce exactly (1 - R^2 below 1e-10) gets VIF = inf and
    collinear = True instead of a rounding-noise number. `vif_without_concentration` repeats the
    computation without log_concentration, the identifiable set (NaN on that row).
    """
    columns = list(columns)
    x = stats[columns].to_numpy(np.float64)
    out = pd.DataFrame({"property": columns, "vif": _vif(x)})
    out["collinear"] = ~np.isfinite(out["vif"].to_numpy())
    if "log_concentration" in columns:
        keep = [c for c in columns if c != "log_concentration"]
        reduced = dict(zip(keep, _vif(stats[keep].to_numpy(np.float64))))
        out["vif_without_concentration"] = [reduced.get(c, np.nan) for c in columns]
    return out


def _vif(x: np.ndarray) -> np.ndarray:
    """VIFs of the columns of x by least squares on centred, unit-norm columns (a constant column: inf)."""
    z = x - x.mean(axis=0)
    norm = np.sqrt((z**2).sum(axis=0))
    ok = norm > 0
    z[:, ok] /= norm[ok]
    vif = np.full(x.shape[1], np.inf)
    for j in np.flatnonzero(ok):
        others = z[:, ok & (np.arange(x.shape[1]) != j)]
        if others.shape[1] == 0:
            vif[j] = 1.0
            continue
        beta, *_ = np.linalg.lstsq(others, z[:, j], rcond=None)
        resid = float(((z[:, j] - others @ beta) ** 2).sum())  # z[:, j] has unit norm: this is 1 - R^2
        vif[j] = np.inf if resid < VIF_INF_TOL else 1.0 / resid
    return vif


def survival_by_quartile(stats: pd.DataFrame, survived: np.ndarray, columns=STATISTICS) -> pd.DataFrame:
    """Survival % within each quartile (`pd.qcut(x, 4, duplicates="drop")`) of each statistic."""
    survived = np.asarray(survived, dtype=bool)
    frames = []
    for col in columns:
        x = stats[col].to_numpy(np.float64)
        q = pd.qcut(x, 4, labels=False, duplicates="drop")
        g = pd.DataFrame({"quartile": q, "x": x, "survived": survived}).groupby("quartile", sort=True)
        frame = pd.DataFrame(
            {
                "n_features": g.size(),
                "lo": g["x"].min(),
                "hi": g["x"].max(),
                "survived_pct": 100.0 * g["survived"].mean(),
            }
        )
        frame.index = frame.index.astype(np.int64)
        frame = frame.reset_index()
        frame.insert(0, "statistic", col)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _model(C: float) -> LogisticRegression:
    return LogisticRegression(C=C, solver="lbfgs", max_iter=1000)


def fit_predictor(
    features: pd.DataFrame,
    *,
    recipe: str = "ours",
    survival: float = SURVIVAL,
    n_splits: int = 5,
    seed: int = 0,
    C: float = 1.0,
) -> PredictorResult:
    """Fit and cross-validate the survival predictor on one condition's per-feature table.

    Active features whose r is undefined are labelled not survived (for an active feature that means
    the compressed activation is constant: the feature is lost, not preserved).
    """
    if recipe not in RECIPES:
        raise QdmError(f"unknown predictor recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    stats = fp_statistics(features)
    active = active_mask(features)
    r = features["r"].to_numpy(np.float64)[active]
    cls = classify_active(r, np.ones(r.size, dtype=bool), survival=survival, damage=survival)  # only "survived" matters
    y = (cls == "survived").astype(np.int64)
    n, n_surv = int(y.size), int(y.sum())
    if min(n_surv, n - n_surv) < n_splits:
        raise QdmError(
            f"{n_surv} survived and {n - n_surv} non-survived of {n} active features: {n_splits}-fold CV needs "
            f"at least {n_splits} of each; score more tokens or pick a condition with mixed outcomes"
        )
    x = stats[list(STATISTICS)].to_numpy(np.float64)
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    if recipe == "ours":
        fold_auc = cross_val_score(make_pipeline(StandardScaler(), _model(C)), x, y, cv=cv, scoring="roc_auc")
    else:
        fold_auc = cross_val_score(_model(C), StandardScaler().fit_transform(x), y, cv=cv, scoring="roc_auc")

    full = _model(C).fit(StandardScaler().fit_transform(x), y)
    coef = full.coef_.ravel()
    coefficients = pd.DataFrame({"property": list(STATISTICS), "standardized_coef": coef, "abs_coef": np.abs(coef)})
    coefficients = coefficients.sort_values("abs_coef", ascending=False, kind="stable").reset_index(drop=True)

    vif = vif_table(stats)
    n_undefined = int(np.count_nonzero(cls == "undefined"))
    notes = [COLLINEARITY_NOTE] if vif["collinear"].any() else []
    if n_undefined:
        notes.append(f"{n_undefined} active features have undefined r (constant when compressed): labelled not survived")
    return PredictorResult(
        recipe=recipe,
        survival=float(survival),
        n_samples=n,
        n_survived=n_surv,
        n_undefined=n_undefined,
        auc_mean=float(np.mean(fold_auc)),
        auc_std=float(np.std(fold_auc)),
        fold_auc=tuple(float(v) for v in fold_auc),
        coefficients=coefficients,
        quartiles=survival_by_quartile(stats, y.astype(bool)),
        vif=vif,
        notes=tuple(notes),
    )
