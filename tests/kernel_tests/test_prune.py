"""Magnitude pruning: exactly floor(s * numel) zeros with ties broken by index, and the Triton
mask-apply kernel (through the interpreter) bit for bit against the torch reference."""

import math

import numpy as np
import pytest
import torch

from qdm_engine.kernels import prune
from qdm_engine.kernels.backend import interpreting
from qdm_engine.kernels.prune import (
    apply_mask_reference,
    apply_mask_triton,
    magnitude_prune,
    magnitude_prune_mask_reference,
    magnitude_prune_reference,
    magnitude_prune_triton,
    prune_count,
)

# CPU tensors through the interpreter here; CUDA tensors on a GPU machine with TRITON_INTERPRET=0.
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _tied_weight(shape, dtype, seed):
    """Random signs, magnitudes on a coarse grid: many exact ties in |w|, no zeros."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.randint(1, 12, shape, generator=g).float() / 16
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return (mag * sign).to(dtype)


def _assert_bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(_BITS_VIEW[a.dtype]), b.view(_BITS_VIEW[b.dtype])), "bit patterns differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.175, 0.5, 0.93])
def test_exactly_floor_s_numel_zeros_with_ties(dtype, sparsity):
    w = _tied_weight((29, 53), dtype, seed=int(sparsity * 1000))
    k = math.floor(sparsity * w.numel())
    out = torch.full_like(w, float("nan"), device=DEVICE)  # poisoned: an unwritten element fails
    magnitude_prune_triton(w.to(DEVICE), sparsity, out=out)
    out = out.cpu()
    assert int((out == 0).sum()) == k
    kept, dropped = w[out != 0].float().abs(), w[out == 0].float().abs()
    if k:
        assert dropped.max() <= kept.min()  # only the smallest magnitudes go
    _assert_bitwise(out[out != 0], w[out != 0])  # survivors untouched
    _assert_bitwise(out, magnitude_prune_reference(w, sparsity))


def test_ties_broken_by_flat_index():
    w = torch.full((4, 5), 0.25, dtype=torch.bfloat16)
    w[0, 0] = 1.0
    mask = magnitude_prune_mask_reference(w, 0.5)  # k = 10: the first 10 of the 19 tied 0.25s
    expected = torch.ones(20, dtype=torch.bool)
    expected[1:11] = False
    assert torch.equal(mask.flatten(), expected)
    out = torch.full_like(w, float("nan"), device=DEVICE)
    magnitude_prune_triton(w.to(DEVICE), 0.5, out=out)
    assert torch.equal(out.cpu() != 0, expected.view(4, 5))


def test_selection_matches_numpy_stable_argsort():
    w = _tied_weight((40, 41), torch.float16, seed=3)
    k = prune_count(w.numel(), 0.37)
    order = np.argsort(np.abs(w.float().numpy()).ravel(), kind="stable")
    expected = np.ones(w.numel(), dtype=bool)
    expected[order[:k]] = False
    np.testing.assert_array_equal(magnitude_prune_mask_reference(w, 0.37).numpy().ravel(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [None, 64, 256])
def test_apply_mask_kernel_bit_exact_ragged(dtype, block):
    g = torch.Generator().manual_seed(17)
    w = torch.randn(23, 37, generator=g).to(dtype)  # 851 elements: no block divides it
    w[0, :4] = -0.0  # a kept -0.0 must stay -0.0
    keep = torch.rand(23, 37, generator=g) < 0.6
    keep[0, :4] = True
    out = torch.full_like(w, float("nan"), device=DEVICE)
    apply_mask_triton(w.to(DEVICE), keep.to(DEVICE), out=out, block=block)
    out = out.cpu()
    _assert_bitwise(out, apply_mask_reference(w, keep))
    assert torch.signbit(out[0, :4]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_and_non_contiguous(dtype):
    w = _tied_weight((31, 17), dtype, seed=8)
    expected = magnitude_prune_reference(w, 0.4)
    inplace = w.clone().to(DEVICE)
    res = magnitude_prune_triton(inplace, 0.4, out=inplace)
    assert res is inplace
    _assert_bitwise(inplace.cpu(), expected)
    wt = _tied_weight((17, 31), dtype, seed=9).t()
    _assert_bitwise(magnitude_prune_triton(wt.to(DEVICE), 0.4).cpu(), magnitude_prune_reference(wt, 0.4))
    ref_inplace = w.clone()
    magnitude_prune_reference(ref_inplace, 0.4, out=ref_inplace)
    _assert_bitwise(ref_inplace, expected)


def test_dispatch_uses_reference_on_cpu_and_triton_when_told(monkeypatch):
    w = _tied_weight((12, 20), torch.float16, seed=1)
    calls = []
    real = prune.magnitude_prune_triton
    monkeypatch.setattr(prune, "magnitude_prune_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    _assert_bitwise(magnitude_prune(w, 0.3), magnitude_prune_reference(w, 0.3))
    assert not calls
    monkeypatch.setattr(prune, "use_triton", lambda *t: True)
    _assert_bitwise(magnitude_prune(w.to(DEVICE), 0.3).cpu(), magnitude_prune_reference(w, 0.3))
    assert calls == [1]


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: magnitude_prune_reference(torch.ones(3, 3), 1.0), r"sparsity must be in \[0, 1\)"),
        (lambda: magnitude_prune_triton(torch.ones(3, 3), -0.1), r"sparsity must be in \[0, 1\)"),
        (lambda: magnitude_prune_reference(torch.ones(3, 3, dtype=torch.int64), 0.5), "float32/bfloat16/float16"),
        (lambda: apply_mask_triton(torch.ones(3, 3), torch.ones(3, 3)), "bool tensor"),
        (lambda: apply_mask_triton(torch.ones(3, 3), torch.ones(3, 2, dtype=torch.bool)), "bool tensor"),
        (lambda: apply_mask_reference(torch.ones(3, 3), torch.ones(3, 3, dtype=torch.bool),
                                      out=torch.ones(3, 3, dtype=torch.float16)), "shape and dtype"),
        (lambda: apply_mask_triton(torch.ones(3, 3), torch.ones(3, 3, dtype=torch.bool), block=100), "power of two"),
    ],
)
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
