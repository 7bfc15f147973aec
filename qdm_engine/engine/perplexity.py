"""Chunked perplexity from the logits of the audit's own forward passes (docs/METHOD.md section 6).

Every next-token target of every block counts once: the NLL is summed in float64 and divided by the
number of targets (token-weighted, so a short last batch is not over-weighted as a mean of batch means is).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def nll_sum_tensor(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL for logits [B, S, V] and ids [B, S], as a 0-d float64 tensor on the logits'
    device: nothing is read back, so on a GPU the caller keeps queueing work (the run loop reads the sum
    once per condition). Blocks are upcast to float32 one at a time, keeping the copy small."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for b in range(logits.shape[0]):
        lp = logits[b, :-1].to(torch.float32)
        total += F.cross_entropy(lp, ids[b, 1:].to(lp.device), reduction="sum").to(torch.float64)
    return total


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token NLL, number of targets) for logits [B, S, V] and ids [B, S]."""
    return float(nll_sum_tensor(logits, ids)), int(logits.shape[0] * (logits.shape[1] - 1))


def perplexity(nll: float, n_targets: int) -> float:
    return math.exp(nll / n_targets) if n_targets else float("nan")


def sliding_window_nll(model, ids: torch.Tensor, window: int, stride: int, bos_id: int | None,
                       device: str = "cpu", progress=None) -> tuple[float, int]:
    """(NLL sum, scored targets) of a 1-D token stream with a sliding window (docs/METHOD.md section 6).

    Each window holds `window` positions (BOS first when `bos_id` is given) and advances by `stride`
    tokens; only targets not scored by an earlier window count, so every token is scored exactly once,
    with up to window - stride tokens of context carried over.
    """
    if window < 2 or not 0 < stride <= window - 1:  # each new target needs one earlier position as context
        raise ValueError(f"need window >= 2 and 0 < stride < window, got window {window}, stride {stride}")
    span = window - (1 if bos_id is not None else 0)  # text tokens per window
    n = ids.numel()
    total, count, scored_to = 0.0, 0, 0 if bos_id is not None else 1  # without BOS token 0 has no context
    begin = 0
    while True:
        end = min(begin + span, n)
        chunk = ids[begin:end]
        if bos_id is not None:
            chunk = torch.cat([torch.tensor([bos_id], dtype=ids.dtype), chunk])
        offset = 1 if bos_id is not None else 0  # position of ids[begin] inside chunk
        logits = model(input_ids=chunk[None].to(device), use_cache=False).logits[0].to(torch.float32)
        first = scored_to - begin + offset  # chunk index of the first new target
        targets = chunk[first:].to(logits.device)
        total += float(F.cross_entropy(logits[first - 1:-1], targets, reduction="sum").to(torch.float64))
        count += int(targets.numel())
        scored_to = end
        if progress is not None:
            progress.update()
        if end == n:
            return total, count
        begin += stride
