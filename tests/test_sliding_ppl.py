"""Sliding-window perplexity against direct computations on a tiny model, and `qdm-engine ppl` on a run."""

import json
import math
import re

import pandas as pd
import pytest
import torch

from qdm_engine.cli import main
from qdm_engine.engine.models import load_model
from qdm_engine.engine.perplexity import nll_sum, sliding_window_nll


@pytest.fixture(scope="module")
def lm(tiny_llama):
    model, tok, _ = load_model(str(tiny_llama), progress=False)
    return model, tok


def _labels_reference(model, ids, window, stride, bos):
    """Independent path: HF's own loss with -100 labels on already-scored targets, window by window."""
    span = window - (bos is not None)
    total, count, done, begin = 0.0, 0, 0 if bos is not None else 1, 0
    while True:
        end = min(begin + span, ids.numel())
        chunk = ids[begin:end]
        if bos is not None:
            chunk = torch.cat([torch.tensor([bos]), chunk])
        labels = chunk.clone()
        new_from = done - begin + (bos is not None)  # chunk index of the first unscored token
        labels[:new_from] = -100
        n = int((labels[1:] != -100).sum())
        total += model(input_ids=chunk[None], labels=labels[None]).loss.item() * n
        count += n
        done = end
        if end == ids.numel():
            return total, count
        begin += stride


@pytest.mark.parametrize("bos", [1, None])
@pytest.mark.parametrize("window,stride", [(24, 8), (24, 23), (17, 5)])
def test_sliding_window_matches_labels_reference(lm, bos, window, stride):
    model, tok = lm
    ids = torch.randint(3, len(tok), (90,), generator=torch.Generator().manual_seed(window + stride))
    with torch.no_grad():
        got = sliding_window_nll(model, ids, window, stride, bos)
        ref = _labels_reference(model, ids, window, stride, bos)
    assert got[1] == ref[1] == 90 - (bos is None)  # every token scored exactly once
    assert math.isclose(got[0], ref[0], rel_tol=1e-5)


def test_window_covering_the_text_is_the_plain_perplexity(lm):
    model, tok = lm
    ids = torch.randint(3, len(tok), (60,), generator=torch.Generator().manual_seed(1))
    block = torch.cat([torch.tensor([1]), ids])[None]
    with torch.no_grad():
        assert sliding_window_nll(model, ids, 200, 100, 1) == pytest.approx(nll_sum(model(input_ids=block).logits, block))


def test_ppl_command_adds_columns_to_a_run(tiny_llama, tiny_sae, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sweep", "--model", str(tiny_llama), "--sae", str(tiny_sae), "--text", str(text_file), "--tokens", "256",
                 "--block-len", "32", "--bits", "4", "--null", "--quiet", "--out", str(out)]) == 0
    before = pd.read_csv(out / "summary.csv")
    before_text = (out / "summary.csv").read_text().splitlines()
    before_json = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["ppl", str(out), "--window", "64", "--stride", "16", "--quiet"]) == 0
    printed = capsys.readouterr().out
    after = pd.read_csv(out / "summary.csv")
    pd.testing.assert_frame_equal(after[before.columns], before)
    # The rewrite keeps every column's type: the original columns are the same text (bits 4, not 4.0).
    after_text = (out / "summary.csv").read_text().splitlines()
    assert [line[: len(old)] for line, old in zip(after_text, before_text)] == before_text
    assert after_text[3].split(",")[1:4] == ["int4", "rtn", "4"]
    after_json = json.loads((out / "summary.json").read_text())
    assert [{k: row[k] for k in old} for row, old in zip(after_json, before_json)] == before_json
    assert after_json[2]["bits"] == 4 and isinstance(after_json[2]["bits"], int)
    assert after["ppl_sliding"].notna().all() and "ppl_sliding" in printed
    fp, null = after.set_index("condition").loc[["fp", "fp-null"], "ppl_sliding"]
    assert fp == null and after.loc[0, "dppl_sliding_pct"] == 0.0
    assert main(["ppl", str(out), "--window", "16", "--stride", "16"]) == 2
    assert "0 < --stride < --window" in capsys.readouterr().err


def test_ppl_rebuilds_every_method_from_its_recorded_spec(tiny_llama, tiny_sae, text_file, tmp_path, capsys):
    """A group-wise RTN and a 2:4 magnitude condition are rescored as themselves (not as per-row RTN, not as
    FP); a calibrated method is left empty and named, never given the FP perplexity."""
    from qdm_engine.engine.compress import parse_method
    from qdm_engine.engine.perplexity import perplexity

    out = tmp_path / "run"
    methods = ["rtn:bits=3,group=16", "magnitude:pattern=2:4"]
    if __import__("importlib").util.find_spec("llmcompressor") is not None:
        methods.append("wanda:sparsity=0.3")
    argv = ["sweep", "--model", str(tiny_llama), "--sae", str(tiny_sae), "--text", str(text_file), "--tokens", "256",
            "--block-len", "32", "--calib-tokens", "64", "--bits", "3", "--quiet", "--out", str(out)]
    for m in methods:
        argv += ["--method", m]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["ppl", str(out), "--window", "64", "--stride", "32", "--quiet"]) == 0
    err = capsys.readouterr().err
    # the up-front estimate: one timed window forward times every window of every model
    assert re.search(r"this will take about \S+ \((\d+) window forwards at [\d.]+ s, timed on one\)", err), err
    got = pd.read_csv(out / "summary.csv").set_index("condition")["ppl_sliding"]
    model, tok = load_model(str(tiny_llama), progress=False)[:2]
    from qdm_engine.engine.tokens import read_text

    text = read_text(str(text_file))
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])[: 8 * 31]
    with torch.inference_mode():
        parse_method("rtn:bits=3,group=16").apply(model)
        want = perplexity(*sliding_window_nll(model, ids, 64, 32, tok.bos_token_id))
    assert got["int3-g16"] == pytest.approx(want, rel=1e-9)
    assert got["int3-g16"] != got["int3"] and got["magnitude-2of4"] != got["fp"]
    if "wanda:sparsity=0.3" in methods:
        assert math.isnan(got["wanda-30"]) and "wanda-30" in err


def test_missing_audit_text_is_reported_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import qdm_engine.audit
    from qdm_engine.analysis.results import write_run

    def no_model(*_a, **_k):
        raise AssertionError("the model was loaded before the run's text was checked")

    monkeypatch.setattr(qdm_engine.audit, "load_lm", no_model)
    config = {"model": {"load": {"model": "some-model", "gguf_file": None, "trust_remote_code": False}},
              "tokens": {"text": str(tmp_path / "gone.txt"), "n_blocks": 1, "block_len": 32}, "conditions": [],
              "device": "cpu", "dtype": "float32"}
    run = write_run(tmp_path / "run", config, pd.DataFrame({"condition": ["fp"], "ppl": [1.0]}), {})
    assert main(["ppl", str(run), "--quiet"]) == 2
    assert "gone.txt' does not exist" in capsys.readouterr().err
