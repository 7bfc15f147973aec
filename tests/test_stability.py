"""Stability: budget prefixes and token subsets recounted from per-batch moments equal separate audits."""

import numpy as np
import pandas as pd
import pytest

from qdm_engine.audit import sweep
from qdm_engine.cli import main
from qdm_engine.stability import stability


def test_budget_prefix_equals_a_separate_audit(tiny_llama, tiny_sae, text_file):
    kw = dict(model=str(tiny_llama), sae=str(tiny_sae), text=str(text_file), block_len=32, batch_size=2,
              progress=False, log=lambda m: None)
    table = stability(condition="int4", budgets=(256, 512), subsets=3, subset_frac=0.5, seed=1, **kw)
    assert table["kind"].tolist() == ["budget", "budget", "subset", "subset", "subset"]
    assert table["positions"].tolist()[:2] == [256, 512]
    assert (table.loc[2:, "positions"] == 256).all()  # half of 8 batches of 2 blocks of 32
    for budget in (256, 512):
        direct = sweep(bits="4", tokens=budget, **kw).summary.set_index("condition").loc["int4"]
        row = table[(table.kind == "budget") & (table["index"] == budget)].iloc[0]
        assert row["n_active"] == direct["n_active"] and row["scored"] == direct["n_tokens"]
        for col in ("mean_r", "median_r", "survived_pct", "degraded_pct", "damaged_pct"):
            assert row[col] == pytest.approx(direct[col], abs=1e-9), col


def test_stability_command(tiny_llama, tiny_sae, text_file, tmp_path, capsys):
    out = tmp_path / "stab"
    rc = main(["stability", "--model", str(tiny_llama), "--sae", str(tiny_sae), "--text", str(text_file),
               "--condition", "int4", "--budgets", "128,256", "--subsets", "4", "--block-len", "32", "--batch-size", "2",
               "--quiet", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "subsets: survived" in text and "budgets: survived" in text
    table = pd.read_csv(out / "summary.csv")
    assert len(table) == 6 and np.isfinite(table["survived_pct"]).all()
    assert main(["stability", "--condition", "prune", "--budgets", "128"]) == 2
    assert "RTN condition like int6" in capsys.readouterr().err
