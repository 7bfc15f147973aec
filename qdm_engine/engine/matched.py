"""Matched-perplexity pruning (docs/METHOD.md section 3): the sparsity whose perplexity matches an RTN condition.

Bisection over s in [0, 0.8], 6 steps: ppl(s) < target -> lo = s, else hi = s; the evaluated s whose
perplexity is closest to the target wins. Perplexities come from held-out blocks disjoint from the
audit's, and the FP weights are restored after every evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from qdm_engine.engine.compression import FPWeights, MagnitudePrune, register
from qdm_engine.engine.perplexity import nll_sum, perplexity
from qdm_engine.engine.tokens import TokenBlocks


@register
@dataclass(frozen=True)
class MatchedPrune(MagnitudePrune):
    """Magnitude pruning at the sparsity that matched `target`'s perplexity on held-out tokens."""

    target: str = ""
    target_ppl: float = float("nan")
    trace: tuple = field(default=(), compare=False)  # ((sparsity, ppl), ...) in evaluation order
    method = "prune-matched"

    @property
    def name(self) -> str:
        return "prune-matched"

    def describe(self) -> dict:
        return {**super().describe(), "method": self.method, "target": self.target, "target_ppl": self.target_ppl,
                "bisection": [{"sparsity": s, "ppl": p} for s, p in self.trace]}


def bisect_sparsity(ppl_at: Callable[[float], float], target: float, lo: float = 0.0, hi: float = 0.8,
                    steps: int = 6, log: Callable[[str], None] = lambda _m: None) -> tuple[float, list]:
    """The evaluated sparsity whose ppl is closest to `target`, and the (s, ppl) trace."""
    trace = []
    for _ in range(steps):
        s = (lo + hi) / 2
        p = ppl_at(s)
        trace.append((s, p))
        log(f"  sparsity {s:.4f}: ppl {p:.3f} ({100 * (p / target - 1):+.2f}% vs target {target:.3f})")
        if p < target:
            lo = s
        else:
            hi = s
    best = min(trace, key=lambda sp: abs(sp[1] - target))[0]
    return best, trace


def held_out_ppl(model, blocks: TokenBlocks, batch_size: int, device: str) -> float:
    """Token-weighted perplexity of `model` on `blocks`."""
    nll, n = 0.0, 0
    with torch.inference_mode():
        for lo in range(0, blocks.n_blocks, batch_size):
            ids = blocks.ids[lo:lo + batch_size].to(device)
            b_nll, b_n = nll_sum(model(input_ids=ids, use_cache=False).logits, ids)
            nll, n = nll + b_nll, n + b_n
    return perplexity(nll, n)


def match_pruning(model, target_condition, calib: TokenBlocks, batch_size: int, device: str,
                  steps: int = 6, log: Callable[[str], None] = lambda _m: None) -> MatchedPrune:
    """Find the matched sparsity for `target_condition` (e.g. RTN(6)) on `calib` blocks."""
    saved = FPWeights(model)
    try:
        target_condition.apply(model)
        target = held_out_ppl(model, calib, batch_size, device)
        saved.restore()
        log(f"matching pruning to {target_condition.name}: held-out ppl {target:.3f} on {calib.n_blocks} blocks")

        def ppl_at(s: float) -> float:
            try:
                MagnitudePrune(s).apply(model)
                return held_out_ppl(model, calib, batch_size, device)
            finally:
                saved.restore()

        s, trace = bisect_sparsity(ppl_at, target, steps=steps, log=log)
    finally:
        saved.restore()
    log(f"matched sparsity {s:.4f}")
    return MatchedPrune(sparsity=s, target=target_condition.name, target_ppl=target, trace=tuple(trace))
