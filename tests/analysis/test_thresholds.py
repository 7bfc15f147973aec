import numpy as np
import pandas as pd
import pytest

from qdm_engine.analysis.thresholds import (
    DAMAGE_GRID,
    SURVIVAL_GRID,
    classify_active,
    require_columns,
    threshold_grid,
    threshold_grid_run,
)
from qdm_engine.errors import QdmError


def test_classify_known_values_and_boundaries():
    r = np.array([0.95, 0.9, 0.9000001, 0.7, 0.5, 0.4999999, -0.3, np.nan, 0.99, np.nan])
    active = np.array([True] * 8 + [False, False])
    got = classify_active(r, active)
    want = ["survived", "degraded", "survived", "degraded", "degraded", "damaged", "damaged", "undefined",
            "inactive", "inactive"]
    assert list(got) == want


def test_grid_known_answer(make_features):
    rng = np.random.default_rng(11)
    # 9 active features (one undefined) and one inactive feature that would otherwise count as survived.
    r = np.array([0.99, 0.92, 0.87, 0.82, 0.65, 0.45, 0.35, 0.25, np.nan, 0.99])
    active = np.array([True] * 9 + [False])
    grid = threshold_grid(make_features(rng, r, active), survival=[0.8, 0.9], damage=[0.3, 0.5])
    cell = grid.set_index(["survival_threshold", "damage_threshold"])
    assert (grid["n_active"] == 9).all() and (grid["n_undefined"] == 1).all()
    assert tuple(cell.loc[(0.9, 0.5), ["n_survived", "n_degraded", "n_damaged"]]) == (2, 3, 3)
    assert tuple(cell.loc[(0.8, 0.3), ["n_survived", "n_degraded", "n_damaged"]]) == (4, 3, 1)
    assert tuple(cell.loc[(0.8, 0.5), ["n_survived", "n_degraded", "n_damaged"]]) == (4, 1, 3)
    assert cell.loc[(0.9, 0.5), "survived_pct"] == pytest.approx(100 * 2 / 9)
    assert cell.loc[(0.9, 0.5), "undefined_pct"] == pytest.approx(100 / 9)


@pytest.mark.parametrize("seed,n", [(0, 1), (1, 37), (2, 1000), (3, 4099)])
def test_grid_matches_direct_recount(make_features, seed, n):
    rng = np.random.default_rng(seed)
    r = rng.uniform(-0.3, 1.0, n)
    r[rng.random(n) < 0.05] = np.nan
    active = rng.random(n) < 0.8
    active[0] = True
    features = make_features(rng, r, active)
    grid = threshold_grid(features)
    assert len(grid) == len(SURVIVAL_GRID) * len(DAMAGE_GRID)
    for row in grid.itertuples():
        counts = {"survived": 0, "degraded": 0, "damaged": 0, "undefined": 0}
        for value, is_active in zip(features["r"], features["active"]):
            if not is_active:
                continue
            if value != value:
                counts["undefined"] += 1
            elif value > row.survival_threshold:
                counts["survived"] += 1
            elif value < row.damage_threshold:
                counts["damaged"] += 1
            else:
                counts["degraded"] += 1
        n_active = sum(counts.values())
        assert row.n_active == n_active
        for cls, count in counts.items():
            assert getattr(row, f"n_{cls}") == count, (row, cls, count)
            assert getattr(row, f"{cls}_pct") == pytest.approx(100.0 * count / n_active, rel=1e-12)
        total = row.survived_pct + row.degraded_pct + row.damaged_pct + row.undefined_pct
        assert total == pytest.approx(100.0, rel=1e-12)


def test_grid_run_stacks_conditions(make_features):
    rng = np.random.default_rng(5)
    tables = {name: make_features(rng, rng.uniform(0, 1, 200)) for name in ("int8", "int6", "prune-matched")}
    run = threshold_grid_run(tables, survival=[0.9], damage=[0.5])
    assert list(run["condition"]) == ["int8", "int6", "prune-matched"]
    for name, features in tables.items():
        direct = threshold_grid(features, survival=[0.9], damage=[0.5])
        pd.testing.assert_frame_equal(run[run["condition"] == name].drop(columns="condition").reset_index(drop=True), direct)


def test_paper_int6_and_pruning_cell(paper_dir, paper_rtn, paper_prune):
    """The (0.9, 0.5) cell reproduces the paper's Table 1 rows (phase2b_summary_final.csv)."""
    published = pd.read_csv(paper_dir / "tables" / "phase2b_summary_final.csv").set_index("condition")
    for features, condition in ((paper_rtn, "RTN INT6"), (paper_prune, "Magnitude pruning matched INT6")):
        cell = threshold_grid(features).set_index(["survival_threshold", "damage_threshold"]).loc[(0.9, 0.5)]
        assert cell["n_active"] == published.loc[condition, "n_active_features"] == 5688
        assert cell["survived_pct"] == pytest.approx(published.loc[condition, "survived_>0.9_pct"], rel=1e-12)
        assert cell["damaged_pct"] == pytest.approx(published.loc[condition, "damaged_<0.5_pct"], rel=1e-12)


def test_missing_column_message(make_features):
    features = make_features(np.random.default_rng(0), np.linspace(0, 1, 10)).drop(columns="r")
    with pytest.raises(QdmError, match=r"lacks column\(s\) r: pass a features/"):
        threshold_grid(features)
    with pytest.raises(QdmError, match="must be a pandas DataFrame"):
        require_columns({"r": [1.0]}, ["r"])


@pytest.mark.parametrize(
    "survival,damage,message",
    [
        ([0.9], [0.95], "damage threshold 0.95 exceeds survival threshold 0.9"),
        ([], [0.5], "empty survival threshold grid"),
        ([0.9], [], "empty damage threshold grid"),
        ([1.5], [0.5], r"survival threshold 1.5 is not a correlation"),
        ([0.9], [float("nan")], r"damage threshold nan is not a correlation"),
    ],
)
def test_bad_thresholds_messages(make_features, survival, damage, message):
    features = make_features(np.random.default_rng(1), np.linspace(0, 1, 10))
    with pytest.raises(QdmError, match=message):
        threshold_grid(features, survival=survival, damage=damage)


def test_no_active_features_message(make_features):
    features = make_features(np.random.default_rng(2), np.linspace(0, 1, 10), active=np.zeros(10, dtype=bool))
    with pytest.raises(QdmError, match="no active features"):
        threshold_grid(features)


def test_non_boolean_active_message(make_features):
    features = make_features(np.random.default_rng(3), np.linspace(0, 1, 10))
    features["active"] = ["yes"] * 10
    with pytest.raises(QdmError, match="'active' holds non-boolean values"):
        threshold_grid(features)


def test_empty_run_message():
    with pytest.raises(QdmError, match="no conditions"):
        threshold_grid_run({})


def test_grid_values_on_a_threshold_are_degraded(make_features):
    """r equal to a threshold is neither survived (r > s) nor damaged (r < d)."""
    features = make_features(np.random.default_rng(4), np.array([0.9, 0.5, 0.8, 0.3]))
    grid = threshold_grid(features, survival=[0.8, 0.9], damage=[0.3, 0.5]).set_index(
        ["survival_threshold", "damage_threshold"]
    )
    cols = ["n_survived", "n_degraded", "n_damaged"]
    assert tuple(grid.loc[(0.9, 0.5), cols]) == (0, 3, 1)
    assert tuple(grid.loc[(0.8, 0.5), cols]) == (1, 2, 1)
    assert tuple(grid.loc[(0.8, 0.3), cols]) == (1, 3, 0)


def test_classify_active_agrees_with_taxonomy():
    """The grid's rule is the engine's taxonomy rule, given the same active set and thresholds."""
    taxonomy = pytest.importorskip("qdm_engine.analysis.taxonomy")
    rng = np.random.default_rng(21)
    n = 5000
    r = rng.uniform(-1, 1, n)
    r[rng.random(n) < 0.05] = np.nan
    r[:4] = [0.9, 0.5, 0.85, 0.3]  # values on the thresholds used below
    fp_rate = rng.uniform(0, 3e-3, n)
    for s, d in ((0.9, 0.5), (0.85, 0.3)):
        want = taxonomy.classify(r, fp_rate, taxonomy.Thresholds(active=1e-3, survived=s, damaged=d))
        got = classify_active(r, fp_rate > 1e-3, survival=s, damage=d)
        assert list(got) == list(want)
