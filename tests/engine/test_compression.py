"""RTN and pruning as applied to a model's targeted linears, and the FP restore between conditions."""

import math

import pytest
import torch

from qdm_testing import build_tiny_model
from qdm_engine.engine.compression import RTN, FPWeights, MagnitudePrune, parse_bits, target_weights
from qdm_engine.engine.models import load_model
from qdm_engine.errors import QdmError


def _weights(model):
    return {n: w.detach().clone() for n, w in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_rtn_properties_per_output_channel(tmp_path, family, bits):
    model, _, _ = load_model(str(build_tiny_model(tmp_path / family, family, seed=2)))
    before = _weights(model)
    RTN(bits).apply(model)
    after = _weights(model)
    targets = {n for n, _, _ in target_weights(model)}
    assert targets, "no targeted weights found"
    for name, w0 in before.items():
        if name not in targets:
            assert torch.equal(after[name], w0), f"{name} is not a target but changed"
            continue
        w1 = after[name]
        rows0, rows1 = (w0.t(), w1.t()) if family == "gpt2" else (w0, w1)  # Conv1D is [in, out]
        scale = rows0.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        for r0, r1 in zip(rows0, rows1):
            assert torch.unique(r1).numel() <= 2 ** bits
        assert torch.all((rows1 - rows0).abs() <= scale / 2 * (1 + 1e-6) + 1e-12)
        assert not torch.equal(w0, w1), f"{name} unchanged by RTN({bits})"


def test_rtn_idempotent_zero_rows_and_half_even(tiny_llama):
    model, _, _ = load_model(str(tiny_llama))
    name, w, _ = target_weights(model)[0]
    with torch.no_grad():
        w[0].zero_()
        # row 1: absmax 7 -> scale 1 at 4 bits; 0.5, 1.5, 2.5, -0.5, -2.5 are exact ties
        w[1].zero_()
        w[1, :6] = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -2.5])
    RTN(4).apply(model)
    assert torch.all(w[0] == 0)
    assert w[1, :6].tolist() == [7.0, 0.0, 2.0, 2.0, -0.0, -2.0]
    once = w.detach().clone()
    RTN(4).apply(model)
    assert torch.equal(w, once)


@pytest.mark.parametrize("s", [0.0, 0.175, 0.5, 0.9])
def test_pruning_zeroes_exactly_floor_s_numel(tiny_llama, s):
    model, _, _ = load_model(str(tiny_llama))
    with torch.no_grad():  # many ties in |w| and no zeros, so a '<= kth value' rule would over-prune
        for _, w, _ in target_weights(model):
            w.copy_(torch.sign(w) * torch.ceil(w.abs() * 20) / 20)
            assert int((w == 0).sum()) == 0
    before = {n: w.detach().clone() for n, w, _ in target_weights(model)}
    MagnitudePrune(s).apply(model)
    for n, w, _ in target_weights(model):
        k = math.floor(s * w.numel())
        assert int((w == 0).sum()) == k, n
        kept, dropped = before[n][w != 0].abs(), before[n][w == 0].abs()
        if k and kept.numel():
            assert dropped.max() <= kept.min()  # only the smallest magnitudes go
        assert torch.equal(w[w != 0], before[n][w != 0])


def test_restore_brings_back_fp_bitwise(tiny_llama):
    model, _, _ = load_model(str(tiny_llama))
    before = _weights(model)
    saved = FPWeights(model)
    for cond in (RTN(3), MagnitudePrune(0.6)):
        cond.apply(model)
        saved.restore()
        for name, w in model.named_parameters():
            assert torch.equal(w, before[name]), name


def test_parse_bits():
    assert parse_bits("8..4") == [8, 7, 6, 5, 4]
    assert parse_bits("4..6") == [4, 5, 6]
    assert parse_bits("8,6,4") == [8, 6, 4]
    for bad, msg in (("1..4", "1 is outside 2..16"), ("17", "17 is outside 2..16"), ("x", "cannot read"), ("", "names no")):
        with pytest.raises(QdmError, match=msg):
            parse_bits(bad)
    with pytest.raises(QdmError, match="sparsity"):
        MagnitudePrune(1.0)
