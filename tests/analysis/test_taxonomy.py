"""The taxonomy rule and the Table-1 summary of one condition."""

import numpy as np
import pandas as pd
import pytest

from qdm_engine.analysis.taxonomy import Thresholds, classify, summarize
from qdm_engine.errors import QdmError


def test_classify_boundaries():
    r = np.array([0.95, 0.9, 0.5, 0.49, np.nan, 0.99, -0.2])
    rate = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 1e-3, 0.5])
    assert classify(r, rate).tolist() == ["survived", "degraded", "degraded", "damaged", "undefined", "inactive", "damaged"]
    th = Thresholds(active=0.0, survived=0.8, damaged=0.6)
    assert classify(r, rate, th).tolist() == ["survived", "survived", "damaged", "damaged", "undefined", "survived", "damaged"]


def test_summarize_counts_percentages_of_active_features():
    rng = np.random.default_rng(0)
    r = rng.uniform(-0.2, 1.0, 400)
    r[:7] = np.nan
    rate = rng.uniform(0, 0.01, 400)
    df = pd.DataFrame({"r": r, "fp_rate": rate, "active": rate > 1e-3, "cls": classify(r, rate)})
    s = summarize(df)
    act = df[df.active]
    assert s["n_active"] == len(act)
    assert s["undefined_n"] == int((act.cls == "undefined").sum())
    assert s["survived_pct"] == pytest.approx(100 * (act.r > 0.9).sum() / len(act))
    assert s["damaged_pct"] == pytest.approx(100 * (act.r < 0.5).sum() / len(act))
    assert s["mean_r"] == pytest.approx(np.nanmean(act.r)) and s["median_r"] == pytest.approx(np.nanmedian(act.r))
    total = s["survived_pct"] + s["degraded_pct"] + s["damaged_pct"] + 100 * s["undefined_n"] / s["n_active"]
    assert total == pytest.approx(100.0)


@pytest.mark.parametrize("kw", [dict(active=1.5), dict(survived=0.4, damaged=0.5), dict(survived=1.2)])
def test_bad_thresholds(kw):
    with pytest.raises(QdmError):
        Thresholds(**kw)
