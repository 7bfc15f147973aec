"""Microbenchmarks: each kernel op against its plain-torch path, at the reference models' shapes.

GPU (real figures; needs CUDA and triton):
    python bench/kernels.py                       # both models, T = 16k, 32k, 64k tokens
    python bench/kernels.py --models gemma --tokens 16384 --csv /some/where.csv
CPU smoke run (references only, tiny shapes; exercises the script, its figures mean nothing):
    python bench/kernels.py --cpu --small
    python bench/kernels.py --cpu --small --interpret --no-csv   # also the Triton rows, via the interpreter

For every op it prints the median time of the Triton kernel and of the torch reference, the achieved
GB/s (fake quant, mask apply) or TFLOP/s (encode + moments, counting both GEMMs), the ceilings measured
in the same run (a large device-to-device copy; large bf16 and tf32 matmuls), the floor those
ceilings imply (the larger of bytes / copy rate and FLOPs / matmul rate: device/METHOD.md's "two
numbers"), and the ratios. Before timing, each Triton result is checked against the reference (bits
for fake quant and masks, max |r - r_ref| for encode). Rows are appended to bench/results/kernels.csv
with the device name and versions.

Shapes (from the public model configs):
  Pythia-70M (GPT-NeoX): d_model 512, d_mlp 2048, 6 layers; query_key_value [1536, 512],
    attention dense [512, 512], dense_h_to_4h [2048, 512], dense_4h_to_h [512, 2048]; float32.
    SAE (pythia-70m-deduped-res-sm): d 512, F 32,768, ReLU.
  Gemma-2-2B: d_model 2304, d_mlp 9216, 26 layers, 8 heads x 256 (q [2048, 2304]), 4 kv heads
    (k, v [1024, 2304]), o [2304, 2048], gate/up [9216, 2304], down [2304, 9216]; bfloat16.
    SAE (Gemma Scope layer 12, width 16k): d 2304, F 16,384, JumpReLU.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if "--interpret" in sys.argv:  # must be set before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"
# One autotuning per kernel and key across processes (the choice is cached on disk), so a rerun uses
# the config the first run chose; the chosen configs are printed and written to the CSV notes.
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qdm_engine.kernels.backend import HAS_TRITON, interpreting  # noqa: E402
from qdm_engine.kernels import encode_moments as _em  # noqa: E402
from qdm_engine.kernels.encode_moments import (  # noqa: E402
    encode_moments_reference,
    encode_moments_triton,
    resolve_precision,
)
from qdm_engine.kernels.fake_quant import fake_quant_reference, fake_quant_triton  # noqa: E402
from qdm_engine.kernels.prune import (  # noqa: E402
    apply_mask_reference,
    apply_mask_triton,
    magnitude_prune_mask_reference,
)

DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "kernels.csv"


@dataclass(frozen=True)
class ModelShapes:
    name: str
    dtype: torch.dtype
    n_layers: int
    weights: dict[str, tuple[int, int]]  # nn.Linear [out, in]
    sae_d: int
    sae_f: int
    jumprelu: bool
    tokens: tuple[int, ...] = field(default=(16384, 32768, 65536))


PYTHIA = ModelShapes(
    "pythia-70m", torch.float32, 6,
    {"attn.query_key_value": (1536, 512), "attn.dense": (512, 512),
     "mlp.dense_h_to_4h": (2048, 512), "mlp.dense_4h_to_h": (512, 2048)},
    sae_d=512, sae_f=32768, jumprelu=False,
)
GEMMA = ModelShapes(
    "gemma-2-2b", torch.bfloat16, 26,
    {"self_attn.q_proj": (2048, 2304), "self_attn.k_proj": (1024, 2304), "self_attn.v_proj": (1024, 2304),
     "self_attn.o_proj": (2304, 2048), "mlp.gate_proj": (9216, 2304), "mlp.up_proj": (9216, 2304),
     "mlp.down_proj": (2304, 9216)},
    sae_d=2304, sae_f=16384, jumprelu=True,
)
MODELS = {"pythia": PYTHIA, "gemma": GEMMA}


def small(m: ModelShapes) -> ModelShapes:
    """Tiny stand-ins for a CPU smoke run: weights /16 per side, SAE width /64, a few hundred tokens."""
    return ModelShapes(
        m.name + "-small", m.dtype, m.n_layers,
        {k: (max(16, o // 16), max(16, i // 16)) for k, (o, i) in m.weights.items()},
        sae_d=max(16, m.sae_d // 16), sae_f=max(64, m.sae_f // 64), jumprelu=m.jumprelu, tokens=(256, 512),
    )


# ----------------------------------------------------------------------------- timing


class Timer:
    """Median wall time of a callable: CUDA events through triton's do_bench on a GPU, else perf_counter."""

    def __init__(self, device: torch.device, reps_cpu: int = 5):
        self.device = device
        self.reps_cpu = reps_cpu

    def __call__(self, fn) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
        fn()  # warm-up
        times = []
        for _ in range(self.reps_cpu):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def rotating(make, bytes_each: int, device: torch.device):
    """Enough input copies that cycling through them does not replay out of L2; returns a picker."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        n = max(1, min(16, math.ceil(4 * l2 / max(bytes_each, 1))))
    else:
        n = 1
    copies = [make(i) for i in range(n)]
    state = {"i": -1}

    def pick():
        state["i"] = (state["i"] + 1) % n
        return copies[state["i"]]

    return pick


# ----------------------------------------------------------------------------- ceilings


def measure_ceilings(timer: Timer, device: torch.device, small_run: bool) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) and matmul rates (TFLOP/s, bf16 and tf32) on this device."""
    out = {}
    nbytes = (64 << 20) if small_run else (2 << 30)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)  # random, never zeros
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    out["copy_GBps"] = 2 * nbytes / (ms * 1e-3) / 1e9
    del src, dst
    n = 512 if small_run else 8192
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, generator=g, dtype=torch.bfloat16)
    ms = timer(lambda: a @ b)
    out["matmul_bf16_TFLOPs"] = 2 * n**3 / (ms * 1e-3) / 1e12
    a, b = a.float(), b.float()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        ms = timer(lambda: a @ b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    out["matmul_tf32_TFLOPs"] = 2 * n**3 / (ms * 1e-3) / 1e12
    return out


# ----------------------------------------------------------------------------- rows


@dataclass
class Row:
    op: str
    model: str
    shape: str
    dtype: str
    variant: str
    backend: str  # "triton" | "torch"
    ms: float
    gbps: float | None = None
    tflops: float | None = None
    ceiling_kind: str = ""
    ceiling: float | None = None
    floor_ms: float | None = None
    speedup: float | None = None  # torch time / this time (triton rows)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        value = self.gbps if self.gbps is not None else self.tflops
        return value / self.ceiling if value is not None and self.ceiling else None


def _csv(v, spec):
    return "" if v is None else format(v, spec)


def print_table(rows: list[Row]) -> None:
    """An aligned text table (the last thing printed, so the end of a remote log shows it)."""
    head = ["op", "model", "shape", "dtype", "variant", "backend", "median ms", "GB/s", "TFLOP/s", "%ceil",
            "floor ms", "gap", "speedup", "note"]
    body = []
    for r in rows:
        gap = r.ms / r.floor_ms if r.floor_ms else None
        ratio = None if r.ratio is None else 100 * r.ratio
        body.append([r.op, r.model, r.shape, r.dtype, r.variant, r.backend, f"{r.ms:.4g}",
                     _csv(r.gbps, ".1f") or "-", _csv(r.tflops, ".3g") or "-", _csv(ratio, ".1f") or "-",
                     _csv(r.floor_ms, ".4g") or "-", _csv(gap, ".2f") or "-", _csv(r.speedup, ".2f") or "-", r.note])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    numeric = set(range(6, 13))
    for line in [head, ["-" * w for w in widths], *body]:
        print("  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w)
                        for i, (c, w) in enumerate(zip(line, widths))).rstrip())


def write_csv(rows: list[Row], path: Path, device_name: str, ceilings: dict[str, float], triton_version: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    cols = ["timestamp", "device", "torch", "triton", "op", "model", "shape", "dtype", "variant", "backend",
            "median_ms", "GBps", "TFLOPs", "ceiling_kind", "ceiling", "ratio_to_ceiling", "floor_ms",
            "speedup_vs_torch", "copy_GBps", "matmul_bf16_TFLOPs", "matmul_tf32_TFLOPs", "note"]
    with open(path, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(cols)
        for r in rows:
            w.writerow([stamp, device_name, torch.__version__, triton_version, r.op, r.model, r.shape, r.dtype,
                        r.variant, r.backend, f"{r.ms:.6g}", _csv(r.gbps, ".6g"), _csv(r.tflops, ".6g"),
                        r.ceiling_kind, _csv(r.ceiling, ".6g"), _csv(r.ratio, ".4g"), _csv(r.floor_ms, ".6g"),
                        _csv(r.speedup, ".4g"), f"{ceilings['copy_GBps']:.6g}",
                        f"{ceilings['matmul_bf16_TFLOPs']:.6g}", f"{ceilings['matmul_tf32_TFLOPs']:.6g}", r.note])


# ----------------------------------------------------------------------------- ops


_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bench_fake_quant(m: ModelShapes, args, timer, device, ceilings, use_triton) -> list[Row]:
    rows = []
    bw = ceilings["copy_GBps"]
    largest = max(m.weights.items(), key=lambda kv: kv[1][0] * kv[1][1])[0]
    for name, (o, i) in m.weights.items():
        variants = [("per-row", dict())]
        if name == largest:
            gs = next(g for g in (128, 64, 32, 16, 8, 4, 2, 1) if i % g == 0)
            variants += [(f"group{gs}", dict(group_size=gs)), ("asym", dict(symmetric=False))]
        elsize = torch.empty((), dtype=m.dtype).element_size()
        nbytes = 2 * o * i * elsize  # read the weight once, write it once
        floor = nbytes / (bw * 1e9) * 1e3
        pick = rotating(lambda s: (torch.randn(o, i, device=device, generator=torch.Generator(device=device)
                                               .manual_seed(s)) * 0.02).to(m.dtype), o * i * elsize, device)
        for vname, kw in variants:
            common = dict(op="fake_quant", model=m.name, shape=f"{name} [{o},{i}]", dtype=_SHORT[m.dtype],
                          variant=f"int{args.bits} {vname}", ceiling_kind="copy GB/s", ceiling=bw, floor_ms=floor)
            t_ref = timer(lambda: fake_quant_reference(pick(), args.bits, **kw))
            rows.append(Row(**common, backend="torch", ms=t_ref, gbps=nbytes / (t_ref * 1e-3) / 1e9))
            if use_triton:
                w = pick()
                out = torch.full_like(w, float("nan"))
                fake_quant_triton(w, args.bits, out=out, **kw)
                exact = torch.equal(out.view(_BITS_VIEW[m.dtype]),
                                    fake_quant_reference(w, args.bits, **kw).view(_BITS_VIEW[m.dtype]))
                t = timer(lambda: fake_quant_triton(pick(), args.bits, out=out, **kw))
                rows.append(Row(**common, backend="triton", ms=t, gbps=nbytes / (t * 1e-3) / 1e9,
                                speedup=t_ref / t, note="bit-exact" if exact else "MISMATCH vs reference"))
    return rows


def bench_prune(m: ModelShapes, args, timer, device, ceilings, use_triton) -> list[Row]:
    rows = []
    bw = ceilings["copy_GBps"]
    for name, (o, i) in m.weights.items():
        elsize = torch.empty((), dtype=m.dtype).element_size()
        nbytes = 2 * o * i * elsize + o * i  # weight in + out, one mask byte per element
        floor = nbytes / (bw * 1e9) * 1e3

        def make(s):
            w = torch.randn(o, i, device=device, generator=torch.Generator(device=device).manual_seed(s)).to(m.dtype)
            return w, magnitude_prune_mask_reference(w, args.sparsity)

        pick = rotating(make, o * i * (elsize + 1), device)
        common = dict(op="prune_apply", model=m.name, shape=f"{name} [{o},{i}]", dtype=_SHORT[m.dtype],
                      variant=f"s={args.sparsity}", ceiling_kind="copy GB/s", ceiling=bw, floor_ms=floor)
        t_ref = timer(lambda: apply_mask_reference(*pick()))
        rows.append(Row(**common, backend="torch", ms=t_ref, gbps=nbytes / (t_ref * 1e-3) / 1e9))
        t_sel = timer(lambda: magnitude_prune_mask_reference(pick()[0], args.sparsity))
        rows.append(Row(op="prune_select", model=m.name, shape=common["shape"], dtype=common["dtype"],
                        variant=common["variant"], backend="torch", ms=t_sel, note="stable argsort (all backends)"))
        if use_triton:
            w, keep = pick()
            out = torch.full_like(w, float("nan"))
            apply_mask_triton(w, keep, out=out)
            exact = torch.equal(out.view(_BITS_VIEW[m.dtype]), apply_mask_reference(w, keep).view(_BITS_VIEW[m.dtype]))
            t = timer(lambda: apply_mask_triton(*pick(), out=out))
            rows.append(Row(**common, backend="triton", ms=t, gbps=nbytes / (t * 1e-3) / 1e9, speedup=t_ref / t,
                            note="bit-exact" if exact else "MISMATCH vs reference"))
    return rows


def _reference_fits(t: int, f: int, device: torch.device) -> tuple[bool, float]:
    """The reference materialises two [T, F] float32 activation matrices, their pre-activations and
    float64 chunk copies: about 6 * T * F * 4 bytes at its peak."""
    need = 6 * t * f * 4
    if device.type != "cuda":
        return True, need / 1e9
    free, _ = torch.cuda.mem_get_info(device)
    return need < 0.7 * free, need / 1e9


def dr_tolerance(precision: str, tol: float) -> float:
    """Largest max |r - r_ref| accepted against the float32 reference: `tol` for the float32-accurate paths,
    100x for one tf32 product, 10x for the ~16-bit paths (bf16split2, bf16x3); bench/gemm_accuracy.py
    has their errors against float64."""
    return tol * (100 if precision == "tf32" else 10 if precision in ("bf16split2", "bf16x3") else 1)


def chosen_configs() -> str:
    """The encode kernel's autotuned choices so far ('' when nothing was autotuned)."""
    cache = getattr(_em._encode_moments_tuned, "cache", None) or {}
    if not cache:
        return ""
    cfg = list(cache.values())[-1]
    kw = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"; config {kw},w{cfg.num_warps},s{cfg.num_stages}"


def compiled_encode_kernels() -> list[str]:
    """One line per compiled variant of the fused encode in this process: its block sizes, path, warps,
    stages and what the driver reports (registers, spills per thread, shared memory)."""
    lines = []
    fn = _em._encode_moments_kernel
    for dev, cache in getattr(fn, "device_caches", {}).items():
        for k in (cache[0] if isinstance(cache, tuple) else {}).values():
            try:
                consts = {fn.arg_names[key[0]]: v for key, v in getattr(k.src, "constants", {}).items()
                          if isinstance(key, tuple) and key and isinstance(key[0], int)}
                shown = ",".join(f"{n}={consts[n]}" for n in ("BLOCK_T", "BLOCK_F", "BLOCK_D", "SPLIT", "PRECISION",
                                                                "MODE") if n in consts)
                lines.append(f"compiled encode [{shown}] warps={k.metadata.num_warps} stages={k.metadata.num_stages} "
                             f"n_regs={k.n_regs} n_spills={k.n_spills} smem={k.metadata.shared}")
            except Exception as exc:  # noqa: BLE001 - a report line, never a failure
                lines.append(f"compiled encode: (unreadable: {exc})")
    return lines


def bench_encode(m: ModelShapes, args, timer, device, ceilings, use_triton) -> list[Row]:
    rows = []
    d, f = m.sae_d, m.sae_f
    g = torch.Generator(device=device).manual_seed(1)
    W = torch.randn(d, f, device=device, generator=g) / math.sqrt(d)
    b_enc = -0.5 + 0.1 * torch.randn(f, device=device, generator=g)
    b_dec = 0.1 * torch.randn(d, device=device, generator=g)
    thr = 0.2 * torch.rand(f, device=device, generator=g) if m.jumprelu else None
    act = "jumprelu" if m.jumprelu else "relu"
    tokens = m.tokens if args.tokens is None else args.tokens
    for t in tokens:
        x_fp = torch.randn(t, d, device=device, generator=g).to(m.dtype)
        x_c = (x_fp.float() + 0.1 * torch.randn(t, d, device=device, generator=g)).to(m.dtype)
        mask = None  # as the runner calls it: scored rows are selected before the encode
        flops = 2 * 2 * t * d * f  # two GEMMs
        nbytes = 2 * t * d * x_fp.element_size() + d * f * 4  # both read-outs, W once
        gpu = device.type == "cuda"  # a CPU's bf16 matmul is its slow path: compare with float32 there
        common = dict(op="encode_moments", model=m.name, shape=f"T={t} d={d} F={f}", dtype=_SHORT[m.dtype],
                      ceiling_kind="bf16 matmul TFLOP/s" if gpu else "fp32 matmul TFLOP/s",
                      ceiling=ceilings["matmul_bf16_TFLOPs" if gpu else "matmul_tf32_TFLOPs"])
        fits, need_gb = _reference_fits(t, f, device)
        r_ref = None
        t_ref = None
        if fits:
            ref = encode_moments_reference(x_fp, x_c, W, b_enc, b_dec, thr, None, mask)
            r_ref = ref.pearson()
            t_ref = timer(lambda: encode_moments_reference(x_fp, x_c, W, b_enc, b_dec, thr, None, mask))
            rows.append(Row(**common, variant=act, backend="torch", ms=t_ref, tflops=flops / (t_ref * 1e-3) / 1e12,
                            note="fp32 matmul, [T,F] materialised"))
        else:
            rows.append(Row(**common, variant=act, backend="torch", ms=float("nan"),
                            note=f"skipped: needs ~{need_gb:.0f} GB"))
        if not use_triton:
            continue
        done = set()
        for asked in args.precisions:
            try:
                precision = resolve_precision(asked, m.dtype)
            except ValueError:  # a bf16 split path for float32 read-outs: not a path the engine takes
                continue
            if precision in done:
                continue
            done.add(precision)
            if precision.startswith("bf16split"):
                rate, rate_note = ceilings["matmul_bf16_TFLOPs"] / int(precision[-1]), f"bf16/{precision[-1]}"
            else:
                rate = ceilings["matmul_tf32_TFLOPs"] / (3 if precision in ("tf32x3", "bf16x3") else 1)
                rate_note = "tf32/3" if precision in ("tf32x3", "bf16x3") else "tf32"
            floor = None if precision == "ieee" else max(flops / (rate * 1e12), nbytes / (ceilings["copy_GBps"] * 1e9)) * 1e3
            res = encode_moments_triton(x_fp, x_c, W, b_enc, b_dec, thr, None, mask, precision=precision)
            note = f"floor: {rate_note} rate"
            if r_ref is not None:
                r = res.pearson()
                both = ~torch.isnan(r) & ~torch.isnan(r_ref)
                same_nan = bool(torch.equal(torch.isnan(r), torch.isnan(r_ref)))
                err = float((r[both] - r_ref[both]).abs().max()) if both.any() else 0.0
                tol = dr_tolerance(precision, args.dr_tol)
                note += f"; max|r-r_ref| {err:.1e}{'' if err <= tol else f' EXCEEDS TOLERANCE {tol:.0e}'}"
                note += "" if same_nan else " NaN PATTERN DIFFERS"
            again = encode_moments_triton(x_fp, x_c, W, b_enc, b_dec, thr, None, mask, precision=precision)
            note += "; deterministic" if torch.equal(res.pack(), again.pack()) else "; NOT DETERMINISTIC"
            tt = timer(lambda: encode_moments_triton(x_fp, x_c, W, b_enc, b_dec, thr, None, mask, precision=precision))
            note += chosen_configs()
            label = precision if asked == precision else f"{asked}={precision}"
            rows.append(Row(**common, variant=f"{act} {label}", backend="triton", ms=tt,
                            tflops=flops / (tt * 1e-3) / 1e12, floor_ms=floor,
                            speedup=None if t_ref is None else t_ref / tt, note=note))
        if t == tokens[0] and args.topk:  # the TopK path (selection GEMM + bitmask) at the smallest T
            k = 32 if f >= 1024 else 8
            ttk = timer(lambda: encode_moments_triton(x_fp, x_c, W, b_enc, b_dec, None, k, mask))
            rows.append(Row(**common, variant=f"topk{k} {resolve_precision('auto', m.dtype)}", backend="triton", ms=ttk,
                            tflops=flops / (ttk * 1e-3) / 1e12, note="incl. torch selection GEMM + topk"))
        del x_fp, x_c
    return rows


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run the torch references on CPU (no Triton timing)")
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke run)")
    p.add_argument("--interpret", action="store_true",
                   help="with --cpu: also run the Triton kernels through the interpreter (checks the script only)")
    p.add_argument("--models", default="pythia,gemma", help="comma list of: " + ",".join(MODELS))
    p.add_argument("--ops", default="fake_quant,prune,encode", help="comma list of: fake_quant,prune,encode")
    p.add_argument("--tokens", default=None, help="comma list of token counts for encode (default per model)")
    p.add_argument("--precisions", default="auto,tf32x3",
                   help="encode GEMM precisions to time ('auto' is what the engine uses for the model's dtype)")
    p.add_argument("--dr-tol", type=float, default=1e-4,
                   help="fail when an encode path's max |r - r_ref| exceeds this (x100 for tf32, x10 for the "
                        "16-bit paths)")
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--sparsity", type=float, default=0.175)
    p.add_argument("--no-topk", dest="topk", action="store_false", help="skip the TopK encode row")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for --cpu (default 1: on a shared machine more threads wait on each other)")
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="CSV to append rows to")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    args.tokens = None if args.tokens is None else tuple(int(x) for x in args.tokens.split(","))
    args.precisions = tuple(x for x in args.precisions.split(",") if x)
    unknown = [x for x in args.precisions if x not in _em.PRECISIONS]
    if unknown:
        p.error(f"--precisions: unknown {unknown}; choose from {','.join(_em.PRECISIONS)}")

    if args.cpu:
        torch.set_num_threads(max(1, args.threads))
        device = torch.device("cpu")
        device_name = f"cpu {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
        use_triton = args.interpret and HAS_TRITON
        if args.interpret:
            device_name += " triton-interpreter"
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run on a GPU, or pass --cpu --small for a smoke run of the references")
        if not HAS_TRITON or interpreting():
            p.error("Triton must be installed and TRITON_INTERPRET unset for GPU figures")
        device = torch.device("cuda")
        device_name = torch.cuda.get_device_name(device)
        use_triton = True
    models = [MODELS[name.strip()] for name in args.models.split(",") if name.strip()]
    if args.small:
        models = [small(mm) for mm in models]
    ops = {o.strip() for o in args.ops.split(",")}
    timer = Timer(device)

    triton_version = __import__("triton").__version__ if use_triton else ""
    print(f"device: {device_name}; torch {torch.__version__}; triton {triton_version or '(not used)'}")
    ceilings = measure_ceilings(timer, device, args.small)
    print("ceilings: copy {copy_GBps:.4g} GB/s (read+write), bf16 matmul {matmul_bf16_TFLOPs:.3g} TFLOP/s, "
          "tf32 matmul {matmul_tf32_TFLOPs:.3g} TFLOP/s".format(**ceilings))
    if device.type == "cpu":
        print("CPU run: " + ("Triton through the interpreter, " if use_triton else "torch references only; ")
              + "the kernels need a GPU for real figures")
    rows: list[Row] = []
    for mm in models:
        done = len(rows)
        if "fake_quant" in ops:
            rows += bench_fake_quant(mm, args, timer, device, ceilings, use_triton)
        if "prune" in ops:
            rows += bench_prune(mm, args, timer, device, ceilings, use_triton)
        if "encode" in ops:
            rows += bench_encode(mm, args, timer, device, ceilings, use_triton)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not args.no_csv:  # each model's rows as soon as they exist: a run cut short keeps them
            write_csv(rows[done:], args.csv, device_name, ceilings, triton_version)
        print_table(rows[done:])
        sys.stdout.flush()
    if use_triton and device.type == "cuda":
        for line in compiled_encode_kernels():
            print(line)
    print()
    print_table(rows)
    if not args.no_csv:
        print(f"\nappended {len(rows)} rows to {args.csv}")
    bad = [r for r in rows if any(w in r.note for w in ("MISMATCH", "DIFFERS", "NOT DETERMINISTIC", "EXCEEDS"))]
    for r in bad:
        print(f"FAILED: {r.op} {r.model} {r.shape} {r.variant}: {r.note}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
