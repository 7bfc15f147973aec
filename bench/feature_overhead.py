"""What the feature analyses (issue 13) add to a default CPU sweep, op by op, on the default shapes.

Times, in process CPU seconds (less disturbed than wall time on a shared machine), the work a sweep does
only for top-k tracking and the block bootstrap, with random read-outs of the default model's shape
(8,192 tokens in 64 blocks of 128 with BOS, batches of 8 blocks, d = 576, 4,608 features):
  * FP pass: the extra encode of each batch and the running top-k merge;
  * per condition: the activations at the top-k positions, and the moment reduction split into 64 units
    instead of 8 batches (what the split costs over the unsplit reduction);
  * per condition: the bootstrap (1,000 replicates) of r and the taxonomy shares.
Usage: python bench/feature_overhead.py [--conditions 5]
"""

import argparse
import time

import numpy as np
import pandas as pd
import torch

from qdm_engine.analysis.taxonomy import Thresholds
from qdm_engine.analysis.uncertainty import intervals
from qdm_engine.engine.runner import reduce_units
from qdm_engine.engine.sae import SAEWeights
from qdm_engine.engine.topk import Gather, TopK
from qdm_engine.kernels.encode_moments import encode_moments


def cpu(fn, *a):
    t0 = time.process_time()
    out = fn(*a)
    return time.process_time() - t0, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conditions", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    d, f, rows_per_block, blocks, batch = 576, 4608, 127, 64, 8
    sae = SAEWeights(torch.randn(d, f, generator=g) / d ** 0.5, -0.9 - 0.1 * torch.rand(f, generator=g),
                     torch.zeros(d), "standard", "blocks.14.hook_resid_post")
    batches = [torch.randn(batch * rows_per_block, d, generator=g) for _ in range(blocks // batch)]
    comp = [x + 0.05 * torch.randn(x.shape, generator=g) for x in batches]

    tracker, t_fp, row0 = TopK(f, 16, "cpu"), 0.0, 0
    for x in batches:
        t, _ = cpu(tracker.update_from, sae, x, row0)
        t_fp += t
        row0 += x.shape[0]
    entries = tracker.entries()
    gather = Gather(entries, [x.shape[0] for x in batches], sae, 16, pin=False)

    t_gather = t_split = t_whole = 0.0
    out = gather.start("cpu")
    args_enc = (sae.W_enc, sae.b_enc, sae.b_dec, None, None)
    for b, (x, y) in enumerate(zip(batches, comp)):
        t, _ = cpu(gather.add, out, y, b)
        t_gather += t
        t, _ = cpu(lambda: encode_moments(x, y, *args_enc))
        t_whole += t
        cuts = [(lo, lo + rows_per_block, j) for j, lo in enumerate(range(0, x.shape[0], rows_per_block))]
        buf = torch.zeros(len(cuts), 9, f, dtype=torch.float64)
        t, _ = cpu(reduce_units, x, y, sae, cuts, buf)
        t_split += t
        parts = list(buf)
    packed = np.stack([p.numpy() for p in parts] * (blocks // batch))  # 64 units of the right shape
    t_boot, _ = cpu(intervals, packed, np.ones(f, bool), Thresholds())
    c = args.conditions
    per_cond = t_gather + max(0.0, t_split - t_whole) + t_boot
    print(pd.Series({
        "fp pass: extra encode + top-k merge (s)": round(t_fp, 2),
        "per condition: activations at top-k positions (s)": round(t_gather, 2),
        "per condition: moments in 64 units minus in 8 batches (s)": round(t_split - t_whole, 2),
        "per condition: bootstrap, 1000 replicates (s)": round(t_boot, 2),
        f"total added, FP + {c} conditions (CPU s)": round(t_fp + c * per_cond, 2),
        "top-k positions kept": len(entries),
    }).to_string())


if __name__ == "__main__":
    main()
