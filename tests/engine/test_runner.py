"""The run loop's out-of-memory fallback: a batch retried in halves gives the same statistics."""

import pytest
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
    clean = run_conditions(*args, progress=False, splice=True)

    real_forward, calls = model.forward, []

    def flaky_forward(*a, **kw):  # any forward over more than 2 blocks runs out of memory
        calls.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")
        return real_forward(*a, **kw)

    monkeypatch.setattr(model, "forward", flaky_forward)
    retried = run_conditions(*args, progress=False, splice=True)
    # halved twice (the spliced forwards of the split parts too), then stays split
    assert calls[:2] == [6, 3] and max(calls[2:]) == 2, calls[:12]
    for a, b in zip(clean, retried):
        assert abs(a.nll - b.nll) < 1e-9 * abs(a.nll) and a.n_targets == b.n_targets
        for ma, mb in zip(a.moments, b.moments):
            torch.testing.assert_close(mb.pearson(), ma.pearson(), rtol=0, atol=1e-12, equal_nan=True)
            assert float(ma.n) == float(mb.n)
        for key, value in a.recon[0].items():  # reconstruction and spliced sums: nothing counted twice
            assert b.recon[0][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        for key, value in a.splice[0].items():
            assert b.splice[0][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_auto_batch_size(tiny_llama):
    from qdm_engine.engine.runner import auto_batch_size

    model, _, _ = load_model(str(tiny_llama), progress=False)
    assert auto_batch_size(model, 128, "cpu") == 8
    vocab, d = model.get_input_embeddings().weight.shape
    per_block = 128 * (vocab * 4 + 32 * d * 4) + 128 * vocab * 4
    assert auto_batch_size(model, 128, "cuda", free_bytes=4 * per_block * 10) == 10
    assert auto_batch_size(model, 128, "cuda", free_bytes=10) == 1
    assert auto_batch_size(model, 128, "cuda", free_bytes=10**15) == 512


class _HostReads:
    """Records, per op, the innermost calling frame outside torch of every op that reads a tensor's
    values back to the host (on a GPU each one stalls the host until the device catches up)."""

    OPS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default",
           "aten.nonzero.default", "aten.masked_select.default"}

    def __init__(self):
        import collections
        import traceback

        from torch.utils._python_dispatch import TorchDispatchMode

        self.seen = collections.Counter()
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                bool_index = str(func) == "aten.index.Tensor" and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))
                if str(func) in outer.OPS or bool_index:
                    frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename
                              and not f.filename.endswith("test_runner.py")]
                    who = frames[-1]
                    pkg = "transformers" if "/transformers/" in who.filename else (
                        "qdm_engine" if "/qdm_engine/" in who.filename else who.filename)
                    outer.seen[(str(func), pkg, f"{who.filename.rsplit('/', 1)[-1]}:{who.name}")] += 1
                return func(*args, **kwargs)

        self.mode = Mode()


def test_the_batch_loop_reads_nothing_back_to_the_host(tiny_llama, tiny_sae, text_file):
    """Within a condition, our code never reads a device value: the NLL sums and moments are read once
    per pass, however many batches there are, and scored positions are picked with indices computed from
    the host-side mask. (transformers' own mask code reads one value per forward; that is theirs.)"""
    model, tok, _ = load_model(str(tiny_llama), progress=False)
    sae = load_sae(tiny_sae)
    blocks = make_blocks(tok, read_text(text_file), 32, 32 * 12, True)
    conds = [RTN(4), RTN(8)]
    counts = {}
    for batch, splice in ((2, False), (6, True)):  # 6 and 2 batches per pass; the spliced forwards too
        rec = _HostReads()
        with rec.mode:
            run_conditions(model, [sae], [sae.hook_name], blocks, conds, batch, progress=False, splice=splice)
        ours = {k: v for k, v in rec.seen.items() if k[1] == "qdm_engine"}
        reads = {k: v for k, v in ours.items() if k[0] != "aten.nonzero.default"}
        # one read of the NLL sum per pass (FP + each condition), in run_conditions itself
        assert sum(reads.values()) == 1 + len(conds), reads
        assert all(k[2] == "runner.py:run_conditions" for k in reads), reads
        # nonzero only on the host mask, once per batch for the whole sweep
        nz = {k: v for k, v in ours.items() if k[0] == "aten.nonzero.default"}
        assert set(nz) == {("aten.nonzero.default", "qdm_engine", "runner.py:scored_index")}, nz
        assert sum(nz.values()) == 12 // batch
        counts[batch] = sum(v for k, v in rec.seen.items() if k[1] not in ("qdm_engine", "transformers"))
    assert counts == {2: 0, 6: 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the second stream is CUDA-only)")
@pytest.mark.parametrize("cache_on_host", [False, True])
def test_encode_overlap_on_a_second_stream_gives_identical_results(tiny_llama, text_file, monkeypatch, cache_on_host):
    """On a GPU: the second stream (and the FP cache in pinned host memory) changes no bit of any result.
    The SAE is built here, not with SAELens, so the test also runs on a GPU image without it."""
    import qdm_engine.engine.runner as runner
    from qdm_engine.engine.sae import SAEWeights

    if cache_on_host:
        monkeypatch.setattr(runner, "choose_cache", lambda *a: "host")
    model, tok, _ = load_model(str(tiny_llama), progress=False)
    model = model.to("cuda")
    d, hook = model.config.hidden_size, "blocks.1.hook_resid_post"
    g = torch.Generator().manual_seed(0)
    sae = SAEWeights(torch.randn(d, 256, generator=g) / d ** 0.5, -0.1 * torch.rand(256, generator=g),
                     torch.zeros(d), "standard", hook, None).to("cuda")
    blocks = make_blocks(tok, read_text(text_file), 32, 32 * 12, True)
    args = (model, [sae], [hook], blocks, [RTN(4), RTN(6)], 3, "cuda")
    serial = run_conditions(*args, progress=False, overlap=False)
    overlapped = run_conditions(*args, progress=False, overlap=True)
    for a, b in zip(serial, overlapped):
        assert a.nll == b.nll and a.n_targets == b.n_targets
        for ma, mb in zip(a.moments, b.moments):
            assert torch.equal(ma.pack(), mb.pack())
    assert 0.5 < float(serial[1].moments[0].pearson().nanmean()) <= 1.0
