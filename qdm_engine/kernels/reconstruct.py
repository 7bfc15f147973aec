"""SAE encode + decode fused with the per-token reconstruction sums (the reconstruction metrics, METHOD.md
section 4b), never holding the [T, F] activations.

For read-outs x [T, d] (and x_in, the SAE's input: x itself, or x normalised per token by the caller),
per token t:
    acts   = encode(x_in)                         (as kernels/encode_moments.py: ReLU, JumpReLU, TopK)
    x_hat  = (acts @ W_dec + b_out) * scale[t] + shift[t]     (scale 1, shift 0 without normalisation)
    err2   = ||x - x_hat||^2,  xh2 = ||x_hat||^2,  xdot = x . x_hat,  x2 = ||x||^2
    l0     = #{f: acts[t, f] > 0},  l1 = sum_f acts[t, f]
and per feature whether it fired at any token. Every metric of engine/recon.py is a sum over tokens of
these six numbers (or of a function of them: cosine, norm ratio), so this op returns them per token
([T, 6] float64, T x 6 numbers instead of T x F) and the caller reduces them.

Backends: `reconstruct_stats_reference` (torch: materialises [T, F] activations, for the CPU and as the
oracle) and `reconstruct_stats_triton` (one fused kernel), chosen by `reconstruct_stats`.

The fused kernel
----------------
Program (i, j) owns BLOCK_T tokens and BLOCK_O output columns of x_hat. It walks the features BLOCK_F
at a time: for each feature tile the K loop over d computes the pre-activations [BLOCK_T, BLOCK_F]
(tl.dot, float32 accumulation), the epilogue applies the activation (TopK: the selection bitmask made in
torch as for the fused encode), adds the tile's l0 / l1 and fired flags, and a second tl.dot adds
acts @ W_dec[tile, columns] into the program's x_hat accumulator [BLOCK_T, BLOCK_O]. The activations live
only in registers / shared memory, one tile at a time. After the last feature tile the program adds
b_out (and undoes the normalisation), reads x at its columns and reduces err2, xh2, xdot and x2 over its
columns in float64 into its own slot [j, t, :] of a [ceil(d / BLOCK_O), T, 6] buffer; the slots of the
column tiles are summed in torch (no atomics on the sums: deterministic). The fired flags are combined
with atomic max on an int32 [F] buffer (order-independent, so also deterministic).
The cost: with BLOCK_O < d the encode GEMM is recomputed once per column tile (ceil(d / BLOCK_O) times);
BLOCK_O = the next power of two >= d avoids it at the price of a [BLOCK_T, BLOCK_O] float32 accumulator
(bench/aot_report.py reports the registers and spills of each config).
"""

from __future__ import annotations

import torch

from qdm_engine.kernels.backend import check_launchable, interpreting, tl, triton, use_triton
from qdm_engine.kernels.encode_moments import _MODE_JUMPRELU, _MODE_RELU, _MODE_TOPK, _topk_bitmask, sae_encode_reference

N_TOKEN_STATS = 6  # err2, xh2, xdot, x2, l0, l1
STATS = ("err2", "xh2", "xdot", "x2", "l0", "l1")
RECON_PRECISIONS = ("tf32x3", "ieee", "tf32")
DEFAULT_RECON_PRECISION = "tf32x3"


def _check(xin, x, W_enc, b_enc, b_dec, W_dec, b_out, scale, shift) -> None:
    if xin.dim() != 2 or x.shape != xin.shape:
        raise ValueError(f"x_in and x must both be [T, d], got {tuple(xin.shape)} and {tuple(x.shape)}")
    d, f = W_enc.shape
    if xin.shape[1] != d:
        raise ValueError(f"read-out width {xin.shape[1]} does not match W_enc {tuple(W_enc.shape)}")
    if tuple(W_dec.shape) != (f, d) or b_out.shape != (d,) or b_enc.shape != (f,) or b_dec.shape != (d,):
        raise ValueError("W_dec must be [F, d], b_out and b_dec [d], b_enc [F]")
    if (scale is None) != (shift is None):
        raise ValueError("give scale and shift together, or neither")
    if scale is not None and (scale.shape != (x.shape[0],) or shift.shape != (x.shape[0],)):
        raise ValueError("scale and shift must be [T]")


def reconstruct_stats_reference(
    xin: torch.Tensor, x: torch.Tensor, W_enc, b_enc, b_dec, threshold, k, W_dec, b_out,
    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, **_triton_only,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token stats [T, 6] float64 in STATS order, fired [F] bool) in torch."""
    _check(xin, x, W_enc, b_enc, b_dec, W_dec, b_out, scale, shift)
    acts = sae_encode_reference(xin, W_enc, b_enc, b_dec, threshold, k)
    xh = acts @ W_dec.to(torch.float32) + b_out.to(torch.float32)
    if scale is not None:
        xh = xh * scale.to(torch.float32)[:, None] + shift.to(torch.float32)[:, None]
    x64, xh64 = x.to(torch.float64), xh.to(torch.float64)
    e = x64 - xh64
    out = torch.stack([(e * e).sum(1), (xh64 * xh64).sum(1), (x64 * xh64).sum(1), (x64 * x64).sum(1),
                       (acts > 0).sum(1).to(torch.float64), acts.to(torch.float64).sum(1)], dim=1)
    return out, (acts > 0).any(0)


@triton.jit
def _reconstruct_kernel(
    XIN, X, SCALE, SHIFT, W_ENC, B_ENC, B_DEC, THR, SEL, W_DEC, B_OUT, TOK, FIRED,
    T, D, F,
    stride_xin_t, stride_x_t, stride_we_d, stride_wd_f, stride_sel_t, stride_tok_o,
    MODE: tl.constexpr,
    HAS_NORM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    rows = offs_t.to(tl.int64)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < D
    first = pid_o == 0  # the column tile that records the fired flags

    xh = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
    l0 = tl.zeros([BLOCK_T], dtype=tl.float32)  # counts up to F, exact in float32
    l1 = tl.zeros([BLOCK_T], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        pre = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            xt = tl.load(XIN + rows[:, None] * stride_xin_t + offs_d[None, :],
                         mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            bd = tl.load(B_DEC + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            w = tl.load(W_ENC + offs_d[:, None] * stride_we_d + offs_f[None, :],
                        mask=d_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            pre = tl.dot(xt - bd[None, :], w, pre, input_precision=PRECISION)
        pre += tl.load(B_ENC + offs_f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
        act = tl.maximum(pre, 0.0)
        if MODE == 1:
            thr = tl.load(THR + offs_f, mask=f_ok, other=0.0).to(tl.float32)
            act = tl.where(pre > thr[None, :], act, 0.0)
        if MODE == 2:
            words = tl.load(SEL + rows[:, None] * stride_sel_t + (offs_f // 32)[None, :],
                            mask=t_ok[:, None] & f_ok[None, :], other=0)
            act = tl.where(((words >> (offs_f % 32)[None, :]) & 1) != 0, act, 0.0)
        act = tl.where(t_ok[:, None] & f_ok[None, :], act, 0.0)
        l0 += tl.sum((act > 0.0).to(tl.float32), axis=1)
        l1 += tl.sum(act, axis=1)
        tl.atomic_max(FIRED + offs_f, tl.max((act > 0.0).to(tl.int32), axis=0), mask=f_ok & first)
        wd = tl.load(W_DEC + offs_f[:, None] * stride_wd_f + offs_o[None, :],
                     mask=f_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
        xh = tl.dot(act, wd, xh, input_precision=PRECISION)

    xh += tl.load(B_OUT + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_NORM:
        s = tl.load(SCALE + offs_t, mask=t_ok, other=1.0).to(tl.float32)
        m = tl.load(SHIFT + offs_t, mask=t_ok, other=0.0).to(tl.float32)
        xh = xh * s[:, None] + m[:, None]
    valid = t_ok[:, None] & o_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x_t + offs_o[None, :], mask=valid, other=0.0).to(tl.float32)
    xh = tl.where(valid, xh, 0.0)
    e = x - xh
    # Per-token sums over this tile's <= BLOCK_O columns in float32 (relative error ~1e-7 * sqrt(BLOCK_O), the
    # size of the float32 GEMM's own); the tiles and the tokens are summed in float64 (torch). Float64 here
    # doubled the epilogue's registers and spilled (bench/results/aot-reconstruct-sm90a-candidates.csv).
    base = TOK + pid_o.to(tl.int64) * stride_tok_o + rows * 6
    tl.store(base + 0, tl.sum(e * e, axis=1).to(tl.float64), mask=t_ok)
    tl.store(base + 1, tl.sum(xh * xh, axis=1).to(tl.float64), mask=t_ok)
    tl.store(base + 2, tl.sum(x * xh, axis=1).to(tl.float64), mask=t_ok)
    tl.store(base + 3, tl.sum(x * x, axis=1).to(tl.float64), mask=t_ok)
    tl.store(base + 4, l0.to(tl.float64), mask=t_ok & first)  # once per token: the slots are summed
    tl.store(base + 5, l1.to(tl.float64), mask=t_ok & first)


def _configs() -> list:
    """The autotuner's configs on a GPU (BLOCK_T, BLOCK_F, BLOCK_D, BLOCK_O, warps, stages)."""
    out = []
    # The spill-free configs of bench/results/aot-reconstruct-sm90a-candidates.csv (sm_90a): BLOCK_O 512, or
    # BLOCK_T 64, spill 300-1000 B per thread; the float64 epilogue spilled in every config tried.
    for bt, bf, bd, bo, w, s in ((32, 32, 32, 256, 8, 2), (32, 32, 32, 128, 4, 2)):
        out.append(triton.Config(dict(BLOCK_T=bt, BLOCK_F=bf, BLOCK_D=bd, BLOCK_O=bo), num_warps=w, num_stages=s))
    return out


_reconstruct_tuned = triton.autotune(configs=_configs(), key=["D", "F", "MODE", "HAS_NORM", "PRECISION"])(
    _reconstruct_kernel)


def reconstruct_stats_triton(
    xin: torch.Tensor, x: torch.Tensor, W_enc, b_enc, b_dec, threshold, k, W_dec, b_out,
    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, *,
    precision: str = DEFAULT_RECON_PRECISION, block_t: int | None = None, block_f: int | None = None,
    block_d: int | None = None, block_o: int | None = None, topk_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's (per-token stats [T, 6] float64, fired [F] bool); same inputs as the reference.
    Block sizes (powers of two >= 16, all four or none) fix the tile; default: autotuned on a GPU, in the
    interpreter 64 / 64 / 64 / the next power of two >= d (one column tile)."""
    _check(xin, x, W_enc, b_enc, b_dec, W_dec, b_out, scale, shift)
    if precision not in RECON_PRECISIONS:
        raise ValueError(f"precision must be one of {RECON_PRECISIONS}, got {precision!r}")
    blocks = (block_t, block_f, block_d, block_o)
    if any(b is not None for b in blocks):
        if any(b is None for b in blocks) or any(b < 16 or b & (b - 1) for b in blocks):
            raise ValueError(f"give block_t, block_f, block_d and block_o together, powers of two >= 16, got {blocks}")
    check_launchable("reconstruct_stats_triton", xin, x, W_enc, b_enc, b_dec, threshold, W_dec, b_out, scale, shift)
    n_tok, d = x.shape
    n_feat = W_enc.shape[1]
    device = x.device
    fired = torch.zeros(n_feat, dtype=torch.int32, device=device)
    if n_tok == 0:
        return torch.zeros(0, N_TOKEN_STATS, dtype=torch.float64, device=device), fired.bool()
    mode = _MODE_RELU if threshold is None and k is None else (_MODE_JUMPRELU if k is None else _MODE_TOPK)
    sel = xin  # placeholder unless TopK
    if mode == _MODE_TOPK:
        sel = _topk_bitmask(xin, W_enc, b_enc, b_dec, int(k), int(topk_chunk or max(1, (1 << 25) // n_feat)))
    xin = xin if xin.stride(1) == 1 else xin.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    W_enc = W_enc if W_enc.stride(1) == 1 else W_enc.contiguous()
    W_dec = W_dec if W_dec.stride(1) == 1 else W_dec.contiguous()
    vec = lambda t: t.contiguous()  # noqa: E731
    fixed = block_t is not None or interpreting()
    if fixed:
        bt, bf, bd, bo = blocks if block_t is not None else (64, 64, 64, max(16, triton.next_power_of_2(d)))
        n_o = triton.cdiv(d, bo)
    else:
        n_o = max(triton.cdiv(d, c.kwargs["BLOCK_O"]) for c in _reconstruct_tuned.configs)
    tok = torch.zeros(n_o, n_tok, N_TOKEN_STATS, dtype=torch.float64, device=device)
    args = (xin, x, vec(scale) if scale is not None else x, vec(shift) if shift is not None else x,
            W_enc, vec(b_enc), vec(b_dec), vec(threshold) if threshold is not None else b_enc, sel, W_dec, vec(b_out),
            tok, fired, n_tok, d, n_feat,
            xin.stride(0), x.stride(0), W_enc.stride(0), W_dec.stride(0), sel.stride(0), tok.stride(0))
    meta = dict(MODE=mode, HAS_NORM=scale is not None, PRECISION=precision)
    if fixed:
        _reconstruct_kernel[(triton.cdiv(n_tok, bt), n_o)](*args, **meta, BLOCK_T=bt, BLOCK_F=bf, BLOCK_D=bd,
                                                           BLOCK_O=bo)
    else:  # the buffer has a slot for the most column tiles any config makes
        grid = lambda m: (triton.cdiv(n_tok, m["BLOCK_T"]), triton.cdiv(d, m["BLOCK_O"]))  # noqa: E731
        _reconstruct_tuned[grid](*args, **meta)
        # Only the chosen config's slots count: benchmark runs of other configs may have written the rest.
        n_o = triton.cdiv(d, _reconstruct_tuned.best_config.kwargs["BLOCK_O"])
    return tok[:n_o].sum(0), fired.bool()


def reconstruct_stats(xin, x, W_enc, b_enc, b_dec, threshold, k, W_dec, b_out, scale=None, shift=None):
    """Dispatch point: the fused kernel on CUDA, else the torch reference."""
    if use_triton(xin, x, W_enc, W_dec):
        return reconstruct_stats_triton(xin, x, W_enc, b_enc, b_dec, threshold, k, W_dec, b_out, scale, shift)
    return reconstruct_stats_reference(xin, x, W_enc, b_enc, b_dec, threshold, k, W_dec, b_out, scale, shift)


def aot_cases() -> list[dict]:
    """Compile cases for bench/aot_report.py: bf16 (Gemma) and float32 (Pythia, SmolLM2 on CPU) read-outs,
    each activation mode, every autotune config, float32 SAE weights."""
    cases = []
    fn = _reconstruct_kernel
    ptrs = {"XIN": "x", "X": "x", "SCALE": "*fp32", "SHIFT": "*fp32", "W_ENC": "*fp32", "B_ENC": "*fp32",
            "B_DEC": "*fp32", "THR": "*fp32", "SEL": "*i32", "W_DEC": "*fp32", "B_OUT": "*fp32", "TOK": "*fp64",
            "FIRED": "*i32"}
    modes = {"relu": _MODE_RELU, "jumprelu": _MODE_JUMPRELU, "topk": _MODE_TOPK}
    for x_dtype in ("bf16", "fp32"):
        for mode_name, mode in modes.items():
            if x_dtype == "fp32" and mode_name != "relu":
                continue
            sig = {a: (f"*{x_dtype}" if t == "x" else t) for a, t in ptrs.items()}
            for cfg in _reconstruct_tuned.configs:
                consts = dict(MODE=mode, HAS_NORM=False, PRECISION=DEFAULT_RECON_PRECISION, **cfg.kwargs)
                sig_k = {a: sig.get(a, "i32") for a in fn.arg_names if a not in consts}
                cases.append(dict(kernel=fn, variant=f"x={x_dtype},{mode_name},{DEFAULT_RECON_PRECISION}",
                                  signature=sig_k, constexprs=consts,
                                  divisible=("D", "F", "stride_xin_t", "stride_x_t", "stride_we_d", "stride_wd_f"),
                                  config=cfg))
    return cases
