"""End-to-end sweep benchmark: a naive pipeline shaped like the paper's reference code vs the engine.

Both run in one process on the same tokens, model and SAE:
  naive  - per condition: a deep copy of the FP model is quantized; for every batch the FP model and the
           compressed copy are both run with forward hooks, `encode` materialises both [T, F] activation
           matrices, and float64 moment sums are accumulated on the host (numpy).
  engine - qdm_engine.engine.runner.run_conditions: one FP pass with the read-out cached, one pass per
           condition with weights compressed in place and restored, the fused encode + moments op.

Shapes: `--shape pythia-70m|gemma-2-2b` builds a random-weight model from bench/configs/<shape>.json
(speed does not depend on the values) with a random SAE of the configured width; `--default` uses the
embedded default model and its shipped SAE on the bundled text. Reported: sweep seconds, seconds per
condition, audited tokens/s, the forward-FLOP floor (forward FLOPs of FP + every condition over the
matmul rate measured in the same run), the ratio to it, peak memory, and max |r_naive - r_engine|.
Rows are appended to bench/results/e2e.csv with the device name.

    python bench/e2e.py --shape pythia-70m --tokens 200000 --bits 8..4          # GPU
    python bench/e2e.py --shape gemma-2-2b --tokens 500000 --bits 8..4          # GPU
    python bench/e2e.py --default --tokens 4096 --bits 8..4 --device cpu        # CPU row
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qdm_engine.engine.compression import RTN, parse_bits  # noqa: E402
from qdm_engine.engine.models import decoder_layers, read_out  # noqa: E402
from qdm_engine.engine.perplexity import nll_sum  # noqa: E402
from qdm_engine.engine.runner import run_conditions  # noqa: E402
from qdm_engine.engine.sae import SAEWeights  # noqa: E402
from qdm_engine.engine.tokens import TokenBlocks  # noqa: E402

HERE = Path(__file__).resolve().parent
CSV = HERE / "results" / "e2e.csv"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype`, median of 5 (the ceiling the floor is quoted against)."""
    n = 8192 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(7):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def forward_flops_per_token(model, block_len: int) -> float:
    """2 x (decoder-layer matrix + lm_head parameters) + attention scores and mixing (4 x L x ctx/2 x d_attn)."""
    cfg = model.config
    body = sum(p.numel() for p in decoder_layers(model).parameters() if p.dim() == 2)
    head = model.get_output_embeddings().weight.numel()
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    attn = 4 * cfg.num_hidden_layers * (block_len / 2) * d_attn
    return 2.0 * (body + head) + attn


def random_sae(d: int, f: int, arch: str, hook: str, device: str, seed: int = 0) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, f, generator=g) / d ** 0.5
    b_enc = -0.5 * torch.rand(f, generator=g)  # sparse-ish firing on random residuals
    thr = 0.1 * torch.rand(f, generator=g) if arch == "jumprelu" else None
    return SAEWeights(W, b_enc, torch.zeros(d), arch, hook, thr).to(device)


def naive_sweep(model, sae: SAEWeights, hook: str, blocks: TokenBlocks, conditions, batch_size: int, device: str):
    """The reference code's shape: copy + quantize per condition, rerun FP, materialise, float64 on host."""
    rs = {}
    for cond in conditions:
        comp = copy.deepcopy(model)
        cond.apply(comp)
        sums = None
        with torch.no_grad():
            for lo in range(0, blocks.n_blocks, batch_size):
                ids = blocks.ids[lo:lo + batch_size].to(device)
                keep = blocks.score_mask[lo:lo + batch_size].flatten().to(device)
                acts = []
                for m in (model, comp):
                    with read_out(m, hook) as ro:
                        logits = m(input_ids=ids, use_cache=False).logits
                    nll_sum(logits, ids)
                    x = ro.value.reshape(-1, ro.value.shape[-1])[keep]
                    acts.append(sae.encode(x).cpu().numpy().astype(np.float64))
                fx, fy = acts
                part = np.stack([np.full(fx.shape[1], fx.shape[0], dtype=np.float64), fx.sum(0), fy.sum(0),
                                 (fx * fx).sum(0), (fy * fy).sum(0), (fx * fy).sum(0)])
                sums = part if sums is None else sums + part
        n, sx, sy, sxx, syy, sxy = sums
        with np.errstate(invalid="ignore", divide="ignore"):
            rs[cond.name] = (sxy - sx * sy / n) / np.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))
        del comp
    return rs


def peak_memory(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB (Linux)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", choices=["pythia-70m", "gemma-2-2b"])
    src.add_argument("--default", action="store_true", help="the embedded default model and SAE")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--bits", default="8..4")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--csv", type=Path, default=CSV)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()
    device = args.device
    conditions = [RTN(b) for b in parse_bits(args.bits)]
    torch.manual_seed(0)

    if args.default:
        from qdm_engine.engine import default
        from qdm_engine.engine.sae import load_sae
        from qdm_engine.engine.tokens import make_blocks, read_text

        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model, tok, _ = default.load_default_model(dtype=dtype, progress=False)
        model = model.to(device).requires_grad_(False)
        sae = load_sae(default.DEFAULT_SAE_DIR, device=device)
        hook, block_len, name = sae.hook_name, 128, "default-smollm2-135m"
        blocks = make_blocks(tok, read_text(default.DEFAULT_TEXT), block_len, args.tokens, bos=True)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        spec = json.loads((HERE / "configs" / f"{args.shape}.json").read_text())
        dtype = getattr(torch, spec["dtype"]["cuda" if device.startswith("cuda") else "cpu"])
        mcfg = dict(spec["model"])
        cfg = AutoConfig.for_model(mcfg.pop("model_type"), **mcfg)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model = model.eval().requires_grad_(False)
        hook, block_len, name = spec["sae"]["hook"], spec["block_len"], args.shape
        sae = random_sae(cfg.hidden_size, spec["sae"]["d_sae"], spec["sae"]["architecture"], hook, device)
        n_blocks = args.tokens // block_len
        ids = torch.randint(3, cfg.vocab_size, (n_blocks, block_len))
        ids[:, 0] = cfg.bos_token_id
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[:, 0] = False
        blocks = TokenBlocks(ids, mask, cfg.bos_token_id, ids.numel())
    batch = args.batch_size or max(1, (8192 if device.startswith("cuda") else 1024) // block_len)
    tokens = blocks.n_blocks * blocks.block_len
    rate = matmul_rate(device, dtype)
    floor = (1 + len(conditions)) * tokens * forward_flops_per_token(model, block_len) / rate
    print(f"{name}: {tokens} tokens, {len(conditions)} conditions, batch {batch}, {device} {dtype}; "
          f"matmul {rate / 1e12:.2f} TFLOP/s, forward-FLOP floor {floor:.2f} s")

    results = {}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    runs = run_conditions(model, [sae], [hook], blocks, conditions, batch, device, progress=False)
    sync(device)
    results["engine"] = (time.perf_counter() - t, peak_memory(device), {r.name: r.moments[0].pearson().cpu().numpy() for r in runs[1:]})
    if not args.skip_naive:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        r_naive = naive_sweep(model, sae, hook, blocks, conditions, batch, device)
        sync(device)
        results["naive"] = (time.perf_counter() - t, peak_memory(device), r_naive)

    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    rows = []
    for pipe, (secs, mem, rs) in results.items():
        other = results.get("naive" if pipe == "engine" else "engine")
        diff = float("nan")
        if other is not None:
            diff = max(float(np.nanmax(np.abs(rs[c] - other[2][c]))) for c in rs)
        row = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": dev_name,
            "shape": name, "pipeline": pipe, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
            "conditions": len(conditions), "batch_blocks": batch, "sweep_s": round(secs, 3),
            "s_per_condition": round(secs / len(conditions), 3), "tokens_per_s": round(tokens * len(conditions) / secs, 1),
            "flop_floor_s": round(floor, 3), "ratio_to_floor": round(secs / floor, 2),
            "speedup_vs_naive": round(results["naive"][0] / secs, 2) if "naive" in results else None,
            "peak_mem_gib": round(mem, 3), "max_abs_r_diff": diff, "torch": torch.__version__,
        }
        rows.append(row)
        print(f"  {pipe:<7} {secs:8.2f} s  {row['s_per_condition']:7.2f} s/cond  {row['tokens_per_s']:10.0f} tok/s  "
              f"{row['ratio_to_floor']:6.2f}x floor  peak {mem:.2f} GiB" +
              (f"  {row['speedup_vs_naive']:.2f}x vs naive" if row["speedup_vs_naive"] else "") +
              (f"  max|dr| {diff:.1e}" if diff == diff else ""))
    if not args.no_csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        new = not args.csv.exists()
        with args.csv.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
