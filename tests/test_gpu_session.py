"""bench/gpu_session.sh end to end on the CPU (--small: tiny shapes, kernels through the interpreter): every
step runs and reports ok, at most 8 files land in OUT, and the GPU run's step budgets fit 8 minutes."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_session.sh"


def test_gpu_budgets_fit_eight_minutes():
    text = SCRIPT.read_text()
    gpu = text.split("else", 1)[1].split("fi", 1)[0]  # the GPU branch of the settings
    budgets = [int(v) for v in re.findall(r"\bB\d=(\d+)", gpu)]
    device = [int(v) for v in re.findall(r"timeout (\d+) \"\$PY\"", text)]
    assert len(budgets) == 4 and len(device) == 1
    assert sum(budgets) + device[0] <= 480, (budgets, device)


def test_bad_argument_is_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument 'check'" in proc.stderr


@pytest.mark.slow
def test_small_run_end_to_end(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--small"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = {line.split()[0]: line.split()[1] for line in summary.splitlines() if not line.startswith("total")}
    assert steps == {"kernels": "ok", "pythia": "ok", "tests": "ok", "gemma": "ok"}, summary
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"device.txt", "summary.txt", "kernels.csv", "e2e.csv"} <= set(files), files
    kernels = list(csv.DictReader((out / "kernels.csv").open()))
    triton_rows = [r for r in kernels if r["backend"] == "triton"]
    assert {r["model"] for r in triton_rows} == {"pythia-70m-small", "gemma-2-2b-small"}
    checked = [r for r in triton_rows if not r["variant"].startswith("topk")]  # TopK rows are timed only
    assert checked and all("deterministic" in r["note"] and "max|r-r_ref|" in r["note"] for r in checked)
    assert any("bf16split3" in r["variant"] for r in triton_rows)  # 'auto' for the bf16 read-outs
    e2e = list(csv.DictReader((out / "e2e.csv").open()))
    assert {r["shape"] for r in e2e} == {"pythia-70m", "gemma-2-tiny"}
    assert {r["pipeline"] for r in e2e if r["shape"] == "pythia-70m"} >= {"engine", "naive"}
