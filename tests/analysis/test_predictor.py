import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from qdm_engine.analysis.predictor import STATISTICS, fit_predictor, fp_statistics, vif_table
from qdm_engine.errors import QdmError


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank sum (ties averaged): an oracle independent of sklearn.metrics."""
    ranks = rankdata(score)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return (ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _standardise(fit_on: np.ndarray, apply_to: np.ndarray) -> np.ndarray:
    return (apply_to - fit_on.mean(axis=0)) / fit_on.std(axis=0)


def _reference_fold_aucs(x: np.ndarray, y: np.ndarray, recipe: str) -> list[float]:
    """Per-fold AUCs with the scaler fitted per fold ('ours') or on all rows first ('paper')."""
    aucs = []
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(x, y)
    for train, test in folds:
        basis = x[train] if recipe == "ours" else x
        model = LogisticRegression(C=1.0, max_iter=1000).fit(_standardise(basis, x[train]), y[train])
        aucs.append(_auc(model.decision_function(_standardise(basis, x[test])), y[test]))
    return aucs


def _features_with_labels(make_features, rng, n, logit_fn, p_inactive=0.0, heavy_tails=False):
    """Synthetic table whose survival label is drawn from a known logistic model of its FP statistics.

    heavy_tails spreads the peaks with a Student-t (1.5 dof) factor in log space: outliers that make
    the scaler's fitting rows matter, so the two recipes give different held-out scores.
    """
    active = rng.random(n) >= p_inactive
    features = make_features(rng, np.zeros(n), active)
    if heavy_tails:
        features["fp_peak"] *= np.exp(rng.standard_t(1.5, n))
    stats = fp_statistics(features)
    p = 1.0 / (1.0 + np.exp(-logit_fn(stats)))
    survived = rng.random(len(stats)) < p
    r = np.full(n, 0.3)
    r[np.flatnonzero(active)] = np.where(survived, rng.uniform(0.91, 1.0, len(stats)), rng.uniform(0.2, 0.9, len(stats)))
    features["r"] = r
    return features, stats, survived.astype(np.int64)


def _z(v: pd.Series) -> np.ndarray:
    return ((v - v.mean()) / v.std()).to_numpy()


def _peak_and_rarity(s: pd.DataFrame) -> np.ndarray:
    return _z(s["log_max_activation"]) + _z(s["rarity"])


@pytest.mark.parametrize("recipe", ["ours", "paper"])
@pytest.mark.parametrize("seed,n,heavy", [(0, 83, True), (1, 1501, False)])
def test_fold_aucs_match_reference(make_features, recipe, seed, n, heavy):
    rng = np.random.default_rng(seed)
    features, stats, y = _features_with_labels(make_features, rng, n, _peak_and_rarity, heavy_tails=heavy)
    res = fit_predictor(features, recipe=recipe)
    want = _reference_fold_aucs(stats[list(STATISTICS)].to_numpy(), y, recipe)
    np.testing.assert_allclose(res.fold_auc, want, rtol=0, atol=1e-9)
    assert res.auc_mean == pytest.approx(np.mean(want), abs=1e-9)
    assert res.auc_std == pytest.approx(np.std(want), abs=1e-9)


def test_recipes_differ_on_a_small_sample(make_features):
    """Scaling inside the folds changes the held-out scores; the paper's leak shows on small samples."""
    rng = np.random.default_rng(0)
    features, _, _ = _features_with_labels(make_features, rng, 83, _peak_and_rarity, heavy_tails=True)
    ours, paper = fit_predictor(features, recipe="ours"), fit_predictor(features, recipe="paper")
    assert np.max(np.abs(np.subtract(ours.fold_auc, paper.fold_auc))) > 0.005
    pd.testing.assert_frame_equal(ours.coefficients, paper.coefficients)  # the full-data fit is shared


def test_rarity_signal_is_found_and_coefficients_match_full_fit(make_features):
    rng = np.random.default_rng(2)
    features, stats, y = _features_with_labels(make_features, rng, 3000, lambda s: 3.0 * _z(s["rarity"]), p_inactive=0.3)
    res = fit_predictor(features)
    assert res.n_samples == len(stats) == int(features["active"].sum())
    assert res.n_survived == int(y.sum())
    assert res.auc_mean > 0.8
    assert res.coefficients["property"].iloc[0] == "rarity" and res.coefficients["standardized_coef"].iloc[0] > 0
    x = stats[list(STATISTICS)].to_numpy()
    full = LogisticRegression(C=1.0, max_iter=1000).fit(_standardise(x, x), y)
    got = res.coefficients.set_index("property").loc[list(STATISTICS), "standardized_coef"].to_numpy()
    np.testing.assert_allclose(got, full.coef_.ravel(), rtol=1e-6)
    assert list(res.coefficients["abs_coef"]) == sorted(np.abs(got), reverse=True)


def test_random_labels_give_chance_auc(make_features):
    rng = np.random.default_rng(3)
    features, _, _ = _features_with_labels(make_features, rng, 3000, lambda s: np.zeros(len(s)))
    res = fit_predictor(features)
    assert abs(res.auc_mean - 0.5) < 0.05, res.fold_auc


def test_quartiles_known_answer(make_features):
    """Survived exactly when log peak is in its top quartile: survival by peak quartile is 0, 0, 0, 100 %."""
    rng = np.random.default_rng(4)
    n = 400
    features = make_features(rng, np.zeros(n))
    peak = np.log(features["fp_peak"].to_numpy())
    top = peak > np.quantile(peak, 0.75)
    features["r"] = np.where(top, 0.95, 0.7)
    q = fit_predictor(features).quartiles
    peak_q = q[q["statistic"] == "log_max_activation"]
    assert list(peak_q["quartile"]) == [0, 1, 2, 3]
    assert list(peak_q["n_features"]) == [100] * 4
    np.testing.assert_allclose(peak_q["survived_pct"], [0, 0, 0, 100])
    assert (peak_q["lo"].to_numpy()[1:] > peak_q["hi"].to_numpy()[:-1]).all()
    assert set(q["statistic"]) == set(STATISTICS)
    for _, rows in q.groupby("statistic"):
        assert rows["n_features"].sum() == n
        # the overall rate is the count-weighted mean of the quartile rates
        assert np.average(rows["survived_pct"], weights=rows["n_features"]) == pytest.approx(100 * top.mean())


def test_vif_exact_collinearity_is_infinite(make_features):
    rng = np.random.default_rng(5)
    stats = fp_statistics(make_features(rng, np.zeros(500)))
    vif = vif_table(stats).set_index("property")
    assert np.isinf(vif.loc[["log_mean_activation", "log_max_activation", "log_concentration"], "vif"]).all()
    assert vif["collinear"].tolist() == [False, True, True, True]
    assert np.isfinite(vif.loc["rarity", "vif"])
    # The identifiable set: VIF = diagonal of the inverse correlation matrix (an independent formula).
    keep = ["rarity", "log_mean_activation", "log_max_activation"]
    want = np.diag(np.linalg.inv(np.corrcoef(stats[keep].to_numpy().T)))
    np.testing.assert_allclose(vif.loc[keep, "vif_without_concentration"], want, rtol=1e-9)
    assert np.isnan(vif.loc["log_concentration", "vif_without_concentration"])


def test_vif_near_collinear_stays_finite_and_independent_is_one():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(2, 4000))
    near = pd.DataFrame({"a": a, "b": b, "c": a - b + 1e-3 * rng.normal(size=4000)})
    vif = vif_table(near, columns=["a", "b", "c"])
    assert np.isfinite(vif["vif"]).all() and (vif["vif"] > 1e5).all() and not vif["collinear"].any()
    independent = pd.DataFrame(rng.normal(size=(4000, 3)), columns=["a", "b", "c"])
    np.testing.assert_allclose(vif_table(independent, columns=["a", "b", "c"])["vif"], 1.0, atol=0.01)


def test_collinearity_note_and_undefined_features(make_features):
    rng = np.random.default_rng(7)
    features, _, _ = _features_with_labels(make_features, rng, 600, lambda s: _z(s["rarity"]))
    undefined = features.index[:25]
    features.loc[undefined, "r"] = np.nan
    res = fit_predictor(features)
    assert res.n_undefined == 25
    assert res.n_survived == int((features["r"] > 0.9).sum())  # NaN is never survived
    assert any("not separately identifiable" in note for note in res.notes)
    assert any("25 active features have undefined r" in note for note in res.notes)
    json.dumps(res.to_dict(), allow_nan=False)


def test_inactive_rows_with_missing_statistics_are_ignored(make_features):
    rng = np.random.default_rng(8)
    features, stats, _ = _features_with_labels(make_features, rng, 500, lambda s: _z(s["rarity"]), p_inactive=0.2)
    features.loc[~features["active"], ["fp_mean", "fp_peak", "r"]] = np.nan
    assert fit_predictor(features).n_samples == len(stats)


# The paper's published predictor for Pythia-70M RTN INT6 (phase5_summary.json; text: AUC 0.924 +- 0.007).
@pytest.fixture(scope="module")
def paper_fits(paper_rtn):
    return {recipe: fit_predictor(paper_rtn, recipe=recipe) for recipe in ("paper", "ours")}


def test_paper_recipe_reproduces_published_auc(paper_fits, paper_predictor_summary):
    res = paper_fits["paper"]
    assert (round(res.auc_mean, 3), round(res.auc_std, 3)) == (0.924, 0.007)
    assert res.n_samples == paper_predictor_summary["n_samples"] == 5688
    assert res.frac_survived == pytest.approx(paper_predictor_summary["frac_survived"], rel=1e-12)
    # phase5_summary.json stores full precision; allow for solver tolerance across platforms.
    assert res.auc_mean == pytest.approx(paper_predictor_summary["cv_auc_mean"], abs=1e-5)
    assert res.auc_std == pytest.approx(paper_predictor_summary["cv_auc_std"], abs=1e-5)


def test_paper_recipe_reproduces_published_coefficients(paper_fits, paper_predictor_summary):
    got = paper_fits["paper"].coefficients
    published = pd.DataFrame(paper_predictor_summary["coefficients"])
    assert list(got["property"]) == list(published["property"])  # same order: by |coef|
    np.testing.assert_allclose(got["standardized_coef"], published["standardized_coef"], rtol=1e-4)
    np.testing.assert_allclose(got["standardized_coef"].round(2), published["standardized_coef"].round(2))


def test_paper_survival_by_peak_quartile(paper_fits):
    """docs/METHOD.md section 7: survival by peak quartile 13% -> 96% (Pythia)."""
    q = paper_fits["paper"].quartiles
    peak = q[q["statistic"] == "log_max_activation"]["survived_pct"].round().tolist()
    assert peak[0] == 13 and peak[-1] == 96
    assert peak == sorted(peak)


def test_our_recipe_on_paper_data(paper_fits):
    ours, paper = paper_fits["ours"], paper_fits["paper"]
    print(f"\nour recipe (scaler inside folds): AUC {ours.auc_mean:.6f} +- {ours.auc_std:.6f}; "
          f"paper recipe: {paper.auc_mean:.6f} +- {paper.auc_std:.6f}")
    assert 0.85 < ours.auc_mean < 0.99
    assert abs(ours.auc_mean - paper.auc_mean) < 0.01  # the leak is small at n = 5688
    assert 0 < ours.auc_std < 0.05


def test_unknown_recipe_message(make_features):
    features = make_features(np.random.default_rng(9), np.linspace(0, 1, 50))
    with pytest.raises(QdmError, match="unknown predictor recipe 'sklearn': use one of ours, paper"):
        fit_predictor(features, recipe="sklearn")


def test_missing_column_message(make_features):
    features = make_features(np.random.default_rng(10), np.linspace(0, 1, 50)).drop(columns=["fp_peak"])
    with pytest.raises(QdmError, match=r"lacks column\(s\) fp_peak"):
        fit_predictor(features)


def test_one_class_message(make_features):
    features = make_features(np.random.default_rng(11), np.full(50, 0.99))
    features.loc[:2, "r"] = 0.5
    with pytest.raises(QdmError, match="47 survived and 3 non-survived of 50 active features: 5-fold CV needs"):
        fit_predictor(features)


def test_non_finite_statistics_message(make_features):
    features = make_features(np.random.default_rng(12), np.linspace(0, 1, 50))
    features.loc[4, "fp_mean"] = np.inf
    with pytest.raises(QdmError, match="non-finite fp_rate, fp_mean or fp_peak among active features"):
        fit_predictor(features)


def test_bad_survival_threshold_message(make_features):
    features = make_features(np.random.default_rng(13), np.linspace(0, 1, 50))
    with pytest.raises(QdmError, match="survival threshold 1.5 is not a correlation"):
        fit_predictor(features, survival=1.5)


def test_text_report(paper_fits):
    text = paper_fits["paper"].to_text("int6")
    assert text.startswith("survival predictor for int6 (recipe paper: scaler fitted on all features before CV)")
    assert "5-fold CV ROC AUC 0.9242 +- 0.0074" in text
    assert re.search(r"log_max_activation\s+13.2\s+61.3\s+79.3\s+95.9", text)
    assert "not separately identifiable" in text
