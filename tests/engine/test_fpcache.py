"""The FP read-out cache on disk gives bitwise the results of the cache in memory; the choice of place."""

import pytest
import torch

from qdm_engine.engine import fpcache
from qdm_engine.engine.compression import RTN
from qdm_engine.engine.models import load_model
from qdm_engine.engine.runner import run_conditions
from qdm_engine.engine.sae import load_sae
from qdm_engine.engine.tokens import make_blocks, read_text


def test_disk_cache_is_bitwise_the_memory_cache(tiny_llama, tiny_sae, text_file, tmp_path):
    model, tok, _ = load_model(str(tiny_llama), progress=False)
    sae = load_sae(tiny_sae)
    blocks = make_blocks(tok, read_text(text_file), 32, 32 * 11, True)  # 11 blocks: a ragged last batch
    args = (model, [sae], [sae.hook_name], blocks, [RTN(4), RTN(8)], 3)
    logged = []
    mem = run_conditions(*args, progress=False, cache="memory", log=logged.append)
    disk = run_conditions(*args, progress=False, cache="disk", cache_dir=tmp_path / "c", log=logged.append)
    assert len(logged) == 1 and logged[0].startswith("FP read-out cache on disk (0.0 MiB in ")
    assert not list((tmp_path / "c").glob("*"))  # a cache outside a resumable run is removed after use
    for a, b in zip(mem, disk):
        assert a.nll == b.nll and a.n_targets == b.n_targets
        for ma, mb in zip(a.moments, b.moments):
            assert torch.equal(ma.pack(), mb.pack())
        for ua, ub in zip(a.unit_moments, b.unit_moments):
            assert torch.equal(ua, ub)
    assert 0.5 < float(mem[1].moments[0].pearson().nanmean()) <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_disk_round_trip_keeps_every_bit(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    rows = [5, 7, 3]
    cache = fpcache.FPCache("disk", ["a", "b"], rows, 24, dtype, "cpu", folder=tmp_path)
    data = [{h: torch.randn(r, 24, generator=g).to(dtype) for h in "ab"} for r in rows]
    for b in (2, 0, 1):  # any order
        cache.put(b, data[b])
    for b in range(3):
        got = cache.get(b)
        for h in "ab":
            assert got[h].dtype == dtype and torch.equal(got[h].view(torch.uint8), data[b][h].view(torch.uint8))
    cache.close()
    assert not list(tmp_path.glob("fp-cache-*"))


def test_auto_spills_to_disk_when_memory_is_short(monkeypatch):
    monkeypatch.setattr(fpcache, "host_available_bytes", lambda: 10 * 2**30)
    assert fpcache.choose("auto", 4 * 2**30, "cpu") == "host"
    assert fpcache.choose("auto", 6 * 2**30, "cpu") == "disk"
    assert fpcache.choose("memory", 6 * 2**30, "cpu") == "host"
    assert fpcache.choose("disk", 1, "cpu") == "disk"
