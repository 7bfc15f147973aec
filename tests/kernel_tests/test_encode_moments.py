"""The fused paired encode + moments kernel (through the interpreter) against float64 numpy moments.

Most tests use "dyadic" SAEs and read-outs: every value is a small multiple of a power of two, so each
partial sum of the encoder GEMM is exact in float32 whatever the order, and the kernel's activations are
bitwise the reference's. Any difference in the moments is then the kernel's reduction alone, and is held
to the float64 reference at 1e-6 in r."""

import numpy as np
import pytest
import torch

from qdm_engine.kernels import encode_moments as em
from qdm_engine.kernels.backend import interpreting
from qdm_engine.kernels.encode_moments import (
    encode_moments,
    encode_moments_partials_triton,
    encode_moments_reference,
    encode_moments_triton,
    merge_partials,
    sae_encode_reference,
)
from qdm_engine.kernels.moments import FeatureMoments

# CPU tensors through the interpreter here; CUDA tensors on a GPU machine with TRITON_INTERPRET=0
# (the dyadic inputs stay exact under tf32x3 too: their tf32 splits have no low part).
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
BLOCKS = dict(block_t=32, block_f=32, block_d=32)  # 100 tokens, d 48, F 80: no dimension a multiple
LARGE = [0, 1, 2]  # features with mean ~3e4 and spread ~1e-2


def _dyadic_case(seed, t=100, d=48, f=80, dtype=torch.float32, w_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ri = lambda lo, hi, shape: torch.randint(lo, hi, shape, generator=g).float()  # noqa: E731
    x_fp = ri(-8, 9, (t, d)) / 8
    x_c = x_fp + ri(-1, 2, (t, d)) / 8  # the compressed read-out: a perturbed copy
    W = ri(-8, 9, (d, f)) / 64
    W[:, LARGE] = ri(-8, 9, (d, len(LARGE))) / 1024
    b_dec = ri(-4, 5, (d,)) / 8
    b_enc = torch.rand(f, generator=g) - 0.6  # continuous: pre-activations never tie
    b_enc[LARGE] = 3e4 + torch.rand(len(LARGE), generator=g)
    threshold = 0.4 * torch.rand(f, generator=g)
    mask = torch.rand(t, generator=g) > 0.15
    return dict(x_fp=x_fp.to(dtype), x_c=x_c.to(dtype), W_enc=W.to(w_dtype), b_enc=b_enc, b_dec=b_dec,
                threshold=threshold, mask=mask)


def _dev(*tensors):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]


def _fused(x_fp, x_c, W_enc, b_enc, b_dec, threshold=None, k=None, mask=None, **launch) -> FeatureMoments:
    """The fused kernel on DEVICE; moments back on CPU."""
    args = _dev(x_fp, x_c, W_enc, b_enc, b_dec, threshold, k, mask)
    return encode_moments_triton(*args, **launch).to("cpu")


def _float64_moments(fx: np.ndarray, fy: np.ndarray) -> dict:
    """Moments of float64 activation matrices [N, F], by plain two-pass numpy."""
    mx, my = fx.mean(0), fy.mean(0)
    dx, dy = fx - mx, fy - my
    m2x, m2y, cxy = (dx * dx).sum(0), (dy * dy).sum(0), (dx * dy).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where((m2x > 0) & (m2y > 0), cxy / np.sqrt(m2x * m2y), np.nan)
    return dict(n=fx.shape[0], mean_x=mx, mean_y=my, m2x=m2x, m2y=m2y, cxy=cxy, r=r,
                fires_x=(fx > 0).sum(0), fires_y=(fy > 0).sum(0), max_x=fx.max(0, initial=-np.inf))


def _expected(case, threshold=None, k=None, mask=None, rows=slice(None)):
    x_fp, x_c = case["x_fp"][rows], case["x_c"][rows]
    if mask is not None:
        x_fp, x_c = x_fp[mask[rows]], x_c[mask[rows]]
    enc = lambda x: sae_encode_reference(x, case["W_enc"], case["b_enc"], case["b_dec"], threshold, k)  # noqa: E731
    return _float64_moments(enc(x_fp).double().numpy(), enc(x_c).double().numpy())


def _assert_moments(m: FeatureMoments, ref: dict, r_atol=1e-6, exact_counts=True):
    assert not torch.isnan(m.pack()).any(), "a moment slot was never written (NaN poison survived)"
    assert float(m.n) == ref["n"]
    r = m.pearson().numpy()
    np.testing.assert_array_equal(np.isnan(r), np.isnan(ref["r"]))
    ok = ~np.isnan(ref["r"])
    assert ok.sum() > 10
    np.testing.assert_allclose(r[ok], ref["r"][ok], rtol=0, atol=r_atol)
    # the tile reduction is float64 on exact deviations: only float64 rounding is left
    np.testing.assert_allclose(m.mean_x.numpy(), ref["mean_x"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(m.mean_y.numpy(), ref["mean_y"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(m.m2x.numpy(), ref["m2x"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m.m2y.numpy(), ref["m2y"], rtol=1e-9, atol=1e-12)
    scale = np.sqrt(ref["m2x"] * ref["m2y"])
    assert np.all(np.abs(m.cxy.numpy() - ref["cxy"]) <= 1e-9 * scale + 1e-12), "cxy"
    if exact_counts:
        np.testing.assert_array_equal(m.fires_x.numpy(), ref["fires_x"])
        np.testing.assert_array_equal(m.fires_y.numpy(), ref["fires_y"])
        np.testing.assert_array_equal(m.max_x.numpy(), ref["max_x"])


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_matches_float64_reference(activation, use_mask):
    case = _dyadic_case(seed=1 + 2 * use_mask + 10 * len(activation))
    threshold = case["threshold"] if activation == "jumprelu" else None
    k = 7 if activation == "topk" else None
    mask = case["mask"] if use_mask else None
    m = _fused(case["x_fp"], case["x_c"], case["W_enc"], case["b_enc"], case["b_dec"],
                              threshold, k, mask, **BLOCKS, tokens_per_group=40)
    _assert_moments(m, _expected(case, threshold, k, mask))


@pytest.mark.parametrize("dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                           (torch.bfloat16, torch.float16)])
def test_half_precision_inputs(dtype, w_dtype):
    case = _dyadic_case(seed=5, dtype=dtype, w_dtype=w_dtype)
    # tf32x3: exact on dyadic inputs, so the reduction alone is tested (the bf16 split paths fold b_dec
    # into the bias, a second rounding: they are held to float64 in test_split_paths_against_float64)
    m = _fused(case["x_fp"], case["x_c"], case["W_enc"], case["b_enc"].to(dtype),
                              case["b_dec"].to(dtype), case["threshold"].to(dtype), None, case["mask"], **BLOCKS,
                              precision="tf32x3")
    case["b_enc"], case["b_dec"] = case["b_enc"].to(dtype), case["b_dec"].to(dtype)
    _assert_moments(m, _expected(case, case["threshold"].to(dtype), None, case["mask"]))


def test_large_mean_small_variance_features():
    """Features 0-2 have mean ~3e4 and spread ~1e-2 (variance / mean^2 ~ 1e-13). The kernel's shifted
    float32 tile sums with float64 merges hold r to 1e-6; float32 raw sums cannot even get its sign."""
    case = _dyadic_case(seed=7, t=150)
    m = _fused(case["x_fp"], case["x_c"], case["W_enc"], case["b_enc"], case["b_dec"],
                              **BLOCKS, tokens_per_group=64)
    ref = _expected(case)
    _assert_moments(m, ref)
    assert np.all(ref["mean_x"][LARGE] > 2.9e4) and np.all(np.sqrt(ref["m2x"][LARGE] / ref["n"]) < 0.05)
    assert np.all(np.abs(ref["r"][LARGE]) > 0.3)  # genuinely correlated, so r is a real test
    r = m.pearson().numpy()[LARGE]
    np.testing.assert_allclose(r, ref["r"][LARGE], rtol=0, atol=1e-6)
    # the naive float32 formula on the same activations, for contrast: wrong by far more than 1e-6
    fx = sae_encode_reference(case["x_fp"], case["W_enc"], case["b_enc"], case["b_dec"])[:, LARGE]
    fy = sae_encode_reference(case["x_c"], case["W_enc"], case["b_enc"], case["b_dec"])[:, LARGE]
    n = torch.tensor(float(fx.shape[0]))
    sxx = (fx * fx).sum(0) - fx.sum(0) ** 2 / n
    syy = (fy * fy).sum(0) - fy.sum(0) ** 2 / n
    sxy = (fx * fy).sum(0) - fx.sum(0) * fy.sum(0) / n
    naive = (sxy / torch.sqrt((sxx * syy).abs())).numpy()
    assert np.all(~np.isfinite(naive) | (np.abs(naive - ref["r"][LARGE]) > 1e-2))


def test_batches_merged_in_any_split_and_group_size():
    case = _dyadic_case(seed=11, t=130)
    args = (case["W_enc"], case["b_enc"], case["b_dec"], case["threshold"])
    ref = _expected(case, case["threshold"], None, case["mask"])

    def run(lo, hi, **kw):
        sl = slice(lo, hi)
        return _fused(case["x_fp"][sl], case["x_c"][sl], *args, None, case["mask"][sl], **kw)

    whole = run(0, 130, block_t=16, block_f=16, block_d=16, tokens_per_group=48)  # ragged groups
    _assert_moments(whole, ref)
    left = run(0, 17, **BLOCKS).merge(run(17, 64, **BLOCKS))
    split = left.merge(run(64, 130, **BLOCKS))
    _assert_moments(split, ref)
    other = run(90, 130, **BLOCKS).merge(run(0, 90, **BLOCKS, tokens_per_group=33))
    _assert_moments(other, ref)
    r1, r2 = whole.pearson(), other.pearson()
    ok = ~torch.isnan(r1)
    assert torch.allclose(r1[ok], r2[ok], rtol=0, atol=1e-6)


def test_each_group_slot_holds_its_own_tokens():
    case = _dyadic_case(seed=13, t=100)
    args = _dev(case["x_fp"], case["x_c"], case["W_enc"], case["b_enc"], case["b_dec"], None, None, case["mask"])
    part = encode_moments_partials_triton(*args, **BLOCKS, tokens_per_group=40).cpu()
    assert part.shape == (3, 9, 80) and not torch.isnan(part).any()
    for g, (lo, hi) in enumerate([(0, 40), (40, 80), (80, 100)]):
        ref = _expected(case, mask=case["mask"], rows=slice(lo, hi))
        slot = FeatureMoments.unpack(part[g])
        assert float(slot.n) == ref["n"]
        np.testing.assert_array_equal(slot.fires_x.numpy(), ref["fires_x"])
        np.testing.assert_allclose(slot.mean_y.numpy(), ref["mean_y"], rtol=1e-12, atol=1e-15)
    m = merge_partials(part)
    assert float(m.n) == int(case["mask"].sum())


def test_random_inputs_agree_with_reference_backend():
    g = torch.Generator().manual_seed(21)
    t, d, f = 90, 40, 70
    x_fp = torch.randn(t, d, generator=g)
    x_c = x_fp + 0.3 * torch.randn(t, d, generator=g)
    W, b_enc, b_dec = torch.randn(d, f, generator=g) / d**0.5, 0.2 * torch.randn(f, generator=g), torch.randn(d, generator=g)
    mask = torch.rand(t, generator=g) > 0.1
    m = _fused(x_fp, x_c, W, b_enc, b_dec, None, None, mask)  # the interpreter's default tile
    ref = encode_moments_reference(x_fp, x_c, W, b_enc, b_dec, None, None, mask)
    # the two GEMMs round differently (~1e-7 relative), so compare r, not bits
    r, r_ref = m.pearson(), ref.pearson()
    assert torch.equal(torch.isnan(r), torch.isnan(r_ref))
    ok = ~torch.isnan(r_ref)
    assert torch.allclose(r[ok], r_ref[ok], rtol=0, atol=1e-5)
    assert torch.allclose(m.mean_x, ref.mean_x, rtol=1e-5, atol=1e-7)
    assert float(m.n) == float(ref.n)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_fp_vs_fp_null_is_one(activation):
    g = torch.Generator().manual_seed(31)
    x = torch.randn(100, 48, generator=g)
    W, b_enc, b_dec = torch.randn(48, 80, generator=g) / 7, 0.1 * torch.randn(80, generator=g), torch.randn(48, generator=g)
    k = 9 if activation == "topk" else None
    m = _fused(x, x.clone(), W, b_enc, b_dec, None, k, None, **BLOCKS, tokens_per_group=48)
    r = m.pearson()
    live = ~torch.isnan(r)
    assert int(live.sum()) > 20
    assert torch.all((r[live] - 1.0).abs() <= 1e-6)
    assert torch.equal(m.m2x, m.cxy) and torch.equal(m.m2x, m.m2y)  # in fact bitwise identical sums


def test_determinism_two_launches_bitwise_equal():
    case = _dyadic_case(seed=41)
    g = torch.Generator().manual_seed(42)
    x_c = case["x_c"] + 0.01 * torch.randn(case["x_c"].shape, generator=g)  # not dyadic: real rounding
    kw = dict(mask=case["mask"], **BLOCKS, tokens_per_group=40)
    a = _fused(case["x_fp"], x_c, case["W_enc"], case["b_enc"], case["b_dec"], **kw)
    b = _fused(case["x_fp"], x_c, case["W_enc"], case["b_enc"], case["b_dec"], **kw)
    assert torch.equal(a.pack(), b.pack())


def test_topk_bitmask_has_exactly_k_per_token():
    case = _dyadic_case(seed=51, f=70)
    bits = em._topk_bitmask(case["x_fp"], case["W_enc"], case["b_enc"], case["b_dec"], k=5, chunk=17)
    assert bits.shape == (100, 3) and bits.dtype == torch.int32
    unpacked = (bits.to(torch.int64)[:, :, None] >> torch.arange(32)) & 1  # [T, words, 32]
    sel = unpacked.reshape(100, -1)[:, :70].bool()
    assert torch.all(sel.sum(1) == 5) and not unpacked.reshape(100, -1)[:, 70:].any()
    acts = sae_encode_reference(case["x_fp"], case["W_enc"], case["b_enc"], case["b_dec"], k=5)
    assert torch.all(sel | (acts == 0))  # every nonzero reference activation is selected


def test_empty_inputs():
    case = _dyadic_case(seed=61, t=40)
    none = torch.zeros(40, dtype=torch.bool)
    m = _fused(case["x_fp"], case["x_c"], case["W_enc"], case["b_enc"], case["b_dec"],
                              mask=none, **BLOCKS)
    assert float(m.n) == 0 and torch.all(m.max_x == float("-inf")) and torch.all(m.fires_x == 0)
    e = _fused(case["x_fp"][:0], case["x_c"][:0], case["W_enc"], case["b_enc"], case["b_dec"])
    assert float(e.n) == 0 and e.n_features == 80


def test_dispatch_uses_reference_on_cpu_and_triton_when_told(monkeypatch):
    case = _dyadic_case(seed=71, t=64)
    args = (case["x_fp"], case["x_c"], case["W_enc"], case["b_enc"], case["b_dec"])
    calls = []
    real = em.encode_moments_triton
    monkeypatch.setattr(em, "encode_moments_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref = encode_moments(*args, mask=case["mask"])
    assert not calls
    monkeypatch.setattr(em, "use_triton", lambda *t: True)
    fused = encode_moments(*_dev(*args), mask=case["mask"].to(DEVICE)).to("cpu")
    assert calls == [1]
    ok = ~torch.isnan(ref.pearson())
    assert torch.allclose(fused.pearson()[ok], ref.pearson()[ok], rtol=0, atol=1e-6)


def _bad(**over):
    case = _dyadic_case(seed=81, t=8, d=16, f=16)
    kw = dict(x_fp=case["x_fp"], x_c=case["x_c"], W_enc=case["W_enc"], b_enc=case["b_enc"], b_dec=case["b_dec"])
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (_bad(x_c=torch.zeros(8, 15)), r"must both be \[T, d\]"),
        (_bad(W_enc=torch.zeros(15, 16)), "does not match W_enc"),
        (_bad(b_enc=torch.zeros(15)), r"b_enc must have shape \(16,\)"),
        (_bad(b_dec=torch.zeros(16, 1)), r"b_dec must have shape \(16,\)"),
        (_bad(threshold=torch.zeros(16), k=2), "either JumpReLU"),
        (_bad(k=17), r"k must be an integer in 1..16"),
        (_bad(k=0), r"k must be an integer in 1..16"),
        (_bad(mask=torch.ones(8)), "mask must be a bool tensor"),
        (_bad(threshold=torch.zeros(3)), r"threshold must be a tensor of shape \(16,\)"),
    ],
)
@pytest.mark.parametrize("fn", [encode_moments_reference, encode_moments_triton])
def test_bad_inputs_raise(fn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fn(**kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (_bad(x_fp=torch.zeros(8, 16, dtype=torch.float64), x_c=torch.zeros(8, 16, dtype=torch.float64)),
         "x_fp must be float32/bfloat16/float16"),
        (_bad(precision="fp64"), "precision must be one of"),
        (_bad(block_t=32), "give block_t, block_f and block_d together"),
        (_bad(block_t=8, block_f=16, block_d=16), "powers of two >= 16"),
        (_bad(tokens_per_group=0), "tokens_per_group must be a positive integer"),
    ],
)
def test_launcher_only_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        encode_moments_triton(**kwargs)


def test_launcher_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        encode_moments_triton(**_bad())


def test_strided_inputs():
    """Non-contiguous read-outs (a column slice), a transposed W_enc and strided vectors and mask."""
    case = _dyadic_case(seed=91, t=70)
    wide = torch.cat([case["x_fp"], case["x_c"]], dim=1)  # [T, 2d]: each half is a strided view
    d = case["x_fp"].shape[1]
    W_t = case["W_enc"].t().contiguous().t()  # same values, column-major
    b_enc2 = torch.stack([case["b_enc"], case["b_enc"]], dim=1)[:, 0]  # stride 2
    mask2 = torch.stack([case["mask"], case["mask"]], dim=1)[:, 1]
    thr2 = torch.stack([case["threshold"], case["threshold"]], dim=1)[:, 0]
    m = _fused(wide[:, :d], wide[:, d:], W_t, b_enc2, case["b_dec"], thr2, None, mask2, **BLOCKS)
    _assert_moments(m, _expected(case, case["threshold"], None, case["mask"]))


def _random_bf16_case(seed, t=120, d=64, f=96):
    """Non-dyadic bf16 read-outs and a float32 SAE with full mantissas (the split parts all matter)."""
    g = torch.Generator().manual_seed(seed)
    x_fp = (torch.randn(t, d, generator=g) + 0.3).to(torch.bfloat16)
    x_c = (x_fp.float() + 0.2 * torch.randn(t, d, generator=g)).to(torch.bfloat16)
    W = torch.randn(d, f, generator=g) / d**0.5
    b_enc, b_dec = 0.1 * torch.randn(f, generator=g), 0.3 * torch.randn(d, generator=g)
    return x_fp, x_c, W, b_enc, b_dec


def _float64_truth(x_fp, x_c, W, b_enc, b_dec):
    enc = lambda x: ((x.double() - b_dec.double()) @ W.double() + b_enc.double()).clamp_min(0).numpy()  # noqa: E731
    return _float64_moments(enc(x_fp), enc(x_c))


@pytest.mark.parametrize("precision,r_atol", [("bf16split3", 1e-6), ("auto", 1e-6), ("bf16split2", 1e-4)])
def test_split_paths_against_float64(precision, r_atol):
    """bf16 read-outs times W_enc's bf16 parts, b_dec folded into the bias in float64: r against the float64
    encoding within 1e-6 (three parts, the "auto" choice for bf16) or 1e-4 (two parts: ~16-bit W_enc)."""
    case = _random_bf16_case(seed=101)
    m = _fused(*case, mask=None, precision=precision, **BLOCKS, tokens_per_group=48)
    ref = _float64_truth(*case)
    r = m.pearson().numpy()
    ok = ~np.isnan(ref["r"])
    assert ok.sum() > 50 and np.array_equal(np.isnan(r), np.isnan(ref["r"]))
    np.testing.assert_allclose(r[ok], ref["r"][ok], rtol=0, atol=r_atol)
    np.testing.assert_allclose(m.mean_x.numpy(), ref["mean_x"], rtol=0, atol=1e-5)
    again = _fused(*case, mask=None, precision=precision, **BLOCKS, tokens_per_group=48)
    assert torch.equal(m.pack(), again.pack())  # deterministic


def test_split_encoder_parts_sum_to_w_enc_and_fold_b_dec():
    _, _, W, b_enc, b_dec = _random_bf16_case(seed=103)
    hi, lo, lo2, bias = em.split_encoder(W, b_enc, b_dec, 3)
    assert hi.dtype == lo.dtype == lo2.dtype == torch.bfloat16 and hi.shape == W.shape
    assert hi.stride() == (1, W.shape[0])  # feature-major: the kernel's tile reads along d
    total = hi.double() + lo.double() + lo2.double()
    assert torch.equal(total, W.double())  # three bf16 parts hold a float32 exactly
    two = em.split_encoder(W, b_enc, b_dec, 2)
    err2 = ((two[0].double() + two[1].double()) - W.double()).abs() / W.double().abs()
    assert 0 < float(err2.max()) <= 2.0**-16
    exact = b_enc.double() - b_dec.double() @ W.double()
    assert torch.equal(bias, exact.float())  # one rounding, of the float64 value
    assert em.split_encoder(W, b_enc, b_dec, 3)[0] is hi  # cached per SAE


def test_precision_resolution():
    bf, f32 = torch.bfloat16, torch.float32
    assert em.resolve_precision("auto", bf, bf) == em.AUTO_BF16
    assert em.resolve_precision("auto", bf, f32) == "tf32x3"
    assert em.resolve_precision("tf32", bf, bf) == "tf32"
    with pytest.raises(ValueError, match="needs bfloat16 read-outs"):
        encode_moments_triton(**_bad(precision="bf16split3"))


def test_autotuners_pinned_to_one_config_per_path():
    """tests/conftest.py pins the autotuners: one config left after the encode kernel's per-path pruning."""
    tuner = em._encode_moments_tuned
    for split in (0, 2, 3):
        kept = em._prune_configs(tuner.configs, {}, SPLIT=split)
        allowed = [(c.kwargs, c.num_warps, c.num_stages) for c in em.configs_for(split)]
        assert len(kept) == 1 and (kept[0].kwargs, kept[0].num_warps, kept[0].num_stages) in allowed
    # the unpinned lists: the per-path config sets the compile report checks
    assert len(em.configs_for(0)) >= 2 and len(em.configs_for(3)) >= 2


def test_split_cache_follows_the_tensors_not_their_addresses():
    """A new SAE in a freed SAE's memory, or an SAE edited in place, gets a fresh split."""
    _, _, W, b_enc, b_dec = _random_bf16_case(seed=105)
    first = em.split_encoder(W, b_enc, b_dec, 3)
    with torch.no_grad():
        W.mul_(2)  # in place: same object, new version
    again = em.split_encoder(W, b_enc, b_dec, 3)
    assert again is not first and torch.equal(again[0].double() + again[1].double() + again[2].double(), W.double())
    other = W.clone()  # equal values, another tensor: its own entry
    assert em.split_encoder(other, b_enc, b_dec, 3) is not again
