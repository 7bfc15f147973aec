"""Chunked perplexity against transformers' own loss on the same blocks."""

import math

import torch

from qdm_engine.engine.models import load_model
from qdm_engine.engine.perplexity import nll_sum, perplexity


def test_token_weighted_nll_matches_hf_loss(tiny_llama):
    model, tok, _ = load_model(str(tiny_llama))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (5, 19), generator=g)
    with torch.no_grad():
        total, n = 0.0, 0
        for lo, hi in ((0, 3), (3, 5)):  # uneven batches: a mean of batch means would be wrong
            s, c = nll_sum(model(input_ids=ids[lo:hi]).logits, ids[lo:hi])
            total, n = total + s, n + c
        hf = model(input_ids=ids, labels=ids).loss.item()  # mean over all 5 x 18 targets
    assert n == 5 * 18
    assert math.isclose(total / n, hf, rel_tol=1e-5)
    assert math.isclose(perplexity(total, n), math.exp(hf), rel_tol=1e-5)
