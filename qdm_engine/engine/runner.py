"""The sweep's model loop: one FP pass, then one pass per compression condition.

The FP pass reads the residual stream at the SAE's site and the logits for perplexity from the same
forward, and caches the FP read-out of the scored positions (BOS dropped), so no condition reruns the
FP model. Each condition then compresses the targeted weights in place, runs the same token batches,
and streams (FP, compressed) read-out pairs through the fused encode + moments op; the FP weights are
restored afterwards. Nothing of size tokens x features is ever held beyond one batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qdm_engine.engine.compression import FP, FPWeights
from qdm_engine.engine.models import read_out
from qdm_engine.engine.perplexity import nll_sum
from qdm_engine.engine.sae import SAEWeights
from qdm_engine.engine.tokens import TokenBlocks
from qdm_engine.kernels.encode_moments import encode_moments
from qdm_engine.kernels.moments import FeatureMoments


@dataclass
class ConditionRun:
    name: str
    condition: object
    nll: float
    n_targets: int
    seconds: float
    moments: FeatureMoments | None = None  # None for the FP reference itself


def _batches(blocks: TokenBlocks, batch_size: int):
    for lo in range(0, blocks.n_blocks, batch_size):
        yield blocks.ids[lo:lo + batch_size], blocks.score_mask[lo:lo + batch_size]


def _forward(model, ids: torch.Tensor, ro) -> tuple[torch.Tensor, float, int]:
    logits = model(input_ids=ids, use_cache=False).logits
    nll, n = nll_sum(logits, ids)
    return ro.value, nll, n


def run_conditions(
    model: torch.nn.Module,
    sae: SAEWeights,
    blocks: TokenBlocks,
    conditions: list,
    hook: str,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
) -> list[ConditionRun]:
    """Run FP then every condition over the same blocks; returns one ConditionRun per row, FP first.

    An `FP()` among `conditions` is the FP-vs-FP null: the FP model is run again like any condition.
    """
    n_batches = -(-blocks.n_blocks // batch_size)
    bar = tqdm(total=n_batches * (1 + len(conditions)), unit="batch", disable=not progress, dynamic_ncols=True)
    enc = (sae.W_enc, sae.b_enc, sae.b_dec, sae.threshold, sae.k)
    prep = (lambda x: x) if sae.normalize == "none" else sae.normalise_input
    runs: list[ConditionRun] = []
    cache: list[torch.Tensor] = []
    with torch.inference_mode(), read_out(model, hook) as ro:
        bar.set_description("fp")
        t0, nll, n = time.perf_counter(), 0.0, 0
        for ids, mask in _batches(blocks, batch_size):
            x, b_nll, b_n = _forward(model, ids.to(device), ro)
            cache.append(x.reshape(-1, x.shape[-1])[mask.flatten().to(device)])
            nll, n = nll + b_nll, n + b_n
            bar.update()
        runs.append(ConditionRun("fp", FP(), nll, n, time.perf_counter() - t0))

        saved = FPWeights(model)
        for cond in conditions:
            bar.set_description(cond.name)
            t0, nll, n = time.perf_counter(), 0.0, 0
            acc = FeatureMoments.zeros(sae.d_sae, device=device)
            cond.apply(model)
            try:
                for (ids, mask), x_fp in zip(_batches(blocks, batch_size), cache):
                    x, b_nll, b_n = _forward(model, ids.to(device), ro)
                    x_c = x.reshape(-1, x.shape[-1])[mask.flatten().to(device)]
                    acc = acc.merge(encode_moments(prep(x_fp), prep(x_c), *enc))
                    nll, n = nll + b_nll, n + b_n
                    bar.update()
            finally:
                saved.restore()
            runs.append(ConditionRun(cond.name, cond, nll, n, time.perf_counter() - t0, acc))
    bar.close()
    return runs
