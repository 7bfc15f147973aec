"""The sweep's model loop: one FP pass, then one pass per compression condition.

The FP pass reads the residual stream at every SAE's site and the logits for perplexity from the same
forward, and caches the FP read-outs of the scored positions (BOS dropped), so no condition reruns the
FP model. Each condition then compresses the targeted weights in place, runs the same token batches,
and streams (FP, compressed) read-out pairs through the fused encode + moments op; the FP weights are
restored afterwards. Nothing of size tokens x features is ever held beyond one batch. Several SAEs
(at one or several sites) share the same forward passes. Under torch.distributed each rank runs every
N-th block and the moments are merged across ranks at the end of each condition.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from qdm_engine.engine.compression import FP, FPWeights
from qdm_engine.engine.distributed import Shard
from qdm_engine.engine.models import StopForward, read_out, stop_after
from qdm_engine.engine.perplexity import nll_sum
from qdm_engine.engine.sae import SAEWeights
from qdm_engine.engine.tokens import TokenBlocks
from qdm_engine.kernels.encode_moments import encode_moments
from qdm_engine.kernels.moments import FeatureMoments


@dataclass
class ConditionRun:
    name: str
    condition: object
    nll: float  # summed over targets; 0 in features-only mode
    n_targets: int
    seconds: float
    moments: list[FeatureMoments] = field(default_factory=list)  # one per SAE; empty for the FP reference
    batch_moments: list[list[FeatureMoments]] = field(default_factory=list)  # per SAE, per batch (keep_batches)


def _batches(blocks: TokenBlocks, batch_size: int, shard: Shard):
    ids, mask = blocks.ids[shard.rank::shard.world], blocks.score_mask[shard.rank::shard.world]
    for lo in range(0, ids.shape[0], batch_size):
        yield ids[lo:lo + batch_size], mask[lo:lo + batch_size]


def run_conditions(
    model: torch.nn.Module,
    saes: list[SAEWeights],
    hooks: list[str],
    blocks: TokenBlocks,
    conditions: list,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
    ppl: bool = True,
    shard: Shard = Shard(),
    keep_batches: bool = False,
) -> list[ConditionRun]:
    """Run FP then every condition over the same blocks; one ConditionRun per row, FP first.

    `saes[i]` is read at `hooks[i]`. An `FP()` among `conditions` is the FP-vs-FP null: the FP model is
    run again like any condition. With `ppl=False` each forward stops after the deepest read-out layer.
    `keep_batches` also keeps each batch's moments (for token-subset stability; one process only).
    """
    if keep_batches and shard.world > 1:
        raise ValueError("keep_batches needs a single process")
    sites = sorted(set(hooks))
    n_batches = -(-len(range(shard.rank, blocks.n_blocks, shard.world)) // batch_size)
    bar = tqdm(total=n_batches * (1 + len(conditions)), unit="batch", dynamic_ncols=True,
               disable=not (progress and shard.is_main))

    def forward(ids, mask):
        """Read-outs of the scored positions at each site, and the batch's NLL sum and target count."""
        try:
            logits = model(input_ids=ids.to(device), use_cache=False).logits
        except StopForward:
            logits = None
        keep = mask.flatten().to(device)
        xs = {h: ro[h].value.reshape(-1, ro[h].value.shape[-1])[keep] for h in sites}
        return xs, *(nll_sum(logits, ids) if logits is not None else (0.0, 0))

    runs: list[ConditionRun] = []
    cache: list[dict[str, torch.Tensor]] = []
    with torch.inference_mode(), ExitStack() as stack:
        ro = {h: stack.enter_context(read_out(model, h)) for h in sites}
        if not ppl:
            stack.enter_context(stop_after(model, sites))
        bar.set_description("fp")
        t0, nll, n = time.perf_counter(), 0.0, 0
        for ids, mask in _batches(blocks, batch_size, shard):
            xs, b_nll, b_n = forward(ids, mask)
            cache.append(xs)
            nll, n = nll + b_nll, n + b_n
            bar.update()
        nll, n = shard.sum(nll, n)
        runs.append(ConditionRun("fp", FP(), nll, int(n), time.perf_counter() - t0))

        saved = FPWeights(model) if any(not isinstance(c, FP) for c in conditions) else None
        for cond in conditions:
            bar.set_description(cond.name)
            t0, nll, n = time.perf_counter(), 0.0, 0
            accs = [FeatureMoments.zeros(s.d_sae, device=device) for s in saes]
            kept: list[list[FeatureMoments]] = [[] for _ in saes]
            cond.apply(model)
            try:
                for (ids, mask), fp_xs in zip(_batches(blocks, batch_size, shard), cache):
                    xs, b_nll, b_n = forward(ids, mask)
                    for i, (sae, hook) in enumerate(zip(saes, hooks)):
                        prep = sae.normalise_input if sae.normalize != "none" else (lambda x: x)
                        m = encode_moments(prep(fp_xs[hook]), prep(xs[hook]), sae.W_enc, sae.b_enc, sae.b_dec,
                                           sae.threshold, sae.k)
                        accs[i] = accs[i].merge(m)
                        if keep_batches:
                            kept[i].append(m.to("cpu"))
                    nll, n = nll + b_nll, n + b_n
                    bar.update()
            finally:
                if saved is not None:
                    saved.restore()
            nll, n = shard.sum(nll, n)
            runs.append(ConditionRun(cond.name, cond, nll, int(n), time.perf_counter() - t0,
                                     [shard.merge(a) for a in accs], kept if keep_batches else []))
    bar.close()
    return runs
