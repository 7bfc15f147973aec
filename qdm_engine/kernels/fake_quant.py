"""Round-to-nearest fake quantization of a linear weight (METHOD.md section 3).

`fake_quant_reference` is the plain-torch definition (the CPU backend and the test oracle);
`fake_quant_triton` is the Triton kernel's launcher with the same signature; `fake_quant_rtn` is the
one dispatch point the engine calls. All arithmetic is float32 (the weight is upcast exactly), rounding
is half to even, and the result is written back in the weight's dtype.

Symmetric, per output row r of W [out, in] (the default, METHOD.md's RTN):
    qmax = 2^(b-1) - 1,  qmin = -2^(b-1)
    scale_r = max_j |W_rj| / qmax            (scale 0 -> 1, so an all-zero row stays zero)
    W'_rj = clamp(round(W_rj / scale_r), qmin, qmax) * scale_r

Group-wise (`group_size=g`, g dividing `in`): the same formula with one scale per row and per group of
g consecutive input columns, i.e. per-row quantization of W viewed as [out * in / g, g].

Asymmetric (`symmetric=False`, per row or per group), min/max with an integer zero point, the range
widened to contain 0 (as torch's MinMaxObserver) so that 0 stays exactly representable:
    qmax_u = 2^b - 1
    lo = min(min_j W_rj, 0),  hi = max(max_j W_rj, 0)
    scale_r = (hi - lo) / qmax_u              (scale 0 -> 1)
    zp_r = clamp(round(-lo / scale_r), 0, qmax_u)
    W'_rj = (clamp(round(W_rj / scale_r) + zp_r, 0, qmax_u) - zp_r) * scale_r
Here round() returns +0.0 for every zero result (signed zeros cannot leak through the zero point), so
the output holds no -0.0; the symmetric path keeps torch.round's sign (-0.3 -> -0.0).

Every division is a true IEEE division (never a multiply by a reciprocal), so kernel and reference
agree bit for bit.
"""

from __future__ import annotations

import operator

import torch

from qdm_engine.kernels.backend import check_launchable, interpreting, tl, triton, use_triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Largest row chunk one Triton program holds in registers; longer rows (after grouping) are read
# twice: a pass for the row range, then a pass that quantizes (the second read mostly hits L2).
_MAX_BLOCK_N = 8192
# Elements per program (BLOCK_M * BLOCK_N) the autotuner may try: past this the tile spills.
_MAX_TILE = 16384


def _is_int(v) -> bool:
    """An integer (Python or numpy), not a bool."""
    if isinstance(v, bool):
        return False
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


def _check(weight: torch.Tensor, bits: int, group_size: int | None = None) -> None:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"fake_quant expects a torch.Tensor weight, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"fake_quant expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fake_quant supports float32/bfloat16/float16 weights, got {weight.dtype}")
    if not _is_int(bits) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 2..16, got {bits!r}")
    if group_size is not None:
        if not _is_int(group_size) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        if weight.shape[1] % group_size:
            raise ValueError(
                f"group_size {group_size} does not divide the weight's input width {weight.shape[1]}"
            )


def _check_out(weight: torch.Tensor, out: torch.Tensor | None) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor) or out.shape != weight.shape or out.dtype != weight.dtype:
        raise ValueError("out must be a tensor of the weight's shape and dtype")
    if out.device != weight.device:
        raise ValueError(f"out is on {out.device}, the weight on {weight.device}")


def _levels(bits: int, symmetric: bool) -> tuple[float, float]:
    """(qmin, qmax) of the integer code: symmetric signed, or asymmetric unsigned."""
    if symmetric:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _round_pz(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with every zero made +0.0 (adding +0.0 turns -0.0 into +0.0)."""
    return torch.round(x) + 0.0


def fake_quant_reference(
    weight: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RTN fake quantization by the formulas of the module docstring; `out` (may be `weight`) receives it."""
    _check(weight, bits, group_size)
    _check_out(weight, out)
    qmin, qmax = _levels(int(bits), symmetric)
    w = weight.to(torch.float32)
    if group_size is not None:
        w = w.reshape(-1, group_size)
    if symmetric:
        scale = w.abs().amax(dim=1, keepdim=True) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(w / scale), qmin, qmax)  # torch.round rounds half to even
        res = q * scale
    else:
        lo = w.amin(dim=1, keepdim=True).clamp(max=0.0)
        hi = w.amax(dim=1, keepdim=True).clamp(min=0.0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zp = torch.clamp(_round_pz(-lo / scale), 0.0, qmax)
        q = torch.clamp(_round_pz(w / scale) + zp, 0.0, qmax)
        res = (q - zp) * scale
    res = res.reshape(weight.shape).to(weight.dtype)
    if out is None:
        return res
    out.copy_(res)
    return out


def fake_quant_rtn_reference(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-row symmetric RTN fake quantization; returns a new tensor of weight's dtype."""
    return fake_quant_reference(weight, bits)


# ---------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _round_half_even(v):
    # Round to nearest, ties to even, without libdevice.rint (which the interpreter cannot run).
    # For |v| < 2^22, v + 1.5 * 2^23 lies in (2^23, 2^24), where float32 spacing is exactly 1, so the
    # IEEE add itself rounds v to an integer, ties to even; subtracting the constant back is exact.
    # The 1.5 (rather than 1.0) keeps negative v inside that binade too. Here |v| <= qmax + 0.5
    # <= 65535.5, far below 2^22. No fast-math is enabled, so the compiler cannot fold (v + c) - c.
    # The result of a negative v that rounds to zero is +0.0 (torch.round gives -0.0); callers that
    # need torch's sign copy it back with _copy_sign_bit.
    MAGIC: tl.constexpr = 12582912.0  # 1.5 * 2^23
    return (v + MAGIC) - MAGIC


@triton.jit
def _copy_sign_bit(r, v):
    # r has v's sign except when r is a zero from a negative v (or v == -0.0): OR v's sign bit in.
    rb = r.to(tl.int32, bitcast=True)
    vb = v.to(tl.int32, bitcast=True)
    return (rb | (vb & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_bits_rne(x):
    # float32 -> bfloat16 bit pattern, round to nearest even: add 0x7FFF plus the lowest kept bit,
    # then drop the 16 low bits (a carry into the exponent is the correct rounding up). Done by hand
    # because the interpreter's float32 -> bfloat16 cast truncates; on the GPU this costs a few
    # integer ops in a memory-bound kernel. (NaN inputs are not preserved; weights are finite.)
    b = x.to(tl.int32, bitcast=True)
    b = b + (((b >> 16) & 1) + 0x7FFF)
    return (b >> 16).to(tl.int16)


@triton.jit
def _store_out(ptrs, res, mask, OUT_BF16: tl.constexpr):
    if OUT_BF16:
        tl.store(ptrs, _bf16_bits_rne(res), mask=mask)  # OUT is the int16 view of a bfloat16 tensor
    else:
        tl.store(ptrs, res.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _quant_params(lo, hi, qmax, SYMMETRIC: tl.constexpr):
    # lo / hi: per-row min and max of the (zero-padded) row, float32 [BLOCK_M].
    if SYMMETRIC:
        amax = tl.maximum(hi, -lo)
        scale = tl.math.div_rn(amax, qmax)
        scale = tl.where(scale == 0.0, 1.0, scale)
        zp = tl.zeros_like(scale)
    else:
        lo = tl.minimum(lo, 0.0)
        hi = tl.maximum(hi, 0.0)
        scale = tl.math.div_rn(hi - lo, qmax)
        scale = tl.where(scale == 0.0, 1.0, scale)
        zp = _round_half_even(tl.math.div_rn(-lo, scale))
        zp = tl.minimum(tl.maximum(zp, 0.0), qmax)
    return scale, zp


@triton.jit
def _quantize(w, scale, zp, qmax, SYMMETRIC: tl.constexpr):
    # w: float32 [BLOCK_M, BLOCK_N]; scale, zp: [BLOCK_M]. Returns the dequantized float32 tile.
    v = tl.math.div_rn(w, scale[:, None])
    r = _round_half_even(v)
    if SYMMETRIC:
        r = _copy_sign_bit(r, v)
        q = tl.minimum(tl.maximum(r, -qmax - 1.0), qmax)
        res = q * scale[:, None]
    else:
        q = tl.minimum(tl.maximum(r + zp[:, None], 0.0), qmax)
        res = (q - zp[:, None]) * scale[:, None]
    return res


@triton.jit
def _fake_quant_rows_kernel(
    W,
    OUT,
    n_rows,
    n_cols,
    stride_w,
    stride_o,
    qmax,
    SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    # One program quantizes BLOCK_M whole rows; row elements are contiguous (stride 1).
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    w_rows = W + rows.to(tl.int64)[:, None] * stride_w
    o_rows = OUT + rows.to(tl.int64)[:, None] * stride_o
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        # The row fits one block: a single read, range and quantization from registers.
        m = row_ok[:, None] & (cols < n_cols)[None, :]
        w = tl.load(w_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
        lo = tl.min(w, axis=1)  # padding loads 0, which the range contains anyway
        hi = tl.max(w, axis=1)
        scale, zp = _quant_params(lo, hi, qmax, SYMMETRIC)
        res = _quantize(w, scale, zp, qmax, SYMMETRIC)
        _store_out(o_rows + cols[None, :], res, m, OUT_BF16)
    else:
        lo = tl.zeros([BLOCK_M], dtype=tl.float32)
        hi = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, n_cols, BLOCK_N):
            c = c0 + cols
            m = row_ok[:, None] & (c < n_cols)[None, :]
            w = tl.load(w_rows + c[None, :], mask=m, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, tl.min(w, axis=1))
            hi = tl.maximum(hi, tl.max(w, axis=1))
        scale, zp = _quant_params(lo, hi, qmax, SYMMETRIC)
        for c0 in range(0, n_cols, BLOCK_N):
            c = c0 + cols
            m = row_ok[:, None] & (c < n_cols)[None, :]
            w = tl.load(w_rows + c[None, :], mask=m, other=0.0).to(tl.float32)
            res = _quantize(w, scale, zp, qmax, SYMMETRIC)
            _store_out(o_rows + c[None, :], res, m, OUT_BF16)


def _prune_row_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    block_n, n_rows = args["BLOCK_N"], args["n_rows"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] * block_n <= _MAX_TILE]
    keep = [c for c in keep if c.kwargs["BLOCK_M"] <= triton.next_power_of_2(n_rows)] or keep[:1]
    return keep or configs[:1]


_fake_quant_rows_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm}, num_warps=nw)
        for bm in (1, 2, 4, 8, 16, 32, 64)
        for nw in (4, 8)
    ],
    key=["n_rows", "n_cols", "BLOCK_N", "SYMMETRIC"],
    prune_configs_by={"early_config_prune": _prune_row_configs},
    restore_value=["OUT"],  # tuning reruns the kernel; `out` may alias the weight
)(_fake_quant_rows_kernel)


def fake_quant_triton(
    weight: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Launch the fake-quantization kernel; same result, bit for bit, as `fake_quant_reference`.

    weight: 2-D [out, in], float32/bfloat16/float16, on CUDA (or CPU under TRITON_INTERPRET=1);
    a non-contiguous weight is copied first. out: None (a new tensor) or a contiguous tensor of the
    weight's shape and dtype, which may be the weight itself (in place). block_m / block_n (powers of
    two) fix the tile instead of the autotuned (GPU) or default (interpreter) choice.
    """
    _check(weight, bits, group_size)
    _check_out(weight, out)
    check_launchable("fake_quant_triton", weight, out)
    if out is not None and not out.is_contiguous():
        raise ValueError("out must be contiguous")
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b is not None and (b < 1 or b & (b - 1)):
            raise ValueError(f"{name} must be a power of two, got {b}")
    src = weight if weight.is_contiguous() else weight.contiguous()
    dst = out if out is not None else torch.empty_like(src, memory_format=torch.contiguous_format)
    if src.numel() == 0:
        return dst
    n_cols = group_size if group_size is not None else src.shape[1]
    src2, dst2 = src.view(-1, n_cols), dst.view(-1, n_cols)
    n_rows = src2.shape[0]
    _, qmax = _levels(int(bits), symmetric)

    bn = block_n or min(triton.next_power_of_2(n_cols), 1024 if interpreting() else _MAX_BLOCK_N)
    out_bf16 = dst.dtype == torch.bfloat16
    if out_bf16:
        dst2 = dst2.view(torch.int16)
    common = dict(SYMMETRIC=bool(symmetric), BLOCK_N=bn, ONE_BLOCK=n_cols <= bn, OUT_BF16=out_bf16)
    args = (src2, dst2, n_rows, n_cols, src2.stride(0), dst2.stride(0), qmax)
    if block_m is not None or interpreting():
        bm = block_m or max(1, min(triton.next_power_of_2(n_rows), 4096 // bn))
        _fake_quant_rows_kernel[(triton.cdiv(n_rows, bm),)](*args, BLOCK_M=bm, **common)
    else:
        grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),)  # noqa: E731
        _fake_quant_rows_tuned[grid](*args, **common)
    return dst


def fake_quant_rtn(
    weight: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch point for RTN fake quantization: the Triton kernel on CUDA, the reference elsewhere."""
    if use_triton(weight):
        return fake_quant_triton(weight, bits, group_size=group_size, symmetric=symmetric, out=out)
    return fake_quant_reference(weight, bits, group_size=group_size, symmetric=symmetric, out=out)
