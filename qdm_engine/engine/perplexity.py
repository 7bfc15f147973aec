"""Chunked perplexity from the logits of the audit's own forward passes (METHOD.md section 6).

Every next-token target of every block counts once: the NLL is summed in float64 and divided by the
number of targets (token-weighted, so a short last batch is not over-weighted as a mean of batch means is).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token NLL, number of targets) for logits [B, S, V] and ids [B, S]."""
    total = 0.0
    for b in range(logits.shape[0]):  # one block at a time keeps the float32 upcast small
        lp = logits[b, :-1].to(torch.float32)
        total += float(F.cross_entropy(lp, ids[b, 1:].to(lp.device), reduction="sum").to(torch.float64))
    return total, int(logits.shape[0] * (logits.shape[1] - 1))


def perplexity(nll: float, n_targets: int) -> float:
    return math.exp(nll / n_targets) if n_targets else float("nan")
