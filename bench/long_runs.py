"""Long-run costs of a sweep: peak resident memory against the token budget with the FP read-out cache on disk
(and in memory, for contrast), and the time spent checkpointing at the default interval.

Each point is one `qdm-engine sweep` of the default model in a fresh process (`--no-ppl --bits 8`: the FP pass
and one condition), its peak RSS read with wait4 (the child's own maximum, not the parent's), its checkpoint
time from config.json (`checkpoints.seconds`: the device reads, cache sync and atomic writes of every
checkpoint, against `wall_seconds`). Rows are appended to bench/results/long_runs.csv.

    python bench/long_runs.py --tokens 8192,65536,262144 --cache disk
    python bench/long_runs.py --tokens 65536 --cache memory
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent


def one(tokens: int, cache: str, every: str, work: Path) -> dict:
    out = work / f"run-{tokens}-{cache}-{every}"
    cmd = [sys.executable, "-m", "qdm_engine.cli", "sweep", "--no-ppl", "--bits", "8", "--tokens", str(tokens),
           "--cache", cache, "--checkpoint-every", every, "--quiet", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if status != 0:
        raise SystemExit(f"sweep failed ({status}): {stderr[-2000:]}")
    config = json.loads((out / "config.json").read_text())
    cache_line = next((ln for ln in stdout.splitlines() if ln.startswith("FP read-out cache")), "")
    shutil.rmtree(out, ignore_errors=True)
    ck = config.get("checkpoints") or {}
    return {
        "machine": platform.node(), "cpu_count": os.cpu_count(), "tokens": tokens, "cache": cache,
        "cache_place": config.get("fp_cache_place"), "cache_line": cache_line, "checkpoint_every": every,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 1),
        "sweep_wall_s": config["wall_seconds"], "checkpoints": ck.get("saves"), "checkpoint_s": ck.get("seconds"),
        "checkpoint_pct": round(100 * ck.get("seconds", 0) / config["wall_seconds"], 3),
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8192,65536,262144", help="token budgets, comma-separated")
    ap.add_argument("--cache", default="disk", choices=["disk", "memory", "auto"])
    ap.add_argument("--checkpoint-every", default="auto", help="as the sweep flag (default: the sweep's default)")
    ap.add_argument("--csv", default=str(HERE / "results" / "long_runs.csv"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qdm-long-") as work:
        for tokens in [int(t) for t in args.tokens.split(",")]:
            row = one(tokens, args.cache, args.checkpoint_every, Path(work))
            rows.append(row)
            print(f"{tokens:>8} tokens  cache {row['cache_place']:<5} peak RSS {row['peak_rss_mib']:>8.1f} MiB  "
                  f"wall {row['sweep_wall_s']:>7.1f} s  checkpoints {row['checkpoints']} in {row['checkpoint_s']} s "
                  f"({row['checkpoint_pct']:.3f}%)", flush=True)
            path = Path(args.csv)
            new = not path.exists()
            with path.open("a", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)


if __name__ == "__main__":
    main()
