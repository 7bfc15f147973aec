"""The run loop's out-of-memory fallback: a batch retried in halves gives the same statistics."""

import torch

from qdm_engine.engine.compression import RTN
from qdm_engine.engine.models import load_model
from qdm_engine.engine.runner import run_conditions
from qdm_engine.engine.sae import load_sae
from qdm_engine.engine.tokens import make_blocks, read_text


def test_oom_retry_in_halves_gives_identical_results(tiny_llama, tiny_sae, text_file, monkeypatch):
    model, tok, _ = load_model(str(tiny_llama), progress=False)
    sae = load_sae(tiny_sae)
    blocks = make_blocks(tok, read_text(text_file), 32, 32 * 12, True)
    args = (model, [sae], [sae.hook_name], blocks, [RTN(4)], 6)
    clean = run_conditions(*args, progress=False)

    real_forward, calls = model.forward, []

    def flaky_forward(*a, **kw):  # any forward over more than 2 blocks runs out of memory
        calls.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")
        return real_forward(*a, **kw)

    monkeypatch.setattr(model, "forward", flaky_forward)
    retried = run_conditions(*args, progress=False)
    assert calls[:5] == [6, 3, 2, 2, 2] and max(calls[5:]) == 2  # halved twice, then stays split
    for a, b in zip(clean, retried):
        assert abs(a.nll - b.nll) < 1e-9 * abs(a.nll) and a.n_targets == b.n_targets
        for ma, mb in zip(a.moments, b.moments):
            torch.testing.assert_close(mb.pearson(), ma.pearson(), rtol=0, atol=1e-12, equal_nan=True)
            assert float(ma.n) == float(mb.n)


def test_auto_batch_size(tiny_llama):
    from qdm_engine.engine.runner import auto_batch_size

    model, _, _ = load_model(str(tiny_llama), progress=False)
    assert auto_batch_size(model, 128, "cpu") == 8
    vocab, d = model.get_input_embeddings().weight.shape
    per_block = 128 * (vocab * 4 + 32 * d * 4) + 128 * vocab * 4
    assert auto_batch_size(model, 128, "cuda", free_bytes=4 * per_block * 10) == 10
    assert auto_batch_size(model, 128, "cuda", free_bytes=10) == 1
    assert auto_batch_size(model, 128, "cuda", free_bytes=10**15) == 512
