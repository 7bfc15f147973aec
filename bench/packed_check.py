"""Our GPTQ/AWQ unpacker on real folders vs gptqmodel's own dequantization (bench/gptqmodel_checkpoints.py).

    PYTHONPATH=. python bench/packed_check.py OUT NAME       # OUT as given to gptqmodel_checkpoints.py

For OUT/NAME with OUT/reference-NAME.safetensors (one folder per process, so the peak RSS is its own): load time and peak RSS of `load_packed` (float32),
how many quantized weights equal gptqmodel's float16 dequantization bit for bit once ours (exact in float32)
is rounded to float16, and the largest float32 difference. Appends rows to bench/results/packed_check.csv.
"""

import csv
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from qdm_engine.engine.packed import load_packed
from transformers import AutoModelForCausalLM  # noqa: F401  (imported before the clock starts, as in a sweep)


def main(out: str, names: list[str]):
    rows = []
    for name in names:
        ref = load_file(str(Path(out) / f"reference-{name}.safetensors"))
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        lm = load_packed(str(Path(out) / name), torch.float32)
        secs = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sd = lm.state_dict()
        equal = sum(torch.equal(sd[k].half(), r) for k, r in ref.items())
        worst = max((sd[k] - r.float()).abs().max().item() for k, r in ref.items())
        n_params = sum(p.numel() for p in lm.parameters())
        rows.append({"machine": platform.node(), "folder": name, "params": n_params, "modules": len(ref),
                     "equal_fp16": equal, "max_abs_diff_fp32": worst, "load_s": round(secs, 2),
                     "peak_rss_gib": round(peak / 2 ** 20, 3), "rss_before_gib": round(rss0 / 2 ** 20, 3)})
        print(rows[-1])
        del lm, sd
    dest = Path(__file__).resolve().parent / "results" / "packed_check.csv"
    new = not dest.exists()
    with dest.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
