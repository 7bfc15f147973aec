"""The pytest-benchmark microbenchmarks (bench/test_microbench.py) run end to end on the CPU: tiny shapes,
kernels through the interpreter; every JSON row carries the fields --benchmark-compare needs to be read."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (requirements.txt lists it)")

ROOT = Path(__file__).resolve().parent.parent


def test_microbenchmarks_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/", "--small",
                           "--benchmark-only", f"--benchmark-json={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["benchmarks"]
    names = {r["name"].split("[")[0] for r in rows}
    assert names == {"test_fake_quant", "test_prune_apply", "test_encode_moments"}
    assert len(rows) == 12  # 3 ops x 2 models x (triton, torch)
    for r in rows:
        info = r["extra_info"]
        assert {"device", "shape", "dtype", "copy_GBps", "matmul_TFLOPs", "ratio_to_ceiling"} <= set(info), r["name"]
        assert info["ratio_to_ceiling"] > 0 and r["stats"]["median"] > 0
        assert ("TFLOPs" in info) == r["name"].startswith("test_encode_moments")
