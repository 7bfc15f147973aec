"""Per-tensor magnitude pruning (METHOD.md section 3).

Zeroes exactly k = floor(sparsity * numel) weights of smallest |w|; ties in |w| are broken by flat
index (a stable sort), so bf16 ties never over-prune as a `<= kthvalue` rule does.
"""

from __future__ import annotations

import math

import torch


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


def magnitude_prune_reference(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A pruned copy of `weight` (same dtype) with exactly floor(sparsity * numel) zeros forced."""
    mask = magnitude_prune_mask_reference(weight, sparsity)
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def magnitude_prune(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Dispatch point for magnitude pruning (the reference until a Triton mask-apply kernel lands)."""
    return magnitude_prune_reference(weight, sparsity)
