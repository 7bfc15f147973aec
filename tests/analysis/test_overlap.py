import re

import numpy as np
import pandas as pd
import pytest

from qdm_engine.analysis.overlap import overlap
from qdm_engine.errors import QdmError


def _r_for(rng: np.random.Generator, cls: np.ndarray) -> np.ndarray:
    """Correlations drawn strictly inside each class's range, so the class of every feature is known."""
    return np.select(
        [cls == "survived", cls == "degraded", cls == "damaged"],
        [rng.uniform(0.901, 0.999, cls.size), rng.uniform(0.5, 0.9, cls.size), rng.uniform(-0.2, 0.499, cls.size)],
        default=np.nan,
    )


def _pair(rng, make_features, n=600, p_inactive=0.2):
    """Two conditions of one run: same features and FP statistics, random but known classes."""
    classes = np.array(["survived", "degraded", "damaged", "undefined"])
    cls_a = classes[rng.choice(4, n, p=[0.5, 0.3, 0.15, 0.05])]
    cls_b = np.where(rng.random(n) < 0.7, cls_a, classes[rng.choice(4, n, p=[0.5, 0.3, 0.15, 0.05])])
    active = rng.random(n) >= p_inactive
    a = make_features(rng, _r_for(rng, cls_a), active)
    b = a.copy()
    b["r"] = _r_for(rng, cls_b)
    # Inactive features get correlations that would change every set if they were counted.
    a.loc[~active, "r"] = 0.1
    b.loc[~active, "r"] = 0.95
    b = b.sample(frac=1.0, random_state=int(rng.integers(1 << 31))).reset_index(drop=True)  # row order must not matter
    return a, b, cls_a, cls_b, active


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sets_match_python_sets(make_features, seed):
    rng = np.random.default_rng(seed)
    a, b, cls_a, cls_b, active = _pair(rng, make_features)
    res = overlap(a, b, labels=("int6", "prune"))
    ids = a["feature"].to_numpy()
    want = {
        "non_survived_corr_le_0.9": (lambda c: c != "survived"),
        "damaged_corr_lt_0.5": (lambda c: c == "damaged"),
        "degraded_0.5_to_0.9": (lambda c: c == "degraded"),
    }
    rows = res.sets.set_index("set_type")
    assert list(rows.index) == list(want)
    for set_type, member in want.items():
        sa = {f for f, c, on in zip(ids, cls_a, active) if on and member(c)}
        sb = {f for f, c, on in zip(ids, cls_b, active) if on and member(c)}
        row = rows.loc[set_type]
        assert (row["int6_count"], row["prune_count"]) == (len(sa), len(sb))
        assert (row["intersection_count"], row["union_count"]) == (len(sa & sb), len(sa | sb))
        assert (row["int6_only_count"], row["prune_only_count"]) == (len(sa - sb), len(sb - sa))
        assert row["jaccard"] == pytest.approx(len(sa & sb) / len(sa | sb), rel=1e-15)
    assert res.n_active == int(active.sum())
    assert res.n_undefined_a == int(np.count_nonzero(active & (cls_a == "undefined")))
    assert res.jaccard("non_survived") == rows.loc["non_survived_corr_le_0.9", "jaccard"]


@pytest.mark.parametrize("seed", [3, 4])
def test_damage_correlations_match_reference(make_features, seed):
    rng = np.random.default_rng(seed)
    a, b, cls_a, cls_b, active = _pair(rng, make_features)
    res = overlap(a, b)
    bb = b.set_index("feature").loc[a["feature"]]
    both = active & ~np.isnan(a["r"].to_numpy()) & ~np.isnan(bb["r"].to_numpy())
    da = 1.0 - a["r"].to_numpy()[both]
    db = 1.0 - bb["r"].to_numpy()[both]
    pearson = np.sum((da - da.mean()) * (db - db.mean())) / np.sqrt(np.sum((da - da.mean()) ** 2) * np.sum((db - db.mean()) ** 2))
    ranks_a, ranks_b = np.argsort(np.argsort(da)), np.argsort(np.argsort(db))  # continuous draws: no ties
    spearman = np.corrcoef(ranks_a, ranks_b)[0, 1]
    assert res.n_damage_pairs == int(both.sum())
    assert res.pearson_damage == pytest.approx(pearson, rel=1e-12)
    assert res.spearman_damage == pytest.approx(spearman, rel=1e-12)


def test_identical_conditions(make_features):
    rng = np.random.default_rng(6)
    a, _, _, _, _ = _pair(rng, make_features)
    res = overlap(a, a.copy(), labels=("x", "y"))
    assert res.jaccard("non_survived") == 1.0
    assert res.pearson_damage == pytest.approx(1.0) and res.spearman_damage == pytest.approx(1.0)
    assert (res.sets["x_only_count"] == 0).all() and (res.sets["y_only_count"] == 0).all()


def test_empty_union_gives_nan_jaccard(make_features):
    rng = np.random.default_rng(7)
    a = make_features(rng, rng.uniform(0.95, 0.99, 50))
    b = a.copy()
    b["r"] = rng.uniform(0.6, 0.99, 50)
    res = overlap(a, b)
    assert np.isnan(res.jaccard("damaged"))
    assert res.sets.set_index("set_type").loc["non_survived_corr_le_0.9", "a_count"] == 0


def test_deciles_known_answer(make_features):
    """100 features, firing rates 1..100 (x 1e-3): decile k + 1 holds features 10k..10k+9; k of them fail in a.

    Deciles are numbered 1..10 (1 = rarest), as the report's figure numbers them."""
    rng = np.random.default_rng(8)
    n = 100
    rate = (np.arange(n) + 1.5) * 1e-3
    cls_a = np.array(["survived"] * n, dtype=object)
    cls_b = np.array(["survived"] * n, dtype=object)
    for k in range(10):
        cls_a[10 * k : 10 * k + k] = "damaged"
        cls_b[10 * k : 10 * k + 1] = "degraded"
    a = make_features(rng, _r_for(rng, cls_a), fp_rate=rate)
    b = a.copy()
    b["r"] = _r_for(rng, cls_b)
    dec = overlap(a, b).deciles
    assert list(dec.columns) == [
        "firing_decile", "n_features", "mean_firing_rate", "a_survived_pct", "b_survived_pct",
        "a_non_survived_pct", "b_non_survived_pct", "a_damaged_pct", "b_damaged_pct", "a_mean_damage",
        "b_mean_damage",
    ]
    assert list(dec["firing_decile"]) == list(range(1, 11)) and (dec["n_features"] == 10).all()
    k = np.arange(10)
    np.testing.assert_allclose(dec["a_non_survived_pct"], 10.0 * k)
    np.testing.assert_allclose(dec["a_damaged_pct"], 10.0 * k)
    np.testing.assert_allclose(dec["b_non_survived_pct"], 10.0)
    np.testing.assert_allclose(dec["b_damaged_pct"], 0.0)
    np.testing.assert_allclose(dec["mean_firing_rate"], rate.reshape(10, 10).mean(axis=1), rtol=1e-14)
    np.testing.assert_allclose(dec["a_mean_damage"], (1 - a["r"].to_numpy()).reshape(10, 10).mean(axis=1), rtol=1e-14)
    text = overlap(a, b).to_text().split("by FP firing-rate decile (1 = rarest;")[1].splitlines()
    assert [int(line.split()[0]) for line in text[2:]] == list(range(1, 11))  # the printed table counts from 1


def test_deciles_with_ties_merge_bins(make_features):
    rng = np.random.default_rng(9)
    rate = np.repeat([2e-3, 5e-3, 1e-2], [60, 30, 10])
    a = make_features(rng, rng.uniform(0.3, 1.0, 100), fp_rate=rate)
    dec = overlap(a, a.copy()).deciles
    assert dec["n_features"].sum() == 100
    assert len(dec) < 10


# The paper's published figures for Pythia-70M RTN INT6 vs matched pruning (Table 4, phase5b tables).
def test_paper_overlap_counts(paper_dir, paper_rtn, paper_prune):
    res = overlap(paper_rtn, paper_prune, labels=("rtn", "prune"))
    non = res.sets.set_index("set_type").loc["non_survived_corr_le_0.9"]
    assert (non["rtn_count"], non["prune_count"]) == (2139, 2220)
    assert (non["intersection_count"], non["union_count"]) == (2016, 2343)
    assert round(non["jaccard"], 4) == 0.8604
    published = pd.read_csv(paper_dir / "tables" / "phase5b_overlap_counts_table.csv")
    published = published[published["model"] == "Pythia-70M"].drop(columns="model").reset_index(drop=True)
    pd.testing.assert_frame_equal(res.sets, published, check_exact=False, rtol=1e-12)
    assert res.n_active == 5688 and res.n_damage_pairs == 5688


def test_paper_damage_correlations(paper_dir, paper_rtn, paper_prune):
    res = overlap(paper_rtn, paper_prune, labels=("rtn", "prune"))
    assert round(res.spearman_damage, 4) == 0.9756
    assert round(res.pearson_damage, 4) == 0.9508
    summary = pd.read_csv(paper_dir / "tables" / "phase5b_rtn_int6_vs_pruning_overlap_summary.csv").set_index("model")
    assert res.spearman_damage == pytest.approx(summary.loc["Pythia-70M", "spearman_damage_score_corr"], rel=1e-12)
    assert res.pearson_damage == pytest.approx(summary.loc["Pythia-70M", "pearson_damage_score_corr"], rel=1e-12)
    assert res.summary()["jaccard_damaged_corr_lt_0.5"] == pytest.approx(
        summary.loc["Pythia-70M", "jaccard_damaged_corr_lt_0.5"], rel=1e-12
    )


def test_paper_decile_table(paper_dir, paper_rtn, paper_prune):
    res = overlap(paper_rtn, paper_prune, labels=("rtn", "prune"))
    published = pd.read_csv(paper_dir / "tables" / "phase5b_pythia_rtn_vs_pruning_firing_rate_deciles.csv")
    published["firing_decile"] += 1  # the paper numbers deciles 0..9, qdm-engine 1..10
    pd.testing.assert_frame_equal(res.deciles, published, check_exact=False, rtol=1e-12)


def test_missing_column_message(make_features):
    rng = np.random.default_rng(10)
    a = make_features(rng, rng.uniform(0, 1, 20))
    with pytest.raises(QdmError, match=r"per-feature table of int6 lacks column\(s\) fp_rate"):
        overlap(a.drop(columns="fp_rate"), a, labels=("int6", "prune-matched"))


def test_different_features_message(make_features):
    rng = np.random.default_rng(11)
    a = make_features(rng, rng.uniform(0, 1, 20))
    b = a.copy()
    b.loc[0, "feature"] = a["feature"].max() + 1
    with pytest.raises(QdmError, match="int6 and int8 cover different features: compare two conditions of one run"):
        overlap(a, b, labels=("int6", "int8"))
    with pytest.raises(QdmError, match="cover different features"):
        overlap(a, a.iloc[:-1], labels=("int6", "int8"))


def test_different_fp_statistics_message(make_features):
    rng = np.random.default_rng(12)
    a = make_features(rng, rng.uniform(0, 1, 20))
    b = a.copy()
    b.loc[3, "fp_rate"] *= 1.01
    with pytest.raises(QdmError, match="different FP statistics: compare two conditions of one run"):
        overlap(a, b)


def test_repeated_feature_message(make_features):
    rng = np.random.default_rng(13)
    a = make_features(rng, rng.uniform(0, 1, 20))
    a.loc[1, "feature"] = a.loc[0, "feature"]
    with pytest.raises(QdmError, match="repeats feature ids"):
        overlap(a, a.copy())


def test_same_label_message(make_features):
    a = make_features(np.random.default_rng(14), np.linspace(0, 1, 20))
    with pytest.raises(QdmError, match="both conditions are labelled 'int6'"):
        overlap(a, a, labels=("int6", "int6"))


def test_no_active_message(make_features):
    a = make_features(np.random.default_rng(15), np.linspace(0, 1, 20), active=np.zeros(20, dtype=bool))
    with pytest.raises(QdmError, match="no active features in the FP run"):
        overlap(a, a.copy())


def test_bad_threshold_message(make_features):
    a = make_features(np.random.default_rng(16), np.linspace(0, 1, 20))
    with pytest.raises(QdmError, match="damage threshold 0.95 exceeds survival threshold 0.9"):
        overlap(a, a.copy(), damage=0.95)


def test_text_report(paper_rtn, paper_prune):
    text = overlap(paper_rtn, paper_prune, labels=("int6", "prune-matched")).to_text()
    assert "over 5688 features active in the FP run" in text
    assert re.search(r"non_survived_corr_le_0.9\s+2139\s+2220\s+2016\s+2343\s+0.8604\s+123\s+204", text)
    assert "Pearson 0.9508, Spearman 0.9756" in text
    assert "prune-matched_mean_damage" in text


def test_parquet_round_trip(tmp_path, make_features):
    """Tables read back from features/<condition>.parquet give the same overlap as the in-memory ones."""
    rng = np.random.default_rng(17)
    a, b, _, _, _ = _pair(rng, make_features, n=300)
    a.to_parquet(tmp_path / "int6.parquet", index=False)
    b.to_parquet(tmp_path / "prune-matched.parquet", index=False)
    fa, fb = pd.read_parquet(tmp_path / "int6.parquet"), pd.read_parquet(tmp_path / "prune-matched.parquet")
    got, want = overlap(fa, fb), overlap(a, b)
    pd.testing.assert_frame_equal(got.sets, want.sets)
    pd.testing.assert_frame_equal(got.deciles, want.deciles)
    assert got.summary() == want.summary() or np.isnan(want.pearson_damage)
