"""Accuracy of each GEMM path of the fused encode (qdm_engine/kernels/encode_moments.py) against float64.

    python bench/gemm_accuracy.py                        # both SAEs, CPU, ~1-2 min
    python bench/gemm_accuracy.py --tokens 512 --csv ''  # quicker, no CSV

The tensor-core paths are emulated on the CPU with the same operand splits the GPU makes: operands are
rounded to tf32 (10 explicit mantissa bits, round to nearest, ties away: PTX cvt.rna.tf32.f32) or bf16
(round to nearest even), each product of two such parts is exact in float32, and the products are summed
in float32 (a float32 matmul of the parts; tensor cores sum in float32 too, in another order). Paths:
    fp32        (x - b_dec) @ W_enc + b_enc in float32: the engine's reference backend
    tf32        one tf32 product of the float32 operands
    tf32x3      a_lo b_hi + a_hi b_lo + a_hi b_hi with tf32 parts (the former default)
    bf16x3      the same with bf16 parts (triton's input_precision="bf16x3")
    bf16split2  bf16 read-out x (W_hi + W_lo) + (b_enc - b_dec @ W_enc in float64): two bf16 products
    bf16split3  the same with W_hi + W_lo + W_lo2 (= W_enc): three bf16 products
For the bf16split paths the fused kernel itself is also run (through the interpreter, at a small token
count) and must agree with the emulation; its row says so.

Each SAE is encoded on the same bf16 read-outs, FP x and a compressed y = x + noise, and compared with
the float64 encoding: the largest error in pre-activations (relative to the pre-activations' RMS), the
features whose firing differs at some token, and |r - r64| of the per-feature Pearson r over the tokens
(r64 from the float64 activations): the engine's own figure of merit, held to 1e-6 in the tests.
SAEs: the bundled SmolLM2-135M SAE (real weights, d 576, F 4608, ReLU) and a random JumpReLU SAE of
Gemma Scope's shape (d 2304, F 2048 of the 16384 features). Read-outs are synthetic (Gaussian around
b_dec with a few large dimensions, as residual streams have), rounded to bf16.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernel rows run on the CPU

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qdm_engine.kernels.moments import FeatureMoments  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CSV = ROOT / "bench" / "results" / "gemm_accuracy.csv"
PATHS = ("fp32", "tf32", "tf32x3", "bf16x3", "bf16split2", "bf16split3")
F32, F64 = torch.float32, torch.float64


def tf32(a: torch.Tensor) -> torch.Tensor:
    """Round float32 to tf32 (10 explicit mantissa bits), to nearest with ties away from zero."""
    bits = a.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(F32)


def bf16(a: torch.Tensor) -> torch.Tensor:
    return a.to(torch.bfloat16).to(F32)


def split(a: torch.Tensor, rnd, parts: int) -> list[torch.Tensor]:
    out, rest = [], a
    for _ in range(parts):
        p = rnd(rest)
        out.append(p)
        rest = rest - p
    return out


def pre_path(path: str, x: torch.Tensor, W: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """Float32 pre-activations [T, F] of bf16-valued read-outs x (held as float32) by one GEMM path."""
    if path.startswith("bf16split"):
        parts = split(W, bf16, int(path[-1]))
        bias = (b_enc.to(F64) - b_dec.to(F64) @ W.to(F64)).to(F32)
        acc = torch.zeros(x.shape[0], W.shape[1], dtype=F32)
        for p in reversed(parts):  # small parts first, as the kernel sums them
            acc += x @ p
        return acc + bias
    a = x - b_dec
    if path == "fp32":
        return a @ W + b_enc
    if path == "tf32":
        return tf32(a) @ tf32(W) + b_enc
    rnd = tf32 if path == "tf32x3" else bf16
    (a_hi, a_lo), (w_hi, w_lo) = split(a, rnd, 2), split(W, rnd, 2)
    a_lo, w_lo = rnd(a_lo), rnd(w_lo)
    return ((a_lo @ w_hi + a_hi @ w_lo) + a_hi @ w_hi) + b_enc


def activate(pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    act = pre.clamp_min(0)
    return act if threshold is None else act * (pre > threshold.to(pre.dtype))


def load_saes(gemma_features: int) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    from safetensors.torch import load_file

    d = ROOT / "qdm_engine" / "data" / "sae" / "smollm2-135m-blocks.14.hook_resid_post-8x"
    st = load_file(str(d / "sae_weights.safetensors"))
    out = [("smollm2-135m (real, ReLU)", st["W_enc"].to(F32), st["b_enc"].to(F32), st["b_dec"].to(F32), None)]
    g = torch.Generator().manual_seed(2)
    dm, f = 2304, gemma_features
    W = torch.randn(dm, f, generator=g) / math.sqrt(dm)
    b_dec = 0.5 * torch.randn(dm, generator=g)
    b_enc = -0.05 * torch.rand(f, generator=g)
    thr = 0.1 + 0.2 * torch.rand(f, generator=g)
    out.append((f"gemma-2-2b-shape (random, JumpReLU, F {f})", W, b_enc, b_dec, thr))
    return out


def readouts(d: int, b_dec: torch.Tensor, tokens: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(d)
    scale[torch.randperm(d, generator=g)[: max(1, d // 100)]] = 20.0  # a few large dimensions
    x = b_dec + torch.randn(tokens, d, generator=g) * scale
    y = x + noise * torch.randn(tokens, d, generator=g) * scale
    return bf16(x), bf16(y)


def measure(name, W, b_enc, b_dec, thr, tokens, noise, kernel_tokens) -> list[dict]:
    x, y = readouts(W.shape[0], b_dec, tokens, noise, seed=7)
    pre64 = lambda v: (v.to(F64) - b_dec.to(F64)) @ W.to(F64) + b_enc.to(F64)  # noqa: E731
    px64, py64 = pre64(x), pre64(y)
    ax64, ay64 = activate(px64, thr), activate(py64, thr)
    r64 = FeatureMoments.from_activations(ax64, ay64).pearson()
    rms = float(px64.pow(2).mean().sqrt())
    rows = []
    for path in PATHS:
        px, py = pre_path(path, x, W, b_enc, b_dec), pre_path(path, y, W, b_enc, b_dec)
        ax, ay = activate(px, thr), activate(py, thr)
        r = FeatureMoments.from_activations(ax, ay).pearson()
        both = ~torch.isnan(r64) & ~torch.isnan(r)
        dr = (r - r64)[both].abs()
        fire_diff = int((((ax > 0) != (ax64 > 0)) | ((ay > 0) != (ay64 > 0))).any(0).sum())
        rows.append(dict(sae=name, path=path, tokens=tokens, noise=noise,
                         max_pre_err_rel=float((px.to(F64) - px64).abs().max()) / rms,
                         features_firing_differently=fire_diff,
                         nan_mismatch=int((torch.isnan(r) != torch.isnan(r64)).sum()),
                         max_abs_dr=float(dr.max()) if dr.numel() else float("nan"),
                         median_abs_dr=float(dr.median()) if dr.numel() else float("nan"),
                         features_scored=int(both.sum()), note="emulated"))
    if kernel_tokens:
        rows += kernel_rows(name, W, b_enc, b_dec, thr, x[:kernel_tokens], y[:kernel_tokens])
    return rows


def kernel_rows(name, W, b_enc, b_dec, thr, x, y) -> list[dict]:
    """The fused kernel (interpreter) on the bf16split paths: moments within 1e-12 of the emulation's?"""
    from qdm_engine.kernels.encode_moments import encode_moments_triton

    rows = []
    for path in ("bf16split2", "bf16split3"):
        m = encode_moments_triton(x.to(torch.bfloat16), y.to(torch.bfloat16), W, b_enc, b_dec, thr, precision=path,
                                  block_t=32, block_f=64, block_d=64)
        emu = FeatureMoments.from_activations(activate(pre_path(path, x, W, b_enc, b_dec), thr),
                                              activate(pre_path(path, y, W, b_enc, b_dec), thr))
        r, r_emu = m.pearson(), emu.pearson()
        ok = ~torch.isnan(r_emu) & ~torch.isnan(r)
        rows.append(dict(sae=name, path=path, tokens=x.shape[0], noise="", max_pre_err_rel="",
                         features_firing_differently=int((m.fires_x != emu.fires_x).sum()),
                         nan_mismatch=int((torch.isnan(r) != torch.isnan(r_emu)).sum()),
                         max_abs_dr=float((r - r_emu)[ok].abs().max()), median_abs_dr="",
                         features_scored=int(ok.sum()), note="fused kernel (interpreter) vs its emulation"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per comparison")
    p.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.3], help="compressed-read-out noise levels")
    p.add_argument("--gemma-features", type=int, default=2048, help="features of the Gemma-shape SAE to encode")
    p.add_argument("--kernel-tokens", type=int, default=96,
                   help="tokens to run the fused kernel on through the interpreter (0: skip)")
    p.add_argument("--csv", default=str(DEFAULT_CSV), help="CSV to write ('' for none)")
    args = p.parse_args(argv)
    if args.tokens < 2:
        p.error("--tokens must be at least 2")
    rows = []
    for name, W, b_enc, b_dec, thr in load_saes(args.gemma_features):
        for i, noise in enumerate(args.noise):
            rows += measure(name, W, b_enc, b_dec, thr, args.tokens, noise, args.kernel_tokens if i == 0 else 0)
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()), flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
