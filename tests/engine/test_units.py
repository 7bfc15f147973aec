"""Bootstrap units: runs of consecutive blocks inside a batch, and their moments pooled back to the batch's."""

import torch

from qdm_engine.engine.runner import _unit_cuts, reduce_units
from qdm_engine.engine.sae import SAEWeights
from qdm_engine.kernels.encode_moments import encode_moments_reference
from qdm_engine.kernels.moments import FeatureMoments


def test_units_cover_every_scored_row_once_and_never_cross_a_batch():
    mask = torch.ones(11, 8, dtype=torch.bool)
    mask[:, 0] = False  # BOS
    cuts = _unit_cuts(mask, batch_size=4, units=6)  # 11 blocks / 6 units -> 2 blocks per unit
    assert [[(lo, hi) for lo, hi, _ in b] for b in cuts] == [[(0, 14), (14, 28)], [(0, 14), (14, 28)], [(0, 14), (14, 21)]]
    assert [u for b in cuts for _, _, u in b] == list(range(6))
    assert [[(lo, hi) for lo, hi, _ in b] for b in _unit_cuts(mask, 4, 0)] == [[(0, 28)], [(0, 28)], [(0, 21)]]
    assert len([u for b in _unit_cuts(mask, 4, 64) for u in b]) == 11  # never more units than blocks


def test_unit_moments_equal_each_units_own_and_pool_to_the_batch():
    g = torch.Generator().manual_seed(0)
    d, f = 16, 40
    sae = SAEWeights(torch.randn(d, f, generator=g) / 4, -0.3 * torch.rand(f, generator=g), 0.1 * torch.randn(d, generator=g),
                     "standard", "blocks.0.hook_resid_post")
    x = torch.randn(45, d, generator=g) + 3.0
    y = x + 0.2 * torch.randn(45, d, generator=g)
    cuts = [(0, 10, 0), (10, 20, 1), (20, 30, 2), (30, 40, 3), (40, 45, 4)]  # four even units and a short one
    packed = torch.zeros(5, 9, f, dtype=torch.float64)
    reduce_units(x, y, sae, cuts, packed)
    args = (sae.W_enc, sae.b_enc, sae.b_dec)
    # the batch is encoded once and sliced: a float32 GEMM may round a row differently with another row
    # count, so activations agree to float32 precision (moments to ~1e-6 of their size), not bitwise
    for lo, hi, u in cuts:
        own = encode_moments_reference(x[lo:hi], y[lo:hi], *args).pack()
        torch.testing.assert_close(packed[u], own, rtol=1e-5, atol=1e-5)
        assert packed[u, 0, 0] == hi - lo and torch.equal(packed[u, 6:8], own[6:8])  # counts exact
    whole = encode_moments_reference(x, y, *args)
    torch.testing.assert_close(FeatureMoments.combine(packed).pearson(), whole.pearson(), rtol=0, atol=1e-6,
                               equal_nan=True)
