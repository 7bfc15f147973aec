"""Scale-out: two gloo processes under torchrun give the same results as one process."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from qdm_engine.analysis.results import list_conditions, load_features


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tiny_llama, tiny_sae, text_file, tmp_path):
    common = ["sweep", "--model", str(tiny_llama), "--sae", str(tiny_sae), "--text", str(text_file),
              "--tokens", "640", "--block-len", "32", "--batch-size", "3", "--bits", "8,4", "--prune", "0.4", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "qdm_engine.cli", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    two = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "qdm_engine.cli", *common,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("results:") == 1  # only rank 0 prints and writes
    s1, s2 = pd.read_csv(tmp_path / "one" / "summary.csv"), pd.read_csv(tmp_path / "two" / "summary.csv")
    assert s1["n_tokens"].tolist() == s2["n_tokens"].tolist() == [20 * 31] * 4
    np.testing.assert_allclose(s2["ppl"], s1["ppl"], rtol=1e-12)
    assert list_conditions(tmp_path / "one") == list_conditions(tmp_path / "two")
    for cond in list_conditions(tmp_path / "one"):
        a, b = load_features(tmp_path / "one", cond), load_features(tmp_path / "two", cond)
        for col in ("r", "fp_rate", "fp_mean", "fp_peak", "c_rate"):
            np.testing.assert_allclose(b[col], a[col], rtol=0, atol=1e-12, err_msg=f"{cond}:{col}")
        assert a["cls"].tolist() == b["cls"].tolist()
    import json
    assert json.loads((tmp_path / "two" / "config.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_two_ranks_killed_mid_condition_resume_with_the_same_results(tiny_llama, tiny_sae, text_file, tmp_path,
                                                                     capsys):
    """Each rank checkpoints its own partial moments (state-rank<r>.pt); `--resume` under torchrun with the
    same world size finishes the run with the uninterrupted two-rank results; one process is refused."""
    from qdm_engine.cli import main

    common = ["sweep", "--model", str(tiny_llama), "--sae", str(tiny_sae), "--text", str(text_file),
              "--tokens", "640", "--block-len", "32", "--batch-size", "3", "--bits", "8,4", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun", "--standalone",
                "--nproc-per-node", "2", "-m", "qdm_engine.cli"]
    ref = subprocess.run([*torchrun, *common, "--out", str(tmp_path / "ref")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    killed = subprocess.run([*torchrun, *common, "--out", str(run), "--checkpoint-every", "1"], capture_output=True,
                            text=True, env={**env, "QDM_TEST_KILL_AT": "int4:2"}, timeout=600)
    assert killed.returncode != 0 and not (run / "summary.csv").exists()
    assert {p.name for p in (run / ".partial").glob("state-rank*.pt")} == {"state-rank0.pt", "state-rank1.pt"}
    assert main(["sweep", "--resume", str(run), "--quiet"]) == 2  # one process, not two
    assert "the number of processes (resume with the same world size) differs" in capsys.readouterr().err
    again = subprocess.run([*torchrun, "sweep", "--resume", str(run), "--quiet"], capture_output=True, text=True,
                           env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    s1, s2 = pd.read_csv(tmp_path / "ref" / "summary.csv"), pd.read_csv(run / "summary.csv")
    np.testing.assert_allclose(s2["ppl"], s1["ppl"], rtol=1e-12)
    for cond in list_conditions(tmp_path / "ref"):
        a, b = load_features(tmp_path / "ref", cond), load_features(run, cond)
        np.testing.assert_allclose(b["r"], a["r"], rtol=0, atol=1e-12, equal_nan=True, err_msg=cond)
    assert not (run / ".partial").exists()
