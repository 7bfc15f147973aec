"""Matched-perplexity conditions (docs/METHOD.md section 3): the strength of a method whose held-out
perplexity matches another condition's, so that two methods are compared at equal behavioural cost.

Bisection over the sparsity s in [0, 0.8], 6 steps: ppl(s) < target -> lo = s, else hi = s; the evaluated
s whose perplexity is closest to the target wins. Perplexities come from held-out blocks disjoint from
the audit's, and the FP model is restored after every evaluation. `--prune-matched int6` is
`--match magnitude@int6` under its historical name (`prune-matched`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from qdm_engine.engine.compress import ModelState, parse_method, register
from qdm_engine.engine.compress.sparsity import MagnitudePrune
from qdm_engine.engine.perplexity import nll_sum, perplexity
from qdm_engine.engine.tokens import TokenBlocks
from qdm_engine.errors import QdmError


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


@dataclass(frozen=True)
class Matched:
    """Any method with a sparsity, at the strength that matched `target`'s held-out perplexity."""

    inner: object
    target: str
    target_ppl: float
    trace: tuple = field(default=(), compare=False)

    @property
    def method(self) -> str:
        return self.inner.method

    @property
    def name(self) -> str:
        return f"{self.inner.method}-matched-{self.target}"

    def check(self, model) -> None:
        self.inner.check(model)

    def apply(self, model) -> None:
        self.inner.apply(model)

    def describe(self) -> dict:
        return {**self.inner.describe(), "matched_to": self.target, "target": self.target,
                "target_ppl": self.target_ppl, "bisection": [{"sparsity": s, "ppl": p} for s, p in self.trace]}


def matchable(spec: str):
    """The condition a `--match` spec names (at its default sparsity); a QdmError if it has no sparsity."""
    cond = parse_method(spec)
    names = {f.name for f in dataclasses.fields(cond)}
    if "sparsity" not in names or getattr(cond, "pattern", None):
        raise QdmError(f"--match {spec}: only a method with a sparsity fraction can be matched "
                       "(magnitude, wanda, sparsegpt; without pattern=)")
    return cond


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


def match_strength(model, target_condition, make: Callable[[float], object], calib: TokenBlocks, batch_size: int,
                   device: str, steps: int = 6, log: Callable[[str], None] = lambda _m: None):
    """(sparsity, target ppl, trace): bisection of `make(s)`'s held-out perplexity onto the target's."""
    saved = ModelState(model)
    try:
        target_condition.apply(model)
        target = held_out_ppl(model, calib, batch_size, device)
        saved.restore()
        log(f"matching to {target_condition.name}: held-out ppl {target:.3f} on {calib.n_blocks} blocks")

        def ppl_at(s: float) -> float:
            try:
                make(s).apply(model)
                return held_out_ppl(model, calib, batch_size, device)
            finally:
                saved.restore()

        s, trace = bisect_sparsity(ppl_at, target, steps=steps, log=log)
    finally:
        saved.restore()
    log(f"matched sparsity {s:.4f}")
    return s, target, trace


def match_pruning(model, target_condition, calib: TokenBlocks, batch_size: int, device: str,
                  steps: int = 6, log: Callable[[str], None] = lambda _m: None) -> MatchedPrune:
    """`--prune-matched`: magnitude pruning matched to `target_condition` (e.g. RTN(6)) on `calib` blocks."""
    s, target, trace = match_strength(model, target_condition, MagnitudePrune, calib, batch_size, device, steps, log)
    return MatchedPrune(sparsity=s, target=target_condition.name, target_ppl=target, trace=tuple(trace))


def match_method(model, spec: str, target_condition, calib: TokenBlocks, calib_tokens, batch_size: int,
                 device: str, steps: int = 6, log: Callable[[str], None] = lambda _m: None) -> Matched:
    """`--match SPEC@CONDITION`: the method of SPEC at the sparsity matching `target_condition`."""
    base = matchable(spec)
    if getattr(base, "calibration", False):
        base = dataclasses.replace(base, calib=calib_tokens)

    def make(s: float):
        return dataclasses.replace(base, sparsity=s)

    s, target, trace = match_strength(model, target_condition, make, calib, batch_size, device, steps, log)
    return Matched(make(s), target_condition.name, target, tuple(trace))
