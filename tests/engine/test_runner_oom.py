"""The out-of-memory retry runs outside the `except` block: while an exception is being handled its
traceback keeps the failed forward's frames (and their activations) alive, so a retry from inside the
handler would run with the failed batch's memory still held."""

import sys

import torch

from qdm_engine.engine.compression import RTN
from qdm_engine.engine.models import load_model
from qdm_engine.engine.runner import run_conditions
from qdm_engine.engine.sae import load_sae
from qdm_engine.engine.tokens import make_blocks, read_text


def test_retry_runs_with_no_exception_in_flight(tiny_llama, tiny_sae, text_file, monkeypatch):
    model, tok, _ = load_model(str(tiny_llama), progress=False)
    sae = load_sae(tiny_sae)
    blocks = make_blocks(tok, read_text(text_file), 32, 32 * 8, True)
    real_forward, seen = model.forward, []

    def flaky_forward(*a, **kw):  # more than 2 blocks at once runs out of memory
        seen.append((kw["input_ids"].shape[0], sys.exc_info()[0]))
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")
        return real_forward(*a, **kw)

    monkeypatch.setattr(model, "forward", flaky_forward)
    run_conditions(model, [sae], [sae.hook_name], blocks, [RTN(4)], 8, progress=False)
    assert [n for n, _ in seen[:3]] == [8, 4, 2]  # halved until it fits
    assert all(exc is None for _, exc in seen), [e for _, e in seen if e is not None][:1]
