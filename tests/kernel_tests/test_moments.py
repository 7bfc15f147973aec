"""FeatureMoments against float64 numpy: merge identities and order, extreme splits, chunking, edge cases.

tests/engine/test_statistics.py already checks batches merged as a tree against scipy (with
large-mean features) and the pack/unpack round trip; these cover what it does not."""

import numpy as np
import pytest
import torch

from qdm_engine.kernels.moments import FeatureMoments


def _data(seed, n=400, f=12):
    g = torch.Generator().manual_seed(seed)
    fx = torch.relu(torch.randn(n, f, generator=g, dtype=torch.float64))
    fy = torch.relu(fx + 0.5 * torch.randn(n, f, generator=g, dtype=torch.float64))
    # mean 1e6, std 1e-2: each value's float64 rounding is ~1e-8 of the spread, so r agrees with
    # numpy to ~1e-9 at best (both sides round); the other features agree to ~1e-15
    fx[:, 0] = 1e6 + 1e-2 * torch.randn(n, generator=g, dtype=torch.float64)
    fy[:, 0] = fx[:, 0] + 5e-3 * torch.randn(n, generator=g, dtype=torch.float64)
    fy[:, 1] = -fx[:, 1]  # anti-correlated: r = -1
    fx[:, 2] = 0.0  # never fires: r undefined
    return fx, fy


def _numpy_r(fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    dx, dy = fx - fx.mean(0), fy - fy.mean(0)
    sxx, syy = (dx * dx).sum(0), (dy * dy).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((sxx > 0) & (syy > 0), (dx * dy).sum(0) / np.sqrt(sxx * syy), np.nan)


def _close(a: FeatureMoments, b: FeatureMoments, rtol=1e-12):
    """Equal up to `rtol`; feature 0 (at the float64 limit, see _data) only up to 1e-8."""
    assert float(a.n) == float(b.n)
    for name in ("mean_x", "mean_y", "m2x", "m2y", "cxy"):
        va, vb = getattr(a, name).numpy(), getattr(b, name).numpy()
        np.testing.assert_allclose(va[1:], vb[1:], rtol=rtol, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(va[:1], vb[:1], rtol=max(rtol, 1e-8), atol=1e-12, err_msg=name)
    for name in ("fires_x", "fires_y", "max_x"):
        np.testing.assert_array_equal(getattr(a, name).numpy(), getattr(b, name).numpy(), err_msg=name)


def test_merge_with_empty_is_identity():
    fx, fy = _data(1)
    m = FeatureMoments.from_activations(fx, fy)
    empty = FeatureMoments.zeros(fx.shape[1])
    _close(m.merge(empty), m, rtol=0)
    _close(empty.merge(m), m, rtol=0)
    none = FeatureMoments.from_activations(fx[:0], fy[:0])
    assert float(none.n) == 0 and torch.all(none.max_x == float("-inf"))
    _close(none.merge(m), m, rtol=0)


def test_any_merge_order_matches_numpy_float64():
    fx, fy = _data(2)
    cuts = [0, 3, 50, 51, 199, 320, 400]
    parts = [FeatureMoments.from_activations(fx[a:b], fy[a:b]) for a, b in zip(cuts, cuts[1:])]
    forward = parts[0]
    for p in parts[1:]:
        forward = forward.merge(p)
    backward = parts[-1]
    for p in reversed(parts[:-1]):
        backward = p.merge(backward)  # merge is not symmetric in its arguments' roles: test both
    shuffled = parts[4].merge(parts[1]).merge(parts[5].merge(parts[0])).merge(parts[3].merge(parts[2]))
    r_ref = _numpy_r(fx.numpy(), fy.numpy())
    for m in (forward, backward, shuffled):
        _close(m, forward, rtol=1e-11)
        r = m.pearson().numpy()
        np.testing.assert_array_equal(np.isnan(r), np.isnan(r_ref))
        ok = ~np.isnan(r_ref)
        np.testing.assert_allclose(r[ok], r_ref[ok], rtol=0, atol=1e-8)
        np.testing.assert_allclose(r[3:], r_ref[3:], rtol=0, atol=1e-13)
        np.testing.assert_allclose(m.mean_x.numpy(), fx.numpy().mean(0), rtol=1e-13)
    assert r[1] == -1.0 and np.isnan(r[2])


def test_stream_of_single_positions():
    """The most extreme split: every batch is one position (each merge adds a point to the mean)."""
    fx, fy = _data(3, n=150, f=5)
    m = FeatureMoments.zeros(5)
    for i in range(150):
        m = m.merge(FeatureMoments.from_activations(fx[i : i + 1], fy[i : i + 1]))
    r_ref = _numpy_r(fx.numpy(), fy.numpy())
    ok = ~np.isnan(r_ref)
    np.testing.assert_allclose(m.pearson().numpy()[ok], r_ref[ok], rtol=0, atol=1e-8)
    np.testing.assert_allclose(m.pearson().numpy()[3:], r_ref[3:], rtol=0, atol=1e-12)
    np.testing.assert_allclose(m.m2x.numpy(), ((fx - fx.mean(0)) ** 2).sum(0).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(m.max_x.numpy(), fx.max(0).values.numpy())


def test_feature_chunking_does_not_change_results():
    fx, fy = _data(4, n=60, f=11)
    whole = FeatureMoments.from_activations(fx.float(), fy.float(), chunk=4096)
    chunked = FeatureMoments.from_activations(fx.float(), fy.float(), chunk=3)
    assert torch.equal(whole.pack(), chunked.pack())


def test_pearson_and_rates_edge_cases():
    fx = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 4.0]])
    fy = torch.tensor([[1.0, 0.0, 3.0], [2.0, 0.0, 7.0]])
    m = FeatureMoments.from_activations(fx, fy)
    r = m.pearson()
    assert torch.isnan(r[0]) and torch.isnan(r[1]) and r[2] == 1.0  # zero variance on either side: NaN
    assert torch.all((r[2:] >= -1) & (r[2:] <= 1))
    assert m.fire_rate_x().tolist() == [0.0, 1.0, 1.0] and m.fire_rate_y().tolist() == [1.0, 0.0, 1.0]
    empty = FeatureMoments.zeros(3)
    assert empty.fire_rate_x().tolist() == [0.0, 0.0, 0.0]  # n = 0 does not divide by zero
    assert torch.isnan(empty.pearson()).all()


def test_unpack_of_zero_features_and_bad_shapes():
    z = FeatureMoments.zeros(0)
    back = FeatureMoments.unpack(z.pack())
    assert back.n_features == 0 and float(back.n) == 0
    with pytest.raises(ValueError, match="two"):
        FeatureMoments.from_activations(torch.zeros(3, 2), torch.zeros(3, 4))


def test_combine_matches_numpy_and_the_pairwise_fold():
    """The vectorised G-way merge (used for the fused kernel's per-group partials) against float64
    numpy on the concatenated data and against the left fold of pairwise merges; empty groups add nothing."""
    fx, fy = _data(5)
    cuts = [0, 0, 7, 7, 130, 131, 300, 400, 400]  # includes empty groups, first and last
    parts = [FeatureMoments.from_activations(fx[a:b], fy[a:b]) for a, b in zip(cuts, cuts[1:])]
    combined = FeatureMoments.combine(torch.stack([p.pack() for p in parts]))
    _close(combined, FeatureMoments.merge_all(parts), rtol=1e-11)
    r_ref = _numpy_r(fx.numpy(), fy.numpy())
    r = combined.pearson().numpy()
    np.testing.assert_array_equal(np.isnan(r), np.isnan(r_ref))
    np.testing.assert_allclose(r[3:], r_ref[3:], rtol=0, atol=1e-13)
    np.testing.assert_allclose(r[:2], r_ref[:2], rtol=0, atol=1e-8)
    np.testing.assert_allclose(combined.m2x.numpy()[1:], ((fx - fx.mean(0)) ** 2).sum(0).numpy()[1:], rtol=1e-12)
    assert float(combined.n) == 400
    single = FeatureMoments.combine(parts[2].pack()[None])
    assert torch.equal(single.pack(), parts[2].pack())
    empty = FeatureMoments.combine(torch.stack([FeatureMoments.zeros(4).pack()] * 3))
    assert float(empty.n) == 0 and torch.all(empty.max_x == float("-inf")) and not torch.any(empty.m2x)
    poisoned = torch.stack([p.pack() for p in parts])
    poisoned[3, 4, 5] = float("nan")  # one unwritten slot of one group shows up in that feature
    bad = FeatureMoments.combine(poisoned)
    assert torch.isnan(bad.m2y[5]) and not torch.isnan(bad.m2y[6])
    for bad_shape in (torch.zeros(3, 8, 4, dtype=torch.float64), torch.zeros(0, 9, 4, dtype=torch.float64),
                      torch.zeros(3, 9, 4, dtype=torch.float32)):
        with pytest.raises(ValueError, match="float64 packed moments"):
            FeatureMoments.combine(bad_shape)


def test_merging_never_reads_a_value_back_to_the_host():
    """Merges run on the 'meta' device, where any read of a value (float(), .item(), a data-dependent
    branch) raises: on a GPU they only queue kernels, so the run loop never waits for the device."""
    fx, fy = _data(6, n=20, f=4)
    m = FeatureMoments.from_activations(fx, fy).to("meta")
    acc = FeatureMoments.zeros(4, device="meta").merge(m).merge(m)
    assert acc.mean_x.device.type == "meta"
    with pytest.raises(Exception):
        float(acc.n)  # the check itself can fail: meta tensors hold no values
    FeatureMoments.combine(torch.stack([m.pack(), m.pack()]))
