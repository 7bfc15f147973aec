"""Interrupted sweeps: kill -9 at several points, SIGINT, then `sweep --resume` gives the uninterrupted results.

The kills are real (a subprocess that SIGKILLs itself at a chosen point through the test-only hook
QDM_TEST_KILL_AT, engine/state.py); the reference is the same sweep run once without interruption.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from qdm_testing import build_sae
from qdm_engine.analysis.results import list_conditions, load_features
from qdm_engine.cli import main

TIMING = ["seconds", "compress_seconds"]


def args_for(model, sae, text, out, *extra):
    return ["sweep", "--model", str(model), "--sae", str(sae), "--text", str(text), "--tokens", "512",
            "--block-len", "32", "--batch-size", "4", "--bits", "8,4", "--quiet", "--out", str(out), *extra]


def cli(args, env_extra=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "qdm_engine.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600, **kw)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs (the reference, the resumes) use the subprocesses' single thread: a matmul's float32
    rounding may depend on how many threads split it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tiny_llama, tiny_sae, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(args_for(tiny_llama, tiny_sae, text_file, out)) == 0
    return out


def assert_same_results(run, ref):
    """Per-feature r (and every FP statistic) within 1e-12 of the uninterrupted run, the same summary
    (all but wall-clock columns), the same top-k table."""
    assert list_conditions(run) == list_conditions(ref)
    for cond in list_conditions(ref):
        a, b = load_features(ref, cond), load_features(run, cond)
        for col in ("r", "r_lo", "r_hi", "fp_rate", "fp_mean", "fp_peak", "c_rate"):
            np.testing.assert_allclose(b[col], a[col], rtol=0, atol=1e-12, equal_nan=True, err_msg=f"{cond}:{col}")
        assert a["cls"].tolist() == b["cls"].tolist()
    sa, sb = pd.read_csv(ref / "summary.csv"), pd.read_csv(run / "summary.csv")
    pd.testing.assert_frame_equal(sb.drop(columns=TIMING), sa.drop(columns=TIMING), check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(pd.read_parquet(run / "topk.parquet"), pd.read_parquet(ref / "topk.parquet"))
    assert not (run / ".partial").exists()


# 4 batches per pass (16 blocks of 32, 4 per batch); passes fp, int8, int4
@pytest.mark.parametrize("point,cache", [("fp:2", "disk"), ("int8:end", "memory"), ("int4:3", "memory")])
def test_kill_9_then_resume_gives_the_uninterrupted_results(point, cache, reference, tiny_llama, tiny_sae, text_file,
                                                            tmp_path, capsys):
    out = tmp_path / "run"
    proc = cli(args_for(tiny_llama, tiny_sae, text_file, out, "--checkpoint-every", "1", "--cache", cache),
               {"QDM_TEST_KILL_AT": point})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / ".partial" / "state-rank0.pt").is_file() and not (out / "summary.csv").exists()
    assert [p.name for p in out.iterdir()] == [".partial"]  # nothing that looks like results
    if cache == "disk":
        assert sorted(p.name for p in (out / ".partial").glob("fp-cache-*")) == ["fp-cache-rank0-site0.bin"]
    capsys.readouterr()
    assert main(["sweep", "--resume", str(out), "--quiet"]) == 0  # in process: the kill was the subprocess's
    stdout = capsys.readouterr().out
    done = {"fp:2": "0 of 2 conditions and 2 FP batches", "int8:end": "1 of 2 conditions and all FP batches",
            "int4:3": "1 of 2 conditions and all FP batches"}[point]
    assert f"resuming {out}: {done} were checkpointed" in stdout
    assert_same_results(out, reference)
    config = json.loads((out / "config.json").read_text())
    assert config["resumed"] is True and config["fp_cache"] == cache


@pytest.mark.parametrize("sig,code", [("INT", 130), ("TERM", 143)])
def test_sigint_stops_cleanly_with_the_resume_command(sig, code, reference, tiny_llama, tiny_sae, text_file, tmp_path,
                                                      capsys):
    out = tmp_path / "run"
    proc = cli(args_for(tiny_llama, tiny_sae, text_file, out, "--checkpoint-every", "100"),
               {"QDM_TEST_KILL_AT": f"int8:1={sig}"})  # the signal to itself after int8's first batch
    assert proc.returncode == code, proc.stderr[-2000:]
    assert f"SIG{sig}: stopping after the current batch" in proc.stdout
    assert f"qdm-engine sweep --resume {out}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "summary.csv").exists()
    import torch

    state = torch.load(out / ".partial" / "state-rank0.pt", weights_only=True)  # usable: plain tensors
    assert state["fp"]["finished"] and state["current"]["name"] == "int8"
    assert state["current"]["done"] == 2  # the batch running when the signal came was finished and saved
    assert main(["sweep", "--resume", str(out), "--quiet"]) == 0
    assert_same_results(out, reference)
    capsys.readouterr()
    assert main(["sweep", "--resume", str(out), "--quiet"]) == 0
    assert "is complete" in capsys.readouterr().out


@pytest.fixture()
def interrupted(tiny_llama, text_file, tmp_path):
    """A run killed after its first condition, with its own SAE and text (the tests change them)."""
    sae, text = build_sae(tmp_path / "sae"), tmp_path / "text.txt"
    shutil.copy(text_file, text)
    out = tmp_path / "run"
    proc = cli(args_for(tiny_llama, sae, text, out), {"QDM_TEST_KILL_AT": "int8:end"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    return out, sae, text


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_resume_refuses_a_changed_sae_or_text(interrupted, capsys):
    out, sae, text = interrupted
    build_sae(sae, seed=1)  # other weights at the same path
    assert main(["sweep", "--resume", str(out), "--quiet"]) == 2
    assert re.search(r"cannot resume .*: the SAE differs from the run's \(saved \[0\]\.weights_sample_sha256 ",
                     one_error_line(capsys))
    build_sae(sae, seed=0)  # back as it was: the text is checked next
    text.write_text(text.read_text().replace(" the ", " a "))
    assert main(["sweep", "--resume", str(out), "--quiet"]) == 2
    assert re.search(r"cannot resume .*: the tokens \(the audit text changed\) differ", one_error_line(capsys))
    assert (out / ".partial" / "state-rank0.pt").is_file() and not (out / "summary.csv").exists()


def test_resume_takes_no_other_arguments_and_a_new_sweep_will_not_overwrite(interrupted, tiny_llama, capsys):
    out, sae, text = interrupted
    assert main(["sweep", "--resume", str(out), "--bits", "6"]) == 2
    assert "--resume takes no other arguments" in one_error_line(capsys)
    assert main(args_for(tiny_llama, sae, text, out)) == 2
    assert "holds an unfinished sweep; finish it with qdm-engine sweep --resume" in one_error_line(capsys)
    assert main(["sweep", "--resume", str(out.parent / "nothing")]) == 2
    assert "is not an unfinished sweep" in one_error_line(capsys)


def test_stdin_gives_the_text_file_results(reference, tiny_llama, tiny_sae, text_file, tmp_path):
    out = tmp_path / "run"
    with open(text_file, "rb") as fh:
        proc = cli(args_for(tiny_llama, tiny_sae, "-", out), stdin=fh)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_results(out, reference)
    a, b = (json.loads((p / "config.json").read_text())["tokens"] for p in (reference, out))
    assert a["ids_sha256"] == b["ids_sha256"] and b["text"] == "-"
