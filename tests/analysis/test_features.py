"""Failure types on constructed features, and `qdm-engine features` on a run folder.

Each constructed feature is a pair of activation columns (FP x, compressed y) over 4,000 positions,
turned into the engine's own per-feature table (FeatureMoments -> feature_table) and top-k table
(TopK over x, y read at its positions), so the types are computed as in a real run.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from qdm_engine.analysis.features import (
    FailureThresholds, context_line, failure_types, features_payload, magnitude_ratio, neuronpedia_id,
)
from qdm_engine.analysis.results import write_run
from qdm_engine.analysis.taxonomy import Thresholds
from qdm_engine.audit import feature_table
from qdm_engine.cli import main
from qdm_engine.engine.topk import TopK
from qdm_engine.errors import QdmError
from qdm_engine.kernels.moments import FeatureMoments

CASES = ["kept", "scaled 0.5", "stops firing", "shuffled", "fires everywhere", "noisy", "silent"]


def constructed(seed: int = 0, t: int = 4000, k: int = 16):
    rng = np.random.default_rng(seed)
    fires = rng.random(t) < 0.05
    base = np.where(fires, rng.gamma(2.0, 1.0, t), 0.0)
    cols_x, cols_y = [], []
    for case in CASES:
        x = base.copy()
        if case == "kept":
            y = x * (1 + 0.01 * rng.normal(size=t))
        elif case == "scaled 0.5":
            y = 0.5 * x
        elif case == "stops firing":
            y = x * (rng.random(t) < 0.05)  # fires on 5% of its former positions
        elif case == "shuffled":
            y = rng.permutation(x)  # same rate and sizes, wrong places
        elif case == "fires everywhere":
            y = x + np.where(rng.random(t) < 0.3, rng.gamma(2.0, 1.0, t), 0.0)
        elif case == "noisy":
            y = np.maximum(x + rng.normal(0, 3.0, t) * fires, 0)  # same places, much noise: r ~ 0.6
        else:  # never fires in FP: inactive
            x = np.zeros(t)
            y = np.zeros(t)
        cols_x.append(x)
        cols_y.append(y)
    x = np.stack(cols_x, 1).astype(np.float32)
    y = np.stack(cols_y, 1).astype(np.float32)
    m = FeatureMoments.from_activations(torch.from_numpy(x), torch.from_numpy(y))
    table = feature_table(m, Thresholds())
    tracker = TopK(len(CASES), k, "cpu")
    tracker.update(torch.from_numpy(x), 0)
    topk = tracker.entries()
    topk["block"], topk["pos"] = topk["row"] // 100, topk["row"] % 100
    topk["int4"] = y[topk["row"].to_numpy(), topk["feature"].to_numpy()]
    return table, topk.drop(columns="row"), x, y


def test_constructed_cases_get_their_failure_type():
    table, topk, x, y = constructed()
    mag = magnitude_ratio(topk, "int4", len(table))
    np.testing.assert_allclose(mag[CASES.index("scaled 0.5")], 0.5, rtol=1e-6)
    assert abs(mag[CASES.index("kept")] - 1) < 0.02 and np.isnan(mag[CASES.index("silent")])
    types = dict(zip(CASES, failure_types(table, mag, survived=0.9)))
    assert types == {"kept": "survived", "scaled 0.5": "rescaled", "stops firing": "dies",
                     "shuffled": "misfires", "fires everywhere": "new firing", "noisy": "misfires", "silent": None}
    # r alone calls the rescaled feature a survivor
    assert table.loc[CASES.index("scaled 0.5"), "cls"] == "survived"
    # thresholds move the boundaries: with a looser rescale bound the halved feature counts as survived
    loose = failure_types(table, mag, 0.9, FailureThresholds(rescale=2.5))
    assert loose[CASES.index("scaled 0.5")] == "survived"
    with pytest.raises(QdmError, match="--rescale"):
        FailureThresholds(rescale=0.8)


@pytest.fixture
def run_dir(tmp_path):
    table, topk, x, y = constructed()
    topk.insert(0, "sae", "sae")
    n_blocks = 40
    tokens = pd.DataFrame({"block": np.repeat(np.arange(n_blocks), 100), "pos": np.tile(np.arange(100), n_blocks)})
    tokens["token"] = tokens["pos"]
    tokens["text"] = [f" w{b}.{p}" if p else "<bos>" for b, p in zip(tokens["block"], tokens["pos"])]
    table.insert(2, "r_lo", table["r"] - 0.01)
    table.insert(3, "r_hi", np.minimum(table["r"] + 0.01, 1))
    config = {"thresholds": Thresholds().to_dict(), "tokens": {"bos": True},
              "sae": {"release": "gpt2-small-res-jb", "sae_id": "blocks.8.hook_resid_pre"}}
    summary = pd.DataFrame({"condition": ["fp", "int4"]})
    return write_run(tmp_path / "run", config, summary, {"int4": table}, {"topk": topk, "tokens": tokens})


def test_features_command_lists_the_worst_with_contexts(run_dir, capsys):
    assert main(["features", str(run_dir), "--condition", "int4", "--worst", "3", "--contexts", "2", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    rows = payload["features"]
    table = pd.read_parquet(run_dir / "features" / "int4.parquet")
    lowest = table[table["active"]].sort_values("r")["feature"].head(3).tolist()
    assert [r["feature"] for r in rows] == lowest and rows[0]["r"] <= rows[1]["r"] <= rows[2]["r"]
    assert all(len(r["contexts"]) == 2 for r in rows)
    c = rows[0]["contexts"][0]
    b, p = c["block"], c["pos"]
    assert f"[[ w{b}.{p}]]" in c["context"] and "<bos>" not in c["context"]
    assert c["context"].count("[[") == 1 and c["fp_act"] >= rows[0]["contexts"][1]["fp_act"]
    known = neuronpedia_id({"release": "gpt2-small-res-jb", "sae_id": "blocks.8.hook_resid_pre"})
    if known:  # SAELens's release directory is installed with the package (no network)
        assert rows[0]["neuronpedia"] == f"https://neuronpedia.org/{known}/{rows[0]['feature']}"

    assert main(["features", str(run_dir), "--condition", "int4", "--feature", "1", "2", "--contexts", "1"]) == 0
    text = capsys.readouterr().out
    assert "feature 1  rescaled" in text and "feature 2  dies" in text and "magnitude x0.50" in text


def test_features_command_rejects_bad_input(run_dir, capsys):
    assert main(["features", str(run_dir), "--condition", "int9"]) == 2
    assert "condition 'int9' is not in run" in capsys.readouterr().err
    assert main(["features", str(run_dir), "--condition", "int4", "--feature", "99"]) == 2
    assert "--feature 99" in capsys.readouterr().err
    assert main(["features", str(run_dir), "--condition", "int4", "--dies-below", "1.5"]) == 2
    assert "--dies-below" in capsys.readouterr().err


def test_context_line_marks_the_firing_token():
    ctx = {"tokens": [{"text": "a", "fires": False}, {"text": " b\n", "fires": True}, {"text": "c", "fires": False}]}
    assert context_line(ctx) == "a[[ b\u21b5]]c"


def test_sweep_writes_topk_tokens_and_a_report_with_contexts(tiny_llama, tiny_sae, text_file, tmp_path, capsys):
    """End to end on a tiny model: the run folder's topk/tokens tables, the null condition reproducing the
    FP activations, the features command and the report section reading them."""
    out = tmp_path / "run"
    assert main(["sweep", "--model", str(tiny_llama), "--sae", str(tiny_sae), "--text", str(text_file),
                 "--tokens", "512", "--block-len", "32", "--batch-size", "4", "--quiet", "--out", str(out),
                 "--bits", "4", "--null", "--report"]) == 0
    printed = capsys.readouterr().out
    assert "95% intervals of each share at unlimited tokens (block bootstrap over 16 runs of blocks, bias-corrected" in printed
    topk = pd.read_parquet(out / "topk.parquet")
    assert list(topk.columns) == ["sae", "feature", "rank", "block", "pos", "fp_act", "fp-null", "int4"]
    assert (topk["pos"] >= 1).all() and topk["pos"].max() < 32 and topk["block"].max() < 16
    assert topk.groupby("feature")["rank"].max().max() == 15  # k = 16 by default
    np.testing.assert_allclose(topk["fp-null"], topk["fp_act"], rtol=1e-5, atol=1e-7)
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert len(tokens) == 16 * 32 and (tokens.loc[tokens["pos"] == 0, "token"] == 1).all()  # BOS at position 0
    table = load_features_table(out, "int4")
    assert {"r_lo", "r_hi"} <= set(table.columns)
    act = table[table["active"]]
    assert ((act["r_lo"] <= act["r"] + 1e-9) | act["r"].isna()).all()

    assert main(["features", str(out), "--condition", "int4", "--worst", "2", "--contexts", "1"]) == 0
    text = capsys.readouterr().out
    assert text.count("\nfeature ") == 2 and text.count("[[") == 2
    page = (out / "report" / "report.html").read_text(encoding="utf-8")
    assert "Most damaged features" in page and "<mark>" in page and "Failure types per condition" in page


def load_features_table(run, cond):
    from qdm_engine.analysis.results import load_features

    return load_features(run, cond)
