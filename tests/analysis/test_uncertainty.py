"""Block-bootstrap intervals of r: exact pooling, coverage of a known correlation, the summary intervals."""

import math

import numpy as np
import pandas as pd
import torch

from qdm_engine.analysis.taxonomy import Thresholds
from qdm_engine.analysis.uncertainty import (
    add_intervals, few_fires_warning, intervals, replicate_r, replicate_weights,
)
from qdm_engine.kernels.moments import FeatureMoments


def unit_moments(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[U, 9, F] packed moments of x, y [U, n, F] (one unit per leading index)."""
    return np.stack([FeatureMoments.from_activations(torch.from_numpy(a), torch.from_numpy(b)).pack().numpy()
                     for a, b in zip(x, y)])


def test_replicate_of_every_unit_once_is_the_full_sample_r():
    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, 1.0, (20, 50, 30)) + 1e4  # large mean, small spread: pooling must not cancel
    y = 0.5 * x + rng.normal(0, 1, x.shape)
    packed = unit_moments(x, y)
    r = replicate_r(packed, np.ones((1, 20)))[0]
    ref = np.array([np.corrcoef(x[:, :, f].ravel(), y[:, :, f].ravel())[0, 1] for f in range(30)])
    np.testing.assert_allclose(r, ref, rtol=0, atol=1e-10)
    # twice every unit is the same sample again; a replicate of one unit is that unit's r
    np.testing.assert_allclose(replicate_r(packed, np.full((1, 20), 2.0))[0], ref, rtol=0, atol=1e-10)
    one = np.zeros((1, 20))
    one[0, 3] = 1
    np.testing.assert_allclose(replicate_r(packed, one)[0],
                               [np.corrcoef(x[3, :, f], y[3, :, f])[0, 1] for f in range(30)], rtol=0, atol=1e-10)


def test_weights_draw_every_unit_count_with_replacement():
    w = replicate_weights(40, 500, seed=3)
    assert w.shape == (500, 40) and (w.sum(1) == 40).all()
    assert abs(w.mean() - 1.0) < 0.02 and (w == 0).any()


def test_intervals_cover_the_true_r_with_block_correlated_tokens():
    """200 independent audits (one per column) of a pair with a known population r. Within a unit,
    tokens share a random offset (neighbouring tokens are alike), which a per-token bootstrap would
    ignore; resampling whole units must still cover the true r in >= 90% of the 200 repeats."""
    rng = np.random.default_rng(0)
    units, n, repeats, rho, s2 = 64, 100, 200, 0.6, 0.3
    z1 = rng.normal(size=(units, n, repeats))
    z2 = rng.normal(size=(units, n, repeats))
    u = rng.normal(0, np.sqrt(s2), size=(units, 1, repeats))
    x = z1 + u
    y = rho * z1 + np.sqrt(1 - rho ** 2) * z2 + u
    true_r = (rho + s2) / (1 + s2)
    table, _ = intervals(unit_moments(x, y), np.ones(repeats, bool), replicates=1000, seed=0)
    covered = ((table["r_lo"] <= true_r) & (true_r <= table["r_hi"])).mean()
    assert covered >= 0.90, covered
    width = (table["r_hi"] - table["r_lo"]).median()
    assert 0.02 < width < 0.2


def test_intervals_cover_a_sparse_feature_pair():
    """ReLU'd pairs firing on ~10% of positions (population r from 4M draws), 200 repeats."""
    rng = np.random.default_rng(5)

    def draw(shape):
        z1, z2 = rng.normal(size=shape), rng.normal(size=shape)
        return np.maximum(z1 - 1.3, 0), np.maximum(0.8 * z1 + 0.6 * z2 - 1.3, 0)

    big_x, big_y = draw(4_000_000)
    true_r = np.corrcoef(big_x, big_y)[0, 1]
    x, y = draw((64, 120, 200))
    table, _ = intervals(unit_moments(x, y), np.ones(200, bool), replicates=1000, seed=1)
    covered = ((table["r_lo"] <= true_r) & (true_r <= table["r_hi"])).mean()
    assert covered >= 0.90, covered


def test_summary_intervals_and_undefined_features():
    rng = np.random.default_rng(2)
    f = 60
    x = np.maximum(rng.normal(size=(32, 80, f)), 0)
    noise = np.linspace(0.05, 3.0, f)  # r falls from ~1 to ~0.3 along the features
    y = np.maximum(x + noise * rng.normal(size=x.shape), 0)
    y[:, :, 0] = 0  # never fires once compressed: r undefined
    packed = unit_moments(x, y)
    r = FeatureMoments.combine(torch.from_numpy(packed)).pearson().numpy()
    th = Thresholds()
    df = pd.DataFrame({"feature": np.arange(f), "r": r, "fp_rate": 0.5, "active": True})
    df["cls"] = np.where(np.isnan(r), "undefined", np.where(r > 0.9, "survived", np.where(r < 0.5, "damaged", "degraded")))
    summary = pd.DataFrame({"condition": ["fp", "int4"]})
    for name in ("survived", "degraded", "damaged"):
        summary[f"{name}_pct"] = [np.nan, 100.0 * (df["cls"] == name).mean()]
    features = {"int4": df}
    add_intervals(summary, features, {"int4": packed}, th, replicates=400)
    assert list(df.columns[:4]) == ["feature", "r", "r_lo", "r_hi"]
    assert np.isnan(df.loc[0, ["r_lo", "r_hi"]].astype(float)).all()
    ok = df.iloc[1:]
    assert ((ok["r_lo"] <= ok["r"] + 1e-12) & (ok["r"] <= ok["r_hi"] + 1e-12)).mean() > 0.95
    row = summary.iloc[1]
    for name in ("survived", "degraded", "damaged"):
        assert row[f"{name}_lo"] <= row[f"{name}_pct"] <= row[f"{name}_hi"], name
    assert row["degraded_hi"] - row["degraded_lo"] > 0 and row["boot_units"] == 32
    assert np.isnan(summary.loc[0, "survived_lo"])


def test_few_fires_warning_names_the_count_and_a_budget():
    df = pd.DataFrame({"fp_rate": [0.002, 0.0015, 0.05, 0.1], "active": True,
                       "r_lo": [0.1, 0.2, 0.9, 0.95], "r_hi": [0.9, 0.8, 0.95, 0.97]})
    msg = few_fires_warning(df, scored=8128, positions=8192)
    assert msg.startswith("2 of 4 active features fire on fewer than 30 FP positions")
    assert f"--tokens {math.ceil(30 / 0.0015 * 8192 / 8128)} " in msg  # 30 firings at the lowest rate
    assert few_fires_warning(df, scored=10**6, positions=10**6) is None
