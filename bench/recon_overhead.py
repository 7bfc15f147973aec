"""Added time of the reconstruction metrics (and of --splice) per condition, on the default sweep.

    python bench/recon_overhead.py --machine "2-core x86-64 VM, no GPU" --out bench/results/recon-default-8k

Runs the default sweep (embedded SmolLM2-135M + its SAE, RTN INT8..INT4, 8,192 tokens) three times in one
process: without the reconstruction metrics, with them (the default), and with --splice; writes
overhead.csv (per condition: seconds of each run and the added seconds) and the --splice run's summary.csv
(every metric next to survival)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--machine", required=True, help="where this runs, recorded with the figures")
    p.add_argument("--out", type=Path, required=True, help="folder for overhead.csv and summary.csv")
    p.add_argument("--bits", default="8..4")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--run-dir", type=Path, help="also keep the run folder of the metrics run (for prune-sae, report)")
    args = p.parse_args(argv)
    from qdm_engine.audit import sweep

    runs = {}
    for label, kw in (("no_metrics", dict(recon=False)), ("metrics", dict(out=args.run_dir)),
                      ("metrics_splice", dict(splice=True))):
        t0 = time.perf_counter()
        res = sweep(bits=args.bits, tokens=args.tokens, progress=False, log=lambda _m: None, **kw)
        runs[label] = res.summary.set_index("condition")
        print(f"{label}: {time.perf_counter() - t0:.1f} s wall", flush=True)
    base = runs["no_metrics"]["seconds"]
    table = pd.DataFrame({f"seconds_{k}": v["seconds"] for k, v in runs.items()})
    table["added_metrics_s"] = table["seconds_metrics"] - base
    table["added_splice_s"] = table["seconds_metrics_splice"] - base
    table["machine"] = args.machine
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "overhead.csv")
    runs["metrics_splice"].to_csv(args.out / "summary.csv")
    from qdm_engine.audit import format_summary

    print(format_summary(runs["metrics"].reset_index()))
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))
    cols = ["bits", "ppl", "dppl_pct", "survived_pct", "explained_variance", "cossim", "mse", "l0", "frac_alive",
            "ce_loss_score", "kl_div_score"]
    print(runs["metrics_splice"][cols].to_string(float_format=lambda v: f"{v:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
