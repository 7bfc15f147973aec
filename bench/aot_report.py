"""Compile report: every Triton kernel of qdm_engine.kernels, compiled ahead of time for a GPU that is not
here, with what ptxas says about it (registers, spills, stack, shared memory, tensor-core MMAs).

    python bench/aot_report.py --target sm_90a --csv bench/results/aot-sm90a.csv
    python bench/aot_report.py --target sm_90a --target sm_80 --kernel encode --all-precisions

No GPU is needed: triton compiles for a named target (`GPUTarget`) from an `ASTSource`, and the `ptxas`
inside the triton wheel allocates registers. See ../shared/docs/GPU-WITHOUT-A-GPU.md for the method.

What is compiled (the "cases"): each kernel at the dtypes and modes the engine launches it with, for
every config its autotuner may pick (the autotuner's own config list, so pruning that list changes the
report). The cases live in CASES below, one builder per kernel module; a kernel module may instead
define `aot_cases()` returning the same dicts. Every `@triton.jit` function of the package that is
launched (named `*_kernel`, or wrapped by `triton.autotune`) and has no case is reported as an error
row, so a new kernel cannot go unreported.

One row per compiled kernel:
    kernel, variant, config, target, regs, spill_stores, spill_loads, stack, smem, mma,
    loop_spills, f64, shfl, warnings, error
  regs / spill_stores / spill_loads / stack   ptxas -v (bytes per thread)
  smem        bytes of shared memory (triton's metadata)
  mma         wgmma.mma_async (sm_90) or mma.sync (sm_80) instructions in the PTX
  loop_spills local-memory loads/stores (LDL/STL in the SASS) inside the innermost loop(s) that hold
              a tensor-core MMA, or inside the innermost loops when the kernel has no MMA
  f64, shfl   float64 and shfl.sync instructions in the PTX (the weight of the epilogue)
  warnings    ptxas warnings (e.g. C7512 "wgmma serialized due to insufficient register resources")
  error       why the case did not compile (empty when it did)

Compiling needs TRITON_INTERPRET unset or 0 in this process; main() sets it to 0 before triton is
imported, so run it as its own process (the CI test does).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COLUMNS = ["kernel", "variant", "config", "target", "regs", "spill_stores", "spill_loads", "stack", "smem",
           "mma", "loop_spills", "f64", "shfl", "warnings", "error"]
TARGETS = {"sm_90a": 90, "sm_90": 90, "sm_80": 80, "sm_86": 86, "sm_89": 89}
# Largest shared memory one block may use (bytes): H100/H200 227 KB, A100 163 KB, sm_86/89 99 KB.
SMEM_LIMIT = {90: 232448, 80: 166912, 86: 101376, 89: 101376}
ENCODE_KERNEL = "_encode_moments_kernel"


# ---------------------------------------------------------------------------------------------
# Cases: what the engine launches


def _config_label(cfg) -> str:
    blocks = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{blocks},w{cfg.num_warps},s{cfg.num_stages}"


# Types of the fused encode's arguments by name; every other non-constexpr argument is an i32 (sizes,
# strides). "x" takes the read-outs' dtype, "w" the weight parts' (float32 W_enc, or its bf16 split).
# Unit strides are specialised to 1, as a launch on contiguous tensors specialises them.
# Integer arguments a launch marks 16-divisible at the engine's shapes (d 512/2304, F 16384/32768, groups
# of 256-token multiples); T and the group count are not.
_ENCODE_DIVISIBLE = ("D", "F", "tokens_per_group", "stride_xf_t", "stride_xc_t", "stride_w_d", "stride_w_f",
                     "stride_self_t", "stride_selc_t", "stride_part_g", "stride_part_s")
_ENCODE_PTRS = {"XF": "x", "XC": "x", "W": "w", "W_LO": "w", "W_LO2": "w", "B_ENC": "*fp32", "B_DEC": "*fp32",
                "THR": "*fp32", "SEL_F": "*i32", "SEL_C": "*i32", "MASK": "*u8", "PART": "*fp64"}


def _encode_cases(mod, all_precisions: bool) -> list[dict]:
    """The fused encode + moments kernel as the runner launches it: bf16 (Gemma) or float32 (Pythia)
    read-outs, the SAE in float32 (engine/sae.py loads every SAE as float32), no mask, each activation
    mode, at the default precision (every precision the launcher offers with --all-precisions)."""
    fn = mod._encode_moments_kernel
    default = getattr(mod, "DEFAULT_PRECISION", "tf32x3")
    split_of = getattr(mod, "SPLIT_PRECISIONS", {})
    resolve = getattr(mod, "resolve_precision", lambda p, *dt: p)
    configs_for = getattr(mod, "configs_for", lambda split: mod._encode_moments_tuned.configs)
    modes = {"relu": mod._MODE_RELU, "jumprelu": mod._MODE_JUMPRELU, "topk": mod._MODE_TOPK}
    import torch

    cases = []
    for x_dtype, torch_dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        dt = getattr(torch, torch_dtype)
        if all_precisions:
            precisions = [p for p in mod.PRECISIONS if p != "auto" and (x_dtype == "bf16" or p not in split_of)]
        else:
            precisions = [resolve(default, dt, dt)]
        for mode_name, mode in modes.items():
            if x_dtype == "fp32" and mode_name != "relu":
                continue  # Pythia's SAE is ReLU; a float32 read-out changes only the loads
            for prec in precisions:
                split = split_of.get(prec, 0)
                w_type = "*bf16" if split else "*fp32"
                sig = {a: {"x": f"*{x_dtype}", "w": w_type}.get(t, t) for a, t in _ENCODE_PTRS.items()}
                base = dict(MODE=mode, HAS_MASK=False, PRECISION="tf32" if split else prec, SPLIT=split,
                            F32_DOT=False, stride_xf_d=1, stride_xc_d=1)
                base["stride_w_d" if split else "stride_w_f"] = 1  # split parts are feature-major
                for cfg in configs_for(split):
                    consts = {a: v for a, v in {**base, **cfg.kwargs}.items() if a in fn.arg_names}
                    sig_k = {a: sig.get(a, "i32") for a in fn.arg_names if a not in consts}
                    cases.append(dict(kernel=fn, variant=f"x={x_dtype},{mode_name},{prec}", signature=sig_k,
                                      constexprs=consts, divisible=_ENCODE_DIVISIBLE, config=cfg))
    return cases


def _fake_quant_cases(mod, all_precisions: bool) -> list[dict]:
    """RTN fake quantization of bf16 (Gemma) and float32 (Pythia) weights, rows of the models' widths:
    one block per row (ONE_BLOCK) as every per-row / group-wise quantization of those shapes is."""
    fn = mod._fake_quant_rows_kernel
    configs = mod._fake_quant_rows_tuned.configs
    cases = []
    for dtype, block_n in (("bf16", 4096), ("fp32", 2048)):
        out_bf16 = dtype == "bf16"
        sig = {"W": f"*{dtype}", "OUT": "*i16" if out_bf16 else "*fp32", "n_rows": "i32", "n_cols": "i32",
               "stride_w": "i32", "stride_o": "i32", "qmax": "fp32"}
        keep = [c for c in configs if c.kwargs["BLOCK_M"] * block_n <= mod._MAX_TILE]  # the autotuner's prune
        for cfg in keep:
            cases.append(dict(kernel=fn, variant=f"w={dtype},N={block_n},symmetric", signature=sig,
                              constexprs=dict(SYMMETRIC=True, BLOCK_N=block_n, ONE_BLOCK=True, OUT_BF16=out_bf16,
                                              **cfg.kwargs),
                              divisible=("W", "OUT", "n_cols", "stride_w", "stride_o"), config=cfg))
    return cases


def _prune_cases(mod, all_precisions: bool) -> list[dict]:
    """The mask apply on the bits of bf16 (int16 view) and float32 (int32 view) weights."""
    fn = mod._apply_mask_kernel
    cases = []
    for bits in ("i16", "i32"):
        sig = {"W": f"*{bits}", "KEEP": "*u8", "OUT": f"*{bits}", "n": "i32"}
        for cfg in mod._apply_mask_tuned.configs:
            cases.append(dict(kernel=fn, variant=f"bits={bits}", signature=sig, constexprs=dict(cfg.kwargs),
                              divisible=("W", "KEEP", "OUT", "n"), config=cfg))
    return cases


CASES = {
    "qdm_engine.kernels.encode_moments": _encode_cases,
    "qdm_engine.kernels.fake_quant": _fake_quant_cases,
    "qdm_engine.kernels.prune": _prune_cases,
}


def discover(all_precisions: bool = False, only: str | None = None) -> tuple[list[dict], list[dict]]:
    """(cases, error rows for launched kernels without a case), over every module of qdm_engine.kernels."""
    import qdm_engine.kernels as pkg
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    cases, rows = [], []
    for info in pkgutil.iter_modules(pkg.__path__):
        name = f"{pkg.__name__}.{info.name}"
        mod = importlib.import_module(name)
        tuned = {id(v.fn) for v in vars(mod).values() if isinstance(v, Autotuner)}
        kernels = [v for v in vars(mod).values()
                   if isinstance(v, JITFunction) and v.__module__ == name
                   and (v.__name__.endswith("_kernel") or id(v) in tuned)]
        if not kernels:
            continue
        builder = CASES.get(name) or getattr(mod, "aot_cases", None)
        found = []
        if builder is not None:
            found = builder(mod, all_precisions) if name in CASES else builder()
        covered = {c["kernel"].__name__ for c in found}
        missing = []
        for k in kernels:
            if k.__name__ not in covered:
                missing.append(dict(kernel=k.__name__, variant=name, config="", target="",
                                    error="no compile case: add one to bench/aot_report.py CASES "
                                          "or an aot_cases() to its module"))
        if only is None or only in name or any(only in k.__name__ for k in kernels):
            cases.extend(c for c in found if only is None or only in name or only in c["kernel"].__name__)
            rows += [m for m in missing if m["variant"] == name]
    return cases, rows


# ---------------------------------------------------------------------------------------------
# Compile and read what ptxas made of it


def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


_PTXAS_RE = {
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "regs": re.compile(r"Used (\d+) registers"),
}
_SASS_INST = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_SASS_BRA = re.compile(r"`\((\.L_x_\d+)\)")


def loop_spills(sass: str) -> tuple[int, int]:
    """(LDL/STL instructions inside the innermost MMA loops, number of such loops) from nvdisasm output.

    A loop is a branch back to a label at or before it. The inner loop of a GEMM is the innermost loop
    that holds a tensor-core MMA (HGMMA on sm_90, HMMA on sm_80); without any MMA loop, every innermost
    loop counts."""
    insts, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = _SASS_LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _SASS_INST.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for lab in pending:
            labels[lab] = addr
        pending = []
        insts.append((addr, m.group(3), m.group(4)))
    loops = []
    for addr, op, rest in insts:
        if op.startswith("BRA"):
            b = _SASS_BRA.search(rest)
            if b and b.group(1) in labels and labels[b.group(1)] <= addr:
                loops.append((labels[b.group(1)], addr))
    is_mma = lambda op: op.startswith(("HGMMA", "HMMA", "WGMMA"))  # noqa: E731
    has_mma = [(lo, hi) for lo, hi in loops if any(lo <= a <= hi and is_mma(op) for a, op, _ in insts)]
    pool = has_mma or loops
    inner = [lp for lp in pool if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in pool)]
    count = sum(1 for a, op, _ in insts if op.startswith(("LDL", "STL")) and any(lo <= a <= hi for lo, hi in inner))
    return count, len(inner)


def compile_case(case: dict, target: str) -> dict:
    """Compile one case for `target`; its report row (error set instead of figures when it fails)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, cfg = case["kernel"], case["config"]
    row = dict(kernel=fn.__name__, variant=case["variant"], config=_config_label(cfg), target=target)
    constexprs = dict(case["constexprs"])
    signature = {}
    for a in fn.arg_names:
        if a in constexprs:
            signature[a] = "constexpr"
        elif a in case["signature"]:
            signature[a] = case["signature"][a]
        else:
            row["error"] = f"case gives no type for argument {a}"
            return row
    divisible = set(case.get("divisible", ())) | {a for a, t in signature.items() if t.startswith("*")}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a in divisible and signature[a] != "constexpr"}
    src = ASTSource(fn, signature, constexprs, attrs)
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", TARGETS[target], 32), options=opts)
    except Exception as exc:  # noqa: BLE001 - any compile failure is this row's result
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        return row
    text = log.getvalue()
    if "Used" not in text:  # served from a cache without ptxas's log: run ptxas ourselves
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(k.asm["ptx"])
            arch = "sm_90a" if TARGETS[target] == 90 else target
            text = subprocess.run([_bin("ptxas"), "-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                                   str(ptx), "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True).stderr
    for key, rx in _PTXAS_RE.items():
        m = rx.search(text)
        row[key] = int(m.group(1)) if m else 0
    row["warnings"] = " | ".join(sorted({ln.split("warning :")[-1].strip() for ln in text.splitlines()
                                         if "warning" in ln.lower()}))
    ptx = k.asm["ptx"]
    row["smem"] = int(k.metadata.shared)
    if row["smem"] > SMEM_LIMIT[TARGETS[target]]:
        row["warnings"] = " | ".join(w for w in (row["warnings"], f"shared memory {row['smem']} B exceeds the "
                                                  f"{SMEM_LIMIT[TARGETS[target]]} B a block may use") if w)
    row["mma"] = len(re.findall(r"\bwgmma\.mma_async\b", ptx)) + len(re.findall(r"\bmma\.sync\b", ptx))
    row["f64"] = len(re.findall(r"^\s*(?:@%p\d+\s+)?\w+(?:\.\w+)*\.f64\b", ptx, flags=re.M))
    row["shfl"] = len(re.findall(r"\bshfl\.sync\b", ptx))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        sass = subprocess.run([_bin("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
    row["loop_spills"], _ = loop_spills(sass)
    row["error"] = ""
    return row


def _worker(args):
    kernel_name, index, all_precisions, only, target = args
    cases = [c for c in discover(all_precisions, only)[0] if c["kernel"].__name__ == kernel_name]
    return compile_case(cases[index], target)


def run_report(targets: list[str], all_precisions: bool = False, only: str | None = None, jobs: int = 1) -> list[dict]:
    """Rows for every case on every target (error rows first: kernels without a case)."""
    cases, rows = discover(all_precisions, only)
    work, seen = [], {}
    for c in cases:
        name = c["kernel"].__name__
        seen[name] = seen.get(name, -1) + 1
        work += [(name, seen[name], all_precisions, only, t) for t in targets]
    if jobs > 1 and len(work) > 1:
        with ProcessPoolExecutor(jobs) as pool:
            return rows + list(pool.map(_worker, work))
    return rows + [_worker(w) for w in work]


def _fmt(rows: list[dict]) -> str:
    show = ["kernel", "variant", "config", "target", "regs", "spill_stores", "spill_loads", "stack", "smem", "mma",
            "loop_spills", "shfl"]
    table = [show] + [[str(r.get(c, "")) for c in show] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(show))]
    out = [" ".join(v.rjust(w) if i >= 4 else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths)))
           for line in table]
    for r in rows:
        if r.get("error"):
            out.append(f"ERROR {r['kernel']} [{r.get('variant', '')}] {r.get('config', '')} {r.get('target', '')}: "
                       f"{r['error']}")
        elif r.get("warnings"):
            out.append(f"ptxas {r['kernel']} [{r['variant']}] {r['config']} {r['target']}: {r['warnings']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", action="append", choices=sorted(TARGETS), help="GPU target (repeatable; default sm_90a)")
    p.add_argument("--csv", type=Path, help="write the rows to this CSV file")
    p.add_argument("--kernel", help="only kernels whose name (or module name) contains this string")
    p.add_argument("--all-precisions", action="store_true", help="every GEMM precision of the fused encode, "
                   "not only the default")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiles in parallel")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    # Compile, do not interpret: set before anything imports triton (only this script's process and its
    # workers; importing this module elsewhere changes nothing).
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("triton was imported with TRITON_INTERPRET set: run this script as its own process")
    os.environ["TRITON_INTERPRET"] = "0"
    rows = run_report(args.target or ["sm_90a"], args.all_precisions, args.kernel, args.jobs)
    print(_fmt(rows), flush=True)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({c: r.get(c, "") for c in COLUMNS})
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
