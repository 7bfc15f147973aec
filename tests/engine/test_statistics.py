"""Streaming statistics: the accumulators against scipy on materialised activations, and the FP-vs-FP null."""

import numpy as np
import torch
from scipy import stats

from qdm_engine.engine.sae import load_sae
from qdm_engine.kernels.encode_moments import encode_moments
from qdm_engine.kernels.moments import FeatureMoments


def _reference(fx: np.ndarray, fy: np.ndarray):
    """float64 numpy/scipy figures on the whole materialised [N, F] activation matrices."""
    r = np.array([stats.pearsonr(fx[:, i], fy[:, i])[0] if fx[:, i].std() > 0 and fy[:, i].std() > 0 else np.nan
                  for i in range(fx.shape[1])])
    return r, (fx > 0).mean(0), fx.mean(0), fx.max(0), (fy > 0).mean(0)


def test_batches_and_merge_match_scipy_including_large_mean_small_variance():
    g = torch.Generator().manual_seed(11)
    n, f = 3000, 40
    fx = torch.relu(torch.randn(n, f, generator=g, dtype=torch.float64))
    fy = torch.relu(fx + 0.3 * torch.randn(n, f, generator=g, dtype=torch.float64))
    # features 0-4: mean ~1e4, std ~1e-3, strongly correlated: raw sums would cancel catastrophically
    base = 1e4 + 1e-3 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    fx[:, :5] = base
    fy[:, :5] = base + 2e-4 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    fy[:, 7] = 0.0  # a feature that dies: r undefined
    r_ref, rate_ref, mean_ref, peak_ref, crate_ref = _reference(fx.numpy(), fy.numpy())

    cuts = [0, 1, 250, 1111, 1500, 2999, 3000]
    parts = [FeatureMoments.from_activations(fx[a:b], fy[a:b]) for a, b in zip(cuts, cuts[1:])]
    left = parts[0].merge(parts[1]).merge(parts[2])
    right = parts[3].merge(parts[4]).merge(parts[5])
    m = left.merge(right)  # a tree of merges, not just a left fold
    assert float(m.n) == n
    r = m.pearson().numpy()
    assert np.isnan(r[7]) and np.isnan(r_ref[7])
    ok = ~np.isnan(r_ref)
    np.testing.assert_allclose(r[ok], r_ref[ok], rtol=0, atol=1e-9)
    assert r_ref[:5].min() > 0.9  # the large-mean features are genuinely correlated
    np.testing.assert_allclose(m.fire_rate_x().numpy(), rate_ref, rtol=0, atol=1e-15)
    np.testing.assert_allclose(m.mean_x.numpy(), mean_ref, rtol=1e-13)
    np.testing.assert_array_equal(m.max_x.numpy(), peak_ref)
    np.testing.assert_allclose(m.fire_rate_y().numpy(), crate_ref, rtol=0, atol=1e-15)
    # one pass over everything agrees with the merged batches
    whole = FeatureMoments.from_activations(fx, fy)
    np.testing.assert_allclose(whole.pearson().numpy()[ok], r[ok], rtol=0, atol=1e-9)


def test_pack_unpack_roundtrip():
    g = torch.Generator().manual_seed(2)
    m = FeatureMoments.from_activations(torch.rand(20, 6, generator=g), torch.rand(20, 6, generator=g))
    back = FeatureMoments.unpack(m.pack())
    for name in ("n", "mean_x", "m2y", "cxy", "max_x", "fires_y"):
        assert torch.equal(getattr(back, name), getattr(m, name))


def test_encode_moments_in_batches_matches_materialised_encode(tiny_sae):
    sae = load_sae(tiny_sae)
    g = torch.Generator().manual_seed(4)
    x_fp = torch.randn(700, sae.d_in, generator=g)
    x_c = x_fp + 0.2 * torch.randn(700, sae.d_in, generator=g)
    mask = torch.rand(700, generator=g) > 0.1
    acc = FeatureMoments.zeros(sae.d_sae)
    for lo in range(0, 700, 128):
        sl = slice(lo, lo + 128)
        acc = acc.merge(encode_moments(x_fp[sl], x_c[sl], sae.W_enc, sae.b_enc, sae.b_dec, mask=mask[sl]))
    fx = sae.encode(x_fp[mask]).double().numpy()
    fy = sae.encode(x_c[mask]).double().numpy()
    r_ref, rate_ref, mean_ref, peak_ref, _ = _reference(fx, fy)
    assert float(acc.n) == int(mask.sum())
    ok = ~np.isnan(r_ref)
    assert ok.sum() > sae.d_sae // 2
    np.testing.assert_allclose(acc.pearson().numpy()[ok], r_ref[ok], rtol=0, atol=1e-9)
    np.testing.assert_allclose(acc.mean_x.numpy(), mean_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(acc.fire_rate_x().numpy(), rate_ref, atol=1e-15)


def test_fp_vs_fp_is_exactly_one(tiny_sae):
    sae = load_sae(tiny_sae)
    x = torch.randn(900, sae.d_in, generator=torch.Generator().manual_seed(9))
    acc = FeatureMoments.zeros(sae.d_sae)
    for lo in range(0, 900, 200):
        acc = acc.merge(encode_moments(x[lo:lo + 200], x[lo:lo + 200], sae.W_enc, sae.b_enc, sae.b_dec))
    r = acc.pearson().numpy()
    live = ~np.isnan(r)
    assert live.sum() > 10
    np.testing.assert_allclose(r[live], 1.0, rtol=0, atol=1e-12)
