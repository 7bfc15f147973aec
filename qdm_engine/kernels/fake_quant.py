"""Round-to-nearest fake quantization of a linear weight, one scale per output row (METHOD.md section 3).

`fake_quant_rtn_reference` is the plain-torch definition: the CPU backend and the test oracle. For
each output row r of W [out, in]: qmax = 2^(b-1) - 1, qmin = -2^(b-1), scale_r = max|W_r| / qmax
(0 -> 1 so an all-zero row stays zero), W'_r = clamp(round_half_even(W_r / scale_r), qmin, qmax) *
scale_r, computed in float32 and stored back in W's dtype.
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(weight: torch.Tensor, bits: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"fake_quant expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fake_quant supports float32/bfloat16/float16 weights, got {weight.dtype}")
    if not 2 <= int(bits) <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")


def fake_quant_rtn_reference(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-row symmetric RTN fake quantization; returns a new tensor of weight's dtype."""
    _check(weight, bits)
    qmax = float(2 ** (bits - 1) - 1)
    qmin = float(-(2 ** (bits - 1)))
    w = weight.to(torch.float32)
    scale = w.abs().amax(dim=1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / scale), qmin, qmax)  # torch.round rounds half to even
    return (q * scale).to(weight.dtype)


def fake_quant_rtn(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Dispatch point for per-row RTN fake quantization (the reference until a Triton kernel lands)."""
    return fake_quant_rtn_reference(weight, bits)
