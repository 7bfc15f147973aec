"""`qdm-engine sweep` end to end on a tiny random model and SAE, and every user error it reports."""

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from qdm_testing import build_sae
from qdm_engine.analysis.results import FEATURE_COLUMNS, list_conditions, load_features
from qdm_engine.cli import main


def sweep_args(model, sae, text, out, *extra):
    return ["sweep", "--model", str(model), "--sae", str(sae), "--text", str(text), "--tokens", "512",
            "--block-len", "32", "--batch-size", "4", "--quiet", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def run(tiny_llama, tiny_sae, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    rc = main(sweep_args(tiny_llama, tiny_sae, text_file, out, "--bits", "8..4", "--prune", "0.5", "--null", "--report"))
    return rc, out


def test_sweep_writes_a_complete_run(run):
    rc, out = run
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["model_type"] == "llama" and config["sae"]["d_sae"] == 128
    assert config["versions"]["torch"] and config["tokens"]["bos"] is True
    assert config["tokens"]["scored_positions"] == 16 * 31
    summary = pd.read_csv(out / "summary.csv")
    assert summary["condition"].tolist() == ["fp", "fp-null", "int8", "int7", "int6", "int5", "int4", "prune-0.5"]
    assert json.loads((out / "summary.json").read_text())[2]["condition"] == "int8"
    assert (summary["n_tokens"] == 16 * 31).all()
    assert summary.loc[1:, ["survived_pct", "degraded_pct", "damaged_pct"]].sum(axis=1).between(99.999, 100.001).all()
    assert sorted(list_conditions(out)) == sorted(summary["condition"][1:])
    for cond in list_conditions(out):
        df = load_features(out, cond)
        assert tuple(df.columns) == FEATURE_COLUMNS and len(df) == 128
        assert df["feature"].tolist() == list(range(128))
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def test_null_condition_is_exactly_one(run):
    _, out = run
    null = load_features(out, "fp-null")
    active = null[null["active"]]
    assert len(active) > 5
    np.testing.assert_allclose(active["r"], 1.0, rtol=0, atol=1e-12)
    assert (active["cls"] == "survived").all()
    row = pd.read_csv(out / "summary.csv").set_index("condition").loc["fp-null"]
    assert row["survived_pct"] == 100.0 and row["dppl_pct"] == 0.0


def test_fp_statistics_identical_across_conditions(run):
    _, out = run
    a, b = load_features(out, "int8"), load_features(out, "prune-0.5")
    for col in ("fp_rate", "fp_mean", "fp_peak", "active"):
        assert a[col].equals(b[col]), col


def test_console_script_prints_the_table(tiny_llama, tiny_sae, text_file, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "qdm_engine.cli", *sweep_args(tiny_llama, tiny_sae, text_file, out, "--bits", "8,4")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"auditing {tiny_llama} at blocks.1.hook_resid_post with SAE sae")
    assert lines[1].startswith("512 tokens (496 scored) in 16 blocks of 32")
    assert lines[2].split()[:4] == ["condition", "bits", "PPL", "dPPL"]
    assert [ln.split()[0] for ln in lines[4:7]] == ["fp", "int8", "int4"]
    assert str(out) in proc.stdout and "Loading weights" not in proc.stderr


# ---- errors: one line on stderr, exit 2, no traceback, no results folder ----------------------------

@pytest.fixture(scope="module")
def odd_inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("odd")
    from transformers import AutoModelForCausalLM, OPTConfig

    from qdm_testing import make_text, make_tokenizer

    tok = make_tokenizer(make_text())
    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                                     num_attention_heads=4, word_embed_proj_dim=32))
    opt.save_pretrained(base / "opt")
    tok.save_pretrained(base / "opt")
    (base / "empty.txt").write_text("\n  \n")
    (base / "empty-model").mkdir()
    (base / "no-tokenizer").mkdir()
    (base / "no-tokenizer" / "config.json").write_text((base / "opt" / "config.json").read_text())
    return {
        "sae16": build_sae(base / "sae16", d_in=16),
        "opt": base / "opt",
        "empty": base / "empty.txt",
        "empty_model": base / "empty-model",
        "no_tokenizer": base / "no-tokenizer",
    }


ERROR_CASES = {
    "d_in mismatch": (lambda i: dict(sae=i["sae16"]), "SAE d_in 16 does not match the model's d_model 32"),
    "bad hook": (lambda i: dict(extra=["--hook", "blocks.7.hook_resid_post"]),
                 "hook .blocks.7.hook_resid_post. does not exist in this model; valid hooks: blocks.L.hook_resid_pre, .* with L in 0..2"),
    "bits range": (lambda i: dict(extra=["--bits", "1..4"]), "--bits 1..4: 1 is outside 2..16"),
    "bits high": (lambda i: dict(extra=["--bits", "17"]), "17 is outside 2..16"),
    "empty text": (lambda i: dict(text=i["empty"]), "is empty"),
    "missing text": (lambda i: dict(text=i["empty"].parent / "missing.txt"), "does not exist"),
    "budget": (lambda i: dict(extra=["--tokens", "16", "--block-len", "32"]), "--tokens 16 is smaller than one block"),
    "group": (lambda i: dict(extra=["--method", "rtn:bits=4,group=48"]), "rtn group size 48 does not divide the width 32"),
    "model path": (lambda i: dict(model=i["empty"].parent / "no-model"), "model path .* does not exist"),
    "sae path": (lambda i: dict(sae=i["empty"].parent / "no-sae"), "SAE .* does not exist"),
    "empty model folder": (lambda i: dict(model=i["empty_model"]),
                           "model folder '.*empty-model' is empty; pass to --model a folder written by transformers"),
    "model folder without tokenizer": (lambda i: dict(model=i["no_tokenizer"]),
                                       "model folder '.*no-tokenizer' has no tokenizer files"),
    "prune": (lambda i: dict(extra=["--prune", "1.5"]), "sparsity must be in \\[0, 1\\)"),
    "batch": (lambda i: dict(extra=["--batch-size", "0"]), "expected a positive number"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors(case, odd_inputs, tiny_llama, tiny_sae, text_file, tmp_path, capsys):
    make, message = ERROR_CASES[case]
    kw = make(odd_inputs)
    out = tmp_path / "run"
    args = sweep_args(kw.get("model", tiny_llama), kw.get("sae", tiny_sae), kw.get("text", text_file), out, *kw.get("extra", []))
    assert run_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert re.search(message, err[0]), err[0]
    assert not out.exists() and not list(tmp_path.glob(".run.partial-*"))


def run_main(args) -> int:
    """main()'s exit code, also when argparse itself exits (it raises SystemExit)."""
    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


def test_existing_results_are_never_overwritten(tiny_llama, tiny_sae, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(sweep_args(tiny_llama, tiny_sae, text_file, out)) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_analysis_commands_read_the_run(run, capsys):
    _, out = run
    assert main(["overlap", str(out), "--a", "int4", "--b", "prune-0.5"]) == 0
    text = capsys.readouterr().out
    assert "overlap of int4 and prune-0.5" in text and "Spearman" in text
    assert main(["thresholds", str(out), "--condition", "int4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 4 * 5  # header + survival 0.80..0.95 x damage 0.3..0.7
    assert main(["overlap", str(out), "--a", "int4", "--b", "int9"]) == 2
    assert "condition 'int9' is not in run" in capsys.readouterr().err


def test_several_saes_share_one_sweep_and_match_single_runs(tiny_llama, tiny_sae, text_file, tmp_path):
    from qdm_engine.audit import sweep

    other = build_sae(tmp_path / "pre0", d_sae=48, hook="blocks.0.hook_resid_pre", seed=7)
    kw = dict(model=str(tiny_llama), text=str(text_file), bits="8,4", tokens=384, block_len=32, progress=False, log=lambda m: None)
    both = sweep(sae=[str(tiny_sae), str(other)], out=tmp_path / "both", **kw)
    assert list_conditions(tmp_path / "both") == ["pre0/int4", "pre0/int8", "sae/int4", "sae/int8"]
    assert both.summary["sae"].tolist() == ["sae"] * 3 + ["pre0"] * 3
    single = sweep(sae=str(other), **kw)
    pd.testing.assert_frame_equal(both.features["pre0/int4"], single.features["int4"])
    np.testing.assert_allclose(both.summary["ppl"].iloc[3:], single.summary["ppl"], rtol=1e-12)


def test_features_only_mode_gives_the_same_features(tiny_llama, tiny_sae, text_file, capsys):
    from qdm_engine.audit import sweep

    kw = dict(model=str(tiny_llama), sae=str(tiny_sae), text=str(text_file), bits="4", tokens=384, block_len=32,
              progress=False, log=lambda m: None)
    full, fast = sweep(**kw), sweep(ppl=False, **kw)
    pd.testing.assert_frame_equal(full.features["int4"], fast.features["int4"])
    assert fast.summary["ppl"].isna().all() and full.summary["ppl"].notna().all()
    assert fast.config["tokens"]["ppl_targets"] == 0


def test_sweep_report_flag_writes_the_report(run):
    _, out = run
    html = (out / "report" / "report.html").read_text()
    assert "<img" in html and "int4" in html


def test_a_family_without_a_hand_written_map_is_compressed(odd_inputs, tiny_sae, text_file, tmp_path):
    """OPT keeps its layers under model.decoder.layers: the targets come from the model itself."""
    import pandas as pd

    out = tmp_path / "run"
    assert run_main(sweep_args(odd_inputs["opt"], tiny_sae, text_file, out, "--bits", "4")) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["condition"].tolist() == ["fp", "int4"] and summary["mean_r"].iloc[1] < 1.0


# ---- help text ---------------------------------------------------------------------------------------

def _subcommand_helps():
    import argparse

    from qdm_engine.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_help_shows_no_default_for_switches():
    """--no-bos and --no-ppl store True when absent; their help must not read '(default: True)'."""
    for name, parser in _subcommand_helps().items():
        for action in parser._actions:
            if action.nargs == 0 and action.option_strings and action.help:
                formatted = parser._get_formatter()._get_help_string(action)
                assert "(default:" not in formatted, (name, action.option_strings)
    text = " ".join(_subcommand_helps()["sweep"].format_help().split())
    assert "(default: True)" not in text and "(default: False)" not in text
    assert "--tokens TOKENS token budget (positions, BOS included); auto: 8192 on CPU, 131072 on CUDA (default: auto)" in text


# ---- flags that take several values accept a comma list ---------------------------------------------

def test_thresholds_takes_a_comma_list_of_conditions(run, capsys):
    _, out = run
    assert main(["thresholds", str(out), "--condition", "int4", "--condition", "int5"]) == 0
    repeated = capsys.readouterr().out
    assert main(["thresholds", str(out), "--condition", "int4,int5"]) == 0
    listed = capsys.readouterr().out
    assert listed == repeated and "int4" in listed and "int5" in listed
    assert len(listed.strip().splitlines()) == 1 + 2 * 4 * 5
    assert main(["thresholds", str(out), "--condition", "int4,int9"]) == 2
    assert "condition 'int9' is not in run" in capsys.readouterr().err


def test_sweep_flags_take_comma_lists(tmp_path):
    from qdm_engine.cli import build_parser

    a, b = tmp_path / "sae-a", tmp_path / "sae,b"  # a folder whose name holds a comma stays one SAE
    a.mkdir(), b.mkdir()
    args = build_parser().parse_args(["sweep", "--prune", "0.25,0.5", "--prune", "0.75",
                                      "--sae", f"{a},rel:id", "--sae", str(b)])
    assert args.prune == [0.25, 0.5, 0.75]
    assert args.sae == [str(a), "rel:id", str(b)]
    assert run_main(["sweep", "--prune", "0.2,x"]) == 2


# ---- every input is checked before a model loads ----------------------------------------------------

@pytest.mark.parametrize("with_model", [True, False], ids=["--model", "default model"])
@pytest.mark.parametrize("bad", ["missing", "no weights"])
def test_bad_sae_is_reported_before_the_model_loads(bad, with_model, tiny_llama, text_file, tmp_path, capsys, monkeypatch):
    import time

    import qdm_engine.audit

    def no_model(*_a, **_k):
        raise AssertionError("the model was loaded before the SAE was checked")

    monkeypatch.setattr(qdm_engine.audit, "load_lm", no_model)
    sae = tmp_path / "sae"
    if bad == "no weights":
        sae.mkdir()
        (sae / "cfg.json").write_text("{}")
    args = ["sweep", "--sae", str(sae), "--quiet", "--out", str(tmp_path / "run")]
    if with_model:
        args += ["--model", str(tiny_llama), "--text", str(text_file)]
    t0 = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - t0 < 5.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(sae) in err[0], err
    assert not (tmp_path / "run").exists()
