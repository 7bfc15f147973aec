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
matmul rate measured in the same run), the ratio to it, peak memory inside each pipeline's run, and max |r_naive - r_engine|.
On CUDA the engine also runs with its second stream turned off (`engine-serial`), which measures what
overlapping each batch's encode with the next forward buys. Every pipeline first runs one short warm-up
sweep (Triton autotuning and compilation, cuBLAS handles) that is not timed. Rows are appended to
bench/results/e2e.csv with the device name.

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
import statistics
import sys
import threading
import time
from pathlib import Path

# One autotuning per kernel and key across processes (cached on disk); the chosen config is printed.
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qdm_engine.engine.compression import RTN, parse_bits  # noqa: E402
from qdm_engine.engine.models import decoder_layers, read_out  # noqa: E402
from qdm_engine.engine.perplexity import nll_sum  # noqa: E402
from qdm_engine.engine.runner import auto_batch_size, run_conditions  # noqa: E402
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


class PeakMemory:
    """Peak memory inside a `with` region, in GiB: CUDA's allocator peak on a GPU; on CPU the largest
    resident set size sampled every 10 ms from /proc (the process-lifetime ru_maxrss would carry one
    pipeline's peak into the next one's figure)."""

    def __init__(self, device: str):
        self.cuda, self.peak, self._stop = device.startswith("cuda"), 0.0, threading.Event()

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() / 2 ** 30
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows to a CSV; when they bring new columns, the file is rewritten with the union of the
    headers (older rows get empty cells) through a temporary file, so no row is ever lost."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old_rows, header = [], []
    if path.exists():
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header, old_rows = list(reader.fieldnames or []), list(reader)
    fields = header + [k for k in rows[0] if k not in header]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(old_rows + rows)
    tmp.replace(path)


def encode_config() -> str:
    """The fused encode's autotuned config(s) so far, for the log ('' when none was tuned)."""
    from qdm_engine.kernels import encode_moments as em

    cache = getattr(em._encode_moments_tuned, "cache", None) or {}
    return "".join(f"; encode config {','.join(f'{k}={v}' for k, v in c.kwargs.items())},w{c.num_warps},s{c.num_stages}"
                   for c in cache.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", choices=sorted(p.stem for p in (HERE / "configs").glob("*.json")))
    src.add_argument("--default", action="store_true", help="the embedded default model and SAE")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--bits", default="8..4")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="blocks per forward for the engine (default: the sweep's own choice, auto_batch_size, "
                         "on CUDA; 1,024 tokens' worth on CPU)")
    ap.add_argument("--naive-batch-size", type=int, default=None,
                    help="blocks per forward for the naive pipeline (default: 8,192 tokens' worth on CUDA, as a "
                         "hand-written script would pick; its host float64 copies grow with it; the engine's on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--naive-tokens", type=int, default=None,
                    help="run the naive pipeline on only the first N tokens (default: all): at GPU scale it runs "
                         "for many minutes; its tokens/s is what is compared, and max|dr| is then taken against an "
                         "untimed engine run on the same N tokens")
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
        from qdm_engine.engine.models import faithful_attention

        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model = faithful_attention(model).eval().requires_grad_(False)  # Gemma-2: eager keeps the soft-cap
        hook, block_len, name = spec["sae"]["hook"], spec["block_len"], args.shape
        sae = random_sae(cfg.hidden_size, spec["sae"]["d_sae"], spec["sae"]["architecture"], hook, device)
        n_blocks = args.tokens // block_len
        if n_blocks < 1:
            ap.error(f"--tokens must be at least one block ({block_len} tokens for {args.shape})")
        ids = torch.randint(3, cfg.vocab_size, (n_blocks, block_len))
        ids[:, 0] = cfg.bos_token_id
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[:, 0] = False
        blocks = TokenBlocks(ids, mask, cfg.bos_token_id, ids.numel())
    on_cuda = device.startswith("cuda")
    batch = args.batch_size or (auto_batch_size(model, block_len, device) if on_cuda else max(1, 1024 // block_len))
    naive_batch = args.naive_batch_size or (max(1, 8192 // block_len) if on_cuda else batch)
    tokens = blocks.n_blocks * blocks.block_len
    rate = matmul_rate(device, dtype)
    floor = (1 + len(conditions)) * tokens * forward_flops_per_token(model, block_len) / rate
    param_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30
    cache_gib = blocks.scored_positions * model.config.hidden_size * model.get_input_embeddings().weight.element_size() / 2 ** 30
    print(f"{name}: {tokens} tokens, {len(conditions)} conditions, batch {batch} blocks (naive {naive_batch}), {device} {dtype}; "
          f"matmul {rate / 1e12:.2f} TFLOP/s, forward-FLOP floor {floor:.2f} s; "
          f"model {param_gib:.2f} GiB, FP read-out cache {cache_gib:.2f} GiB")

    def first(n: int) -> TokenBlocks:  # a short warm-up slice
        return TokenBlocks(blocks.ids[:n], blocks.score_mask[:n], blocks.bos_id, n * block_len)

    def r_by_condition(runs) -> dict[str, np.ndarray]:
        return {r.name: r.moments[0].pearson().cpu().numpy() for r in runs[1:]}

    pipelines = {"engine": dict(overlap=True)}
    if on_cuda:
        pipelines["engine-serial"] = dict(overlap=False)
    results = {}
    for pipe, opts in pipelines.items():
        run_conditions(model, [sae], [hook], first(batch), conditions[:1], batch, device, progress=False, **opts)
        sync(device)
        with PeakMemory(device) as mem:
            t = time.perf_counter()
            runs = run_conditions(model, [sae], [hook], blocks, conditions, batch, device, progress=False, **opts)
            sync(device)
            secs = time.perf_counter() - t
        results[pipe] = (secs, mem.peak, r_by_condition(runs), tokens)
        print(f"  {pipe} done in {secs:.2f} s{encode_config()}", flush=True)
    diff = float("nan")  # max |r_naive - r_engine| over features and conditions, on the naive's tokens
    if not args.skip_naive:
        n_naive = min(blocks.n_blocks, -(-(args.naive_tokens or tokens) // block_len))
        naive_blocks = first(n_naive) if n_naive < blocks.n_blocks else blocks
        naive_sweep(model, sae, hook, first(naive_batch), conditions[:1], naive_batch, device)
        sync(device)
        with PeakMemory(device) as mem:
            t = time.perf_counter()
            r_naive = naive_sweep(model, sae, hook, naive_blocks, conditions, naive_batch, device)
            sync(device)
            secs = time.perf_counter() - t
        results["naive"] = (secs, mem.peak, r_naive, n_naive * block_len)
        r_engine = results["engine"][2]
        if naive_blocks is not blocks:
            r_engine = r_by_condition(run_conditions(model, [sae], [hook], naive_blocks, conditions, batch, device,
                                                     progress=False))
        diff = max(float(np.nanmax(np.abs(r_naive[c] - r_engine[c]))) for c in r_naive)

    dev_name = torch.cuda.get_device_name() if on_cuda else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    rows = []
    for pipe, (secs, mem, _, n_tok) in results.items():
        p_floor = floor * n_tok / tokens
        row = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": dev_name,
            "shape": name, "pipeline": pipe, "dtype": str(dtype).removeprefix("torch."), "tokens": n_tok,
            "conditions": len(conditions), "batch_blocks": naive_batch if pipe == "naive" else batch, "sweep_s": round(secs, 3),
            "s_per_condition": round(secs / len(conditions), 3), "tokens_per_s": round(n_tok * len(conditions) / secs, 1),
            "flop_floor_s": round(p_floor, 3), "ratio_to_floor": round(secs / p_floor, 2),
            # throughput ratio (equal to the time ratio when both ran the same tokens)
            "speedup_vs_naive": (round((n_tok / secs) / (results["naive"][3] / results["naive"][0]), 2)
                                 if "naive" in results else None),
            "peak_mem_gib": round(mem, 3), "model_gib": round(param_gib, 3), "fp_cache_gib": round(cache_gib, 3),
            "max_abs_r_diff": diff, "torch": torch.__version__,
        }
        rows.append(row)
        print(f"  {pipe:<13} {n_tok:8d} tok {secs:8.2f} s  {row['s_per_condition']:7.2f} s/cond  {row['tokens_per_s']:10.0f} tok/s  "
              f"{row['ratio_to_floor']:6.2f}x floor  peak {mem:.2f} GiB" +
              (f"  {row['speedup_vs_naive']:.2f}x vs naive" if row["speedup_vs_naive"] else "") +
              (f"  max|dr| {diff:.1e}" if diff == diff else ""))
    if "engine-serial" in results:
        print(f"  overlap gain: engine-serial / engine = {results['engine-serial'][0] / results['engine'][0]:.3f}")
    if not args.no_csv:
        append_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
