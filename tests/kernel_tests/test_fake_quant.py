"""RTN fake quantization: the Triton kernel (through the interpreter) bit for bit against the torch
reference, the reference against an independent numpy float32 implementation of the documented
formulas, and the properties of the quantizer (levels, error bound, idempotence, zeros, ties)."""

import zlib

import numpy as np
import pytest
import torch

from qdm_engine.kernels import fake_quant as fq
from qdm_engine.kernels.backend import interpreting
from qdm_engine.kernels.fake_quant import fake_quant_reference, fake_quant_rtn, fake_quant_triton

# The kernels run on CPU tensors through the interpreter here; on a GPU machine with
# TRITON_INTERPRET=0 the same tests check the compiled kernels against the CPU reference.
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.2  # row scales differ
    return w.to(dtype)


def _assert_bitwise(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    same = a.view(_BITS_VIEW[a.dtype]) == b.view(_BITS_VIEW[b.dtype])
    if not bool(same.all()):
        diff = (a.float() - b.float()).abs()
        raise AssertionError(
            f"{int((~same).sum())} of {same.numel()} elements differ; max abs {diff.max().item():.3g}, "
            f"first at {tuple(int(i) for i in (~same).nonzero()[0])}: {a[~same][0].item()} vs {b[~same][0].item()}"
        )


def _kernel(w: torch.Tensor, bits: int, **kwargs) -> torch.Tensor:
    """The Triton launcher on DEVICE into a NaN-poisoned output (an unwritten element fails); result on CPU."""
    wd = w.to(DEVICE)
    out = torch.full_like(wd, float("nan"))
    assert fake_quant_triton(wd, bits, out=out, **kwargs) is out
    return out.cpu()


# (shape, group_size, block_n): one-block rows, rows looped over ragged column blocks, groups
CASES = [
    ((37, 200), None, None),  # row in one block, ragged rows and columns
    ((13, 200), None, 64),  # 200 = 3 * 64 + 8: the two-pass loop with a ragged last block
    ((9, 256), 32, None),
    ((7, 384), 64, None),
    ((5, 256), 128, 64),  # group rows longer than the block: looped
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,group_size,block_n", CASES)
def test_kernel_bit_exact_against_reference(dtype, symmetric, shape, group_size, block_n):
    w = _weight(shape, dtype, seed=zlib.crc32(repr((shape, group_size, dtype, symmetric)).encode()))
    w[3] = 0.0  # an all-zero row
    out = _kernel(w, 4, group_size=group_size, symmetric=symmetric, block_n=block_n)
    _assert_bitwise(out, fake_quant_reference(w, 4, group_size=group_size, symmetric=symmetric))


@pytest.mark.parametrize("bits", [2, 3, 6, 8, 16])
def test_kernel_bit_exact_across_bit_widths(bits):
    w = _weight((21, 96), torch.float32, seed=bits)
    for symmetric in (True, False):
        out = _kernel(w, bits, symmetric=symmetric, block_m=4)
        _assert_bitwise(out, fake_quant_reference(w, bits, symmetric=symmetric))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_in_place_and_non_contiguous(dtype):
    w = _weight((24, 80), dtype, seed=5)
    expected = fake_quant_reference(w, 5)
    inplace = w.clone().to(DEVICE)
    assert fake_quant_triton(inplace, 5, out=inplace) is inplace
    _assert_bitwise(inplace.cpu(), expected)
    wt = _weight((80, 24), dtype, seed=6).t()  # a transposed view: copied, quantized per row of the view
    _assert_bitwise(fake_quant_triton(wt.to(DEVICE), 5).cpu(), fake_quant_reference(wt, 5))


def test_kernel_rounds_half_to_even_with_torch_signed_zeros():
    # absmax 7 at 4 bits -> scale exactly 1: 0.5, 1.5, 2.5, -0.5, -2.5, 3.5 are exact ties
    row = [7.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -3.5, -0.25, -0.0, 0.0, 6.5]
    w = torch.tensor([row, [0.0] * len(row)], dtype=torch.float32)
    out = _kernel(w, 4)
    assert out[0].tolist() == [7.0, 0.0, 2.0, 2.0, -0.0, -2.0, 4.0, -4.0, -0.0, -0.0, 0.0, 6.0]
    assert torch.signbit(out[0, [4, 8, 9]]).all()  # torch.round keeps the sign of a zero
    assert torch.all(out[1] == 0)
    _assert_bitwise(out, fake_quant_reference(w, 4))


def test_kernel_asymmetric_ties_and_zero_point():
    # lo = -3, hi = 12 at 4 bits -> scale = 15 / 15 = 1, zero point 3; 0.5 and 4.5 are ties, 0 stays 0
    w = torch.tensor([[-3.0, 12.0, 0.5, 4.5, 0.0, -1.5, -0.2]])
    out = _kernel(w, 4, symmetric=False)
    assert out[0].tolist() == [-3.0, 12.0, 0.0, 4.0, 0.0, -2.0, 0.0]
    assert not torch.signbit(out[0, [2, 4, 6]]).any()  # asymmetric zeros are +0.0
    _assert_bitwise(out, fake_quant_reference(w, 4, symmetric=False))


# ----------------------------------------------------------------------------- the reference


def _numpy_fake_quant(w: np.ndarray, bits: int, group_size, symmetric) -> np.ndarray:
    """The module docstring's formulas, written again in numpy float32 (np.round: half to even)."""
    f32 = np.float32
    rows = w.astype(f32).reshape(-1, group_size or w.shape[1])
    if symmetric:
        qmax = f32(2 ** (bits - 1) - 1)
        scale = np.abs(rows).max(axis=1, keepdims=True) / qmax
        scale[scale == 0] = f32(1)
        q = np.clip(np.round(rows / scale), -qmax - f32(1), qmax)
        return (q * scale).reshape(w.shape)
    qmax = f32(2**bits - 1)
    lo = np.minimum(rows.min(axis=1, keepdims=True), f32(0))
    hi = np.maximum(rows.max(axis=1, keepdims=True), f32(0))
    scale = (hi - lo) / qmax
    scale[scale == 0] = f32(1)
    zp = np.clip(np.round(-lo / scale), f32(0), qmax)
    q = np.clip(np.round(rows / scale) + zp, f32(0), qmax)
    return ((q - zp) * scale).reshape(w.shape)


@pytest.mark.parametrize("group_size", [None, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_reference_matches_numpy_formula(group_size, symmetric, bits):
    w = _weight((17, 256), torch.float32, seed=bits * 7 + (group_size or 1))
    ref = fake_quant_reference(w, bits, group_size=group_size, symmetric=symmetric).numpy()
    np.testing.assert_array_equal(ref, _numpy_fake_quant(w.numpy(), bits, group_size, symmetric))


def _scales(w: torch.Tensor, bits: int, group_size, symmetric) -> torch.Tensor:
    rows = w.double().reshape(-1, group_size or w.shape[1])
    if symmetric:
        return rows.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
    return (rows.amax(1, keepdim=True).clamp(min=0) - rows.amin(1, keepdim=True).clamp(max=0)) / (2**bits - 1)


@pytest.mark.parametrize("group_size", [None, 32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_reference_properties(group_size, symmetric, bits):
    w = _weight((12, 256), torch.float32, seed=100 + bits)
    w[5] = 0.0
    q = fake_quant_reference(w, bits, group_size=group_size, symmetric=symmetric)
    g = group_size or w.shape[1]
    rows_w, rows_q = w.double().reshape(-1, g), q.double().reshape(-1, g)
    scale = _scales(w, bits, group_size, symmetric)
    for r in rows_q:  # at most 2^b distinct levels per row / group
        assert torch.unique(r).numel() <= 2**bits
    # |w - w'| <= scale / 2 (plus float32 rounding of the scale and the product)
    assert torch.all((rows_q - rows_w).abs() <= scale / 2 * (1 + 1e-5) + 1e-12)
    assert torch.all(q[5] == 0)  # a zero row stays zero
    # idempotent: quantizing again keeps every integer code (the scale may move by an ulp)
    q2 = fake_quant_reference(q, bits, group_size=group_size, symmetric=symmetric)
    np.testing.assert_allclose(q2.numpy(), q.numpy(), rtol=4e-7, atol=0)
    if not symmetric:  # zero is exactly representable
        w0 = w.clone()
        w0[:, ::7] = 0.0
        assert torch.all(fake_quant_reference(w0, bits, group_size=group_size, symmetric=False)[:, ::7] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_returns_model_dtype_of_float32_result(dtype):
    w = _weight((8, 64), dtype, seed=3)
    q = fake_quant_reference(w, 6)
    assert q.dtype == dtype
    _assert_bitwise(q, fake_quant_reference(w.float(), 6).to(dtype))


# ----------------------------------------------------------------------------- dispatch and errors


def test_dispatch_uses_reference_on_cpu_and_triton_when_told(monkeypatch):
    w = _weight((10, 48), torch.bfloat16, seed=9)
    calls = []
    real = fq.fake_quant_triton
    monkeypatch.setattr(fq, "fake_quant_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    _assert_bitwise(fake_quant_rtn(w, 4), fake_quant_reference(w, 4))
    assert not calls  # CPU tensors: the reference
    monkeypatch.setattr(fq, "use_triton", lambda *t: True)
    _assert_bitwise(fake_quant_rtn(w.to(DEVICE), 4, group_size=16, symmetric=False).cpu(),
                    fake_quant_reference(w, 4, group_size=16, symmetric=False))
    assert calls == [1]


@pytest.mark.parametrize("fn", [fake_quant_reference, fake_quant_triton])
@pytest.mark.parametrize(
    "weight,kwargs,message",
    [
        (torch.zeros(4), dict(bits=4), "2-D"),
        (torch.zeros(4, 4, dtype=torch.int32), dict(bits=4), "float32/bfloat16/float16"),
        (torch.zeros(4, 4), dict(bits=1), "bits must be an integer in 2..16"),
        (torch.zeros(4, 4), dict(bits=4.0), "bits must be an integer"),
        (torch.zeros(4, 48), dict(bits=4, group_size=32), "does not divide"),
        (torch.zeros(4, 48), dict(bits=4, group_size=0), "positive integer"),
        (torch.zeros(4, 4), dict(bits=4, out=torch.zeros(4, 5)), "shape and dtype"),
        (torch.zeros(4, 4), dict(bits=4, out=torch.zeros(4, 4, dtype=torch.float16)), "shape and dtype"),
    ],
)
def test_bad_inputs_raise(fn, weight, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fn(weight, **kwargs)


def test_launcher_rejects_cpu_without_interpreter_and_bad_blocks(monkeypatch):
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="power of two"):
        fake_quant_triton(w, 4, block_n=48)
    with pytest.raises(ValueError, match="contiguous"):
        fake_quant_triton(w, 4, out=torch.empty(8, 4).t())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fake_quant_triton(w, 4)
