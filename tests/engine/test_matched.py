"""Matched-perplexity pruning: the bisection on a known monotone ppl(s), and the sweep option end to end."""

import pandas as pd
import pytest

from qdm_engine.audit import sweep
from qdm_engine.engine.matched import bisect_sparsity


def test_bisection_follows_method_and_picks_closest():
    calls = []

    def ppl(s):  # monotone, target 19.5 crossed at s = 0.308
        calls.append(s)
        return 10.0 + 100.0 * s ** 2

    best, trace = bisect_sparsity(ppl, target=19.5)
    assert calls == pytest.approx([0.4, 0.2, 0.3, 0.35, 0.325, 0.3125])  # 6 steps over [0, 0.8]
    assert [s for s, _ in trace] == calls
    assert best == pytest.approx(0.3125)  # ppl 19.77 beats 0.3's 19.0


def test_bisection_target_beyond_range_stays_at_the_edge():
    best, trace = bisect_sparsity(lambda s: 1.0 + s, target=100.0)
    assert best == trace[-1][0] and best > 0.78


def test_prune_matched_sweep(tiny_llama, tiny_sae, text_file, tmp_path):
    logs = []
    res = sweep(model=str(tiny_llama), sae=str(tiny_sae), bits="6", prune_matched="int6", text=str(text_file),
                tokens=512, block_len=32, calib_tokens=256, progress=False, out=tmp_path / "run", log=logs.append)
    names = res.summary["condition"].tolist()
    assert names == ["fp", "int6", "prune-matched"]
    cond = [c for c in res.config["conditions"] if c["name"] == "prune-matched"][0]
    assert cond["target"] == "int6" and len(cond["bisection"]) == 6
    chosen = min(cond["bisection"], key=lambda t: abs(t["ppl"] - cond["target_ppl"]))
    assert cond["sparsity"] == chosen["sparsity"]
    assert sum("sparsity" in m and "vs target" in m for m in logs) == 6
    calib = res.config["tokens"]["calibration"]
    assert calib["blocks"] == 8 and "after the audit blocks" in calib["disjoint"]
    assert (tmp_path / "run" / "features" / "prune-matched.parquet").is_file()
    assert isinstance(res.features["prune-matched"], pd.DataFrame)


def test_prune_matched_rejects_bad_target(tiny_llama, tiny_sae, text_file):
    from qdm_engine.errors import QdmError

    with pytest.raises(QdmError, match="takes an RTN condition like int6"):
        sweep(model=str(tiny_llama), sae=str(tiny_sae), prune_matched="prune-0.2", text=str(text_file))
