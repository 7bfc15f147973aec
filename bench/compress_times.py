"""Compression time of each `--method` on one model: the seconds `apply(model)` takes (the library's own
quantizer, the copy llm-compressor works on, the write-back), FP model restored between methods.

Models: `--default` (the embedded SmolLM2-135M) or `--shape pythia-70m|gemma-2-2b` (random weights from
bench/configs/, the speed does not depend on the values). Calibrated methods get `--calib-tokens` held-out
tokens in blocks of `--block-len` (random ids for a `--shape`). Each method runs `--repeats` times (the
first one also pays imports and, for llm-compressor, its model tracing); the median is reported. Rows are
appended to bench/results/compress.csv with the device name.

    python bench/compress_times.py --default --methods gptq:group=64,awq:group=64,hqq,nf4 --device cpu
    python bench/compress_times.py --shape gemma-2-2b --methods gptq,rtn:bits=4 --device cuda   # GPU
    python bench/compress_times.py --from-run RUN_DIR     # the compress_seconds a sweep recorded
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qdm_engine.engine.compress import CalibrationTokens, ModelState, parse_method  # noqa: E402

HERE = Path(__file__).resolve().parent
CSV = HERE / "results" / "compress.csv"
FIELDS = ["date", "device", "model", "method", "condition", "dtype", "calib_tokens", "repeats", "median_s",
          "first_s", "source", "torch"]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    import os

    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def split_specs(text: str) -> list[str]:
    """'gptq:bits=4,group=64,awq,nf4' -> ['gptq:bits=4,group=64', 'awq', 'nf4'] (a part with '=' and no ':'
    continues the previous spec)."""
    out: list[str] = []
    for part in text.split(","):
        if "=" in part and ":" not in part and out:
            out[-1] += "," + part
        else:
            out.append(part)
    return [s for s in (p.strip() for p in out) if s]


def append(rows: list[dict]) -> None:
    CSV.parent.mkdir(parents=True, exist_ok=True)
    new = not CSV.exists()
    with CSV.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def from_run(run: Path) -> list[dict]:
    import pandas as pd

    cfg = json.loads((run / "config.json").read_text())
    summary = pd.read_csv(run / "summary.csv")
    specs = {c["name"]: c for c in cfg["conditions"]}
    calib = (cfg["tokens"].get("calibration") or {}).get("tokens", 0)
    device = cfg.get("device", "cpu")
    rows = []
    for r in summary.to_dict(orient="records"):
        c = specs.get(str(r["condition"]).split("/")[-1])
        if c is None or "compress_seconds" not in r:
            continue
        rows.append({"date": cfg.get("started"), "device": device_name(device) if device == "cpu" else device,
                     "model": cfg["model"].get("source"), "method": c.get("spec") or c.get("method"),
                     "condition": c["name"], "dtype": cfg.get("dtype"),
                     "calib_tokens": calib if c.get("method") in ("gptq", "awq", "wanda", "sparsegpt") else 0,
                     "repeats": 1, "median_s": round(float(r["compress_seconds"]), 3),
                     "first_s": round(float(r["compress_seconds"]), 3), "source": f"sweep {run.name}",
                     "torch": cfg.get("versions", {}).get("torch")})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--default", action="store_true", help="the embedded default model")
    g.add_argument("--shape", help="a bench/configs/ shape with random weights, e.g. gemma-2-2b")
    g.add_argument("--from-run", type=Path, help="record the compress_seconds of a finished sweep")
    ap.add_argument("--methods", default="rtn:bits=4,hqq,nf4,fp8,gguf:type=Q4_0",
                    help="comma-separated specs, e.g. gptq:bits=4,group=64,awq,nf4")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--block-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()

    if args.from_run:
        rows = from_run(args.from_run)
    else:
        if args.default:
            from qdm_engine.engine import default

            dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
            lm, _tok, _ = default.load_default_model(dtype=dtype, progress=False)
            model_name = default.DEFAULT_MODEL_ID
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            spec = json.loads((HERE / "configs" / f"{args.shape}.json").read_text())
            cfg = AutoConfig.for_model(**spec["model"])
            dtype = getattr(torch, spec["dtype"]["cuda" if args.device.startswith("cuda") else "cpu"])
            lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
            model_name = f"{args.shape} (random weights)"
        lm = lm.to(args.device).eval().requires_grad_(False)
        vocab = lm.get_input_embeddings().weight.shape[0]
        n = max(1, args.calib_tokens // args.block_len)
        ids = torch.randint(3, vocab, (n, args.block_len), generator=torch.Generator().manual_seed(0))
        calib = CalibrationTokens(ids, "random", "random token ids")
        saved = ModelState(lm)
        rows = []
        for spec in split_specs(args.methods):
            cond = parse_method(spec)
            if getattr(cond, "calibration", False):
                cond = dataclasses.replace(cond, calib=calib)
            cond.check(lm)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    cond.apply(lm)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                saved.restore()
            row = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "device": device_name(args.device), "model": model_name, "method": spec, "condition": cond.name,
                   "dtype": str(dtype).removeprefix("torch."),
                   "calib_tokens": calib.n_tokens if getattr(cond, "calibration", False) else 0,
                   "repeats": args.repeats, "median_s": round(statistics.median(times), 3),
                   "first_s": round(times[0], 3), "source": "bench/compress_times.py", "torch": torch.__version__}
            print(f"{cond.name:<18} median {row['median_s']:8.2f} s  first {row['first_s']:8.2f} s", flush=True)
            rows.append(row)
    for r in rows:
        print(f"{r['condition']:<18} {r['median_s']:>9.2f} s  ({r['source']})")
    if not args.no_csv and rows:
        append(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
