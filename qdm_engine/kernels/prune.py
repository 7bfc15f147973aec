"""Per-tensor magnitude pruning (METHOD.md section 3).

Zeroes exactly k = floor(sparsity * numel) weights of smallest |w|; ties in |w| are broken by flat
index (a stable sort), so bf16 ties never over-prune as a `<= kthvalue` rule does.

The selection (which k weights) is torch on every backend: a stable argsort is exact, simple and a
few milliseconds on a GPU for the largest weight here. The Triton kernel applies the keep-mask, in
place (`out=weight`) or into a new tensor, in one pass over the weight's bits.
"""

from __future__ import annotations

import math

import torch

from qdm_engine.kernels.backend import check_launchable, interpreting, tl, triton, use_triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def prune_count(numel: int, sparsity: float) -> int:
    """Number of weights a tensor of `numel` elements loses at `sparsity` (floor, as METHOD.md says)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return int(math.floor(sparsity * numel))


def magnitude_prune_mask_reference(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask of weight's shape: False at the k smallest-|w| positions (ties by index)."""
    k = prune_count(weight.numel(), sparsity)
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if k:
        order = torch.argsort(weight.detach().abs().flatten().to(torch.float32), stable=True)
        keep[order[:k]] = False
    return keep.view_as(weight)


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"pruning expects a torch.Tensor weight, got {type(weight).__name__}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"pruning supports float32/bfloat16/float16 weights, got {weight.dtype}")


def _check_mask_out(weight: torch.Tensor, keep: torch.Tensor, out: torch.Tensor | None) -> None:
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != weight.shape:
        raise ValueError(f"keep must be a bool tensor of the weight's shape {tuple(weight.shape)}")
    if keep.device != weight.device:
        raise ValueError(f"keep is on {keep.device}, the weight on {weight.device}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != weight.shape or out.dtype != weight.dtype:
            raise ValueError("out must be a tensor of the weight's shape and dtype")
        if out.device != weight.device:
            raise ValueError(f"out is on {out.device}, the weight on {weight.device}")


def apply_mask_reference(
    weight: torch.Tensor, keep: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """weight where `keep` (bool, weight's shape) else +0.0; into `out` (may be `weight`) or a new tensor."""
    _check_weight(weight)
    _check_mask_out(weight, keep, out)
    res = torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    if out is None:
        return res
    out.copy_(res)
    return out


def magnitude_prune_reference(
    weight: torch.Tensor, sparsity: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A pruned copy of `weight` (same dtype) with exactly floor(sparsity * numel) zeros forced.

    With `out` (which may be `weight` itself, for in-place pruning) the result is written there.
    """
    _check_weight(weight)
    mask = magnitude_prune_mask_reference(weight, sparsity)
    return apply_mask_reference(weight, mask, out=out)


@triton.jit
def _apply_mask_kernel(W, KEEP, OUT, n, BLOCK: tl.constexpr):
    # W / OUT are integer views of the weight's bits (int32 for fp32, int16 for bf16/fp16), so the
    # kernel copies bit patterns exactly (a kept -0.0 stays -0.0); KEEP is the uint8 view of the mask.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    w = tl.load(W + offs, mask=inb, other=0)
    k = tl.load(KEEP + offs, mask=inb, other=0)
    tl.store(OUT + offs, tl.where(k != 0, w, tl.zeros_like(w)), mask=inb)


_apply_mask_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK": b}, num_warps=nw) for b in (1024, 2048, 4096, 8192) for nw in (4, 8)],
    key=["n"],
)(_apply_mask_kernel)


def apply_mask_triton(
    weight: torch.Tensor, keep: torch.Tensor, *, out: torch.Tensor | None = None, block: int | None = None
) -> torch.Tensor:
    """Launch the mask-apply kernel; bit-identical to `apply_mask_reference`.

    weight: float32/bfloat16/float16 of any shape, on CUDA (or CPU under TRITON_INTERPRET=1), copied
    first if not contiguous; keep: bool of the same shape and device; out: None or a contiguous tensor
    of the weight's shape and dtype (the weight itself for in place); block: a power of two fixing the
    elements per program instead of the autotuned (GPU) or default (interpreter) choice.
    """
    _check_weight(weight)
    _check_mask_out(weight, keep, out)
    check_launchable("apply_mask_triton", weight, keep, out)
    if out is not None and not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if block is not None and (block < 1 or block & (block - 1)):
        raise ValueError(f"block must be a power of two, got {block}")
    src = weight if weight.is_contiguous() else weight.contiguous()
    dst = out if out is not None else torch.empty_like(src, memory_format=torch.contiguous_format)
    n = src.numel()
    if n == 0:
        return dst
    bits = _BITS[weight.dtype]
    args = (src.view(bits), keep.contiguous().view(torch.uint8), dst.view(bits), n)
    if block is not None or interpreting():
        b = block or min(triton.next_power_of_2(n), 1 << 16)
        _apply_mask_kernel[(triton.cdiv(n, b),)](*args, BLOCK=b)
    else:
        _apply_mask_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](*args)
    return dst


def magnitude_prune_triton(
    weight: torch.Tensor, sparsity: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch selection of the k smallest |w| (ties by index), then the Triton mask-apply kernel."""
    _check_weight(weight)
    mask = magnitude_prune_mask_reference(weight, sparsity)
    return apply_mask_triton(weight, mask, out=out)


def magnitude_prune(weight: torch.Tensor, sparsity: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch point for magnitude pruning: the Triton mask-apply on CUDA, the reference elsewhere.

    Returns the pruned tensor; pass `out=weight` to prune in place.
    """
    if use_triton(weight):
        return magnitude_prune_triton(weight, sparsity, out=out)
    return magnitude_prune_reference(weight, sparsity, out=out)
