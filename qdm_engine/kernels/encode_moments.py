"""Paired SAE encode fused with the per-feature moment reduction (METHOD.md sections 2 and 4).

Given the FP and compressed read-outs of the same positions, encode both with one SAE and reduce
over positions into `FeatureMoments`, never holding more than one batch of activations. The encoder:
    pre = (x - b_dec) @ W_enc + b_enc          (float32)
    standard: relu(pre)
    JumpReLU: relu(pre) * (pre > threshold)    (as SAELens)
    TopK:     the k largest pre per position, relu'd; the rest 0
Input normalisation (SAELens's per-token `constant_norm_rescale` / `layer_norm`) is applied by the
caller before this function; a decoder-norm rescale of TopK pre-activations folds into W_enc and b_enc.
"""

from __future__ import annotations

import torch

from qdm_engine.kernels.moments import FeatureMoments


def sae_encode_reference(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None = None,
    k: int | None = None,
) -> torch.Tensor:
    """SAE feature activations [T, F] in float32 for read-outs x [T, d]."""
    if threshold is not None and k is not None:
        raise ValueError("an SAE is either JumpReLU (threshold) or TopK (k), not both")
    pre = (x.to(torch.float32) - b_dec.to(torch.float32)) @ W_enc.to(torch.float32) + b_enc.to(torch.float32)
    if k is not None:
        vals, idx = torch.topk(pre, k=int(k), dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    acts = pre.relu()
    if threshold is not None:
        acts = acts * (pre > threshold.to(torch.float32))
    return acts


def encode_moments_reference(
    x_fp: torch.Tensor,
    x_c: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None = None,
    k: int | None = None,
    mask: torch.Tensor | None = None,
) -> FeatureMoments:
    """Moments of (encode(x_fp), encode(x_c)) over the positions where `mask` (bool [T]) is True."""
    if x_fp.shape != x_c.shape or x_fp.dim() != 2:
        raise ValueError(f"x_fp and x_c must both be [T, d], got {tuple(x_fp.shape)} and {tuple(x_c.shape)}")
    if x_fp.shape[1] != W_enc.shape[0]:
        raise ValueError(f"read-out width {x_fp.shape[1]} does not match W_enc {tuple(W_enc.shape)}")
    if mask is not None:
        if mask.shape != (x_fp.shape[0],) or mask.dtype != torch.bool:
            raise ValueError("mask must be a bool tensor of shape [T]")
        x_fp, x_c = x_fp[mask], x_c[mask]
    fx = sae_encode_reference(x_fp, W_enc, b_enc, b_dec, threshold, k)
    fy = sae_encode_reference(x_c, W_enc, b_enc, b_dec, threshold, k)
    return FeatureMoments.from_activations(fx, fy)


def encode_moments(
    x_fp: torch.Tensor,
    x_c: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None = None,
    k: int | None = None,
    mask: torch.Tensor | None = None,
) -> FeatureMoments:
    """Dispatch point for the fused paired encode + moments (the reference until the Triton kernel lands)."""
    return encode_moments_reference(x_fp, x_c, W_enc, b_enc, b_dec, threshold, k, mask)
