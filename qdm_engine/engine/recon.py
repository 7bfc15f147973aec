"""Reconstruction metrics of an SAE on one model's read-outs, as SAELens's `run_evals` defines them
(sae_lens/evals.py, METHOD.md section 4b), accumulated in float64 over every scored position of a sweep.

Per scored position t (x the read-out, x_hat the SAE's reconstruction, acts its feature activations):

    explained_variance  1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)   (SAELens's ExplainedVarianceCalculator)
    mse                 E||x - x_hat||^2                                (sum over dimensions, mean over positions)
    cossim              E[x . x_hat / (||x|| ||x_hat||)]
    l0, l1              E #{f: acts_f != 0},  E sum_f |acts_f|
    frac_alive          fraction of features firing at least once
    l2_ratio            E[||x_hat|| / ||x||]   (||x|| < 1e-4 counted as 1, as SAELens does)
    relative_reconstruction_bias   E||x_hat||^2 / E[x . x_hat]   (Rajamanoharan et al. 2024, eq. 10)

E is the mean over all scored positions. SAELens computes relative_reconstruction_bias per evaluation
batch and averages the batch values; here it is pooled over all positions (the same number when SAELens
runs one batch). The per-position sums come from kernels/reconstruct.py (fused on CUDA: no [T, F]
activations in memory).
"""

from __future__ import annotations

import math

import torch

from qdm_engine.engine.sae import SAEWeights
from qdm_engine.kernels.reconstruct import reconstruct_stats

RECON_METRICS = ("explained_variance", "mse", "cossim", "l0", "l1", "frac_alive", "l2_ratio",
                 "relative_reconstruction_bias")
# The scalar sums kept, in this order: positions, then sums over positions.
_SUMS = ("n", "err2", "x2", "xh2", "xdot", "cos", "l2_ratio", "l0", "l1")


class ReconSums:
    """Running float64 sums (on the read-outs' device) of one SAE on one model's read-outs."""

    def __init__(self, sae: SAEWeights, device):
        self.sae = sae
        self.sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
        self.fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Add the read-outs x [T, d_in] of T scored positions (raw, before the SAE's normalisation)."""
        sae = self.sae
        ss = sae.norm_scale_shift(x)
        xin = sae.normalise_input(x) if ss is not None else x
        tok, fired = reconstruct_stats(xin, x, sae.W_enc, sae.b_enc, sae.b_dec, sae.threshold, sae.k, sae.W_dec,
                                       sae.b_dec_out, *(ss or (None, None)))
        err2, xh2, xdot, x2, l0, l1 = tok.unbind(1)
        nx, nxh = x2.sqrt(), xh2.sqrt()
        cos = xdot / (nx * nxh)
        ratio = nxh / torch.where(nx < 1e-4, torch.ones_like(nx), nx)
        n = torch.full((), x.shape[0], dtype=torch.float64, device=tok.device)
        self.sums += torch.stack([n, err2.sum(), x2.sum(), xh2.sum(), xdot.sum(), cos.sum(), ratio.sum(), l0.sum(),
                                  l1.sum()])
        self.sum_x += x.to(torch.float64).sum(0)
        self.fired |= fired

    def merge_ranks(self, shard) -> None:
        """Sum (and OR) the sums of every rank of a torch.distributed run, in place."""
        if shard.world == 1:
            return
        import torch.distributed as dist

        packed = torch.cat([self.sums, self.sum_x])
        fired = self.fired.to(torch.float64)
        dist.all_reduce(packed)
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        k = len(_SUMS)
        self.sums, self.sum_x, self.fired = packed[:k], packed[k:k + self.sae.d_in], fired > 0

    def metrics(self) -> dict[str, float]:
        """The RECON_METRICS from the sums: one copy to the host per pass (nothing read per batch)."""
        k, d = len(_SUMS), self.sae.d_in
        host = torch.cat([self.sums, self.sum_x, self.fired.to(torch.float64)]).cpu().numpy()
        s = dict(zip(_SUMS, host[:k].tolist()))
        n = s["n"]
        if not n:
            return {m: float("nan") for m in RECON_METRICS}
        mse = s["err2"] / n
        mean_x = host[k:k + d] / n
        var = s["x2"] / n - float((mean_x * mean_x).sum())
        if var < 1e-10:  # SAELens's rule for a constant input
            ev = 1.0 if mse < 1e-10 else 0.0
        else:
            ev = 1.0 - mse / var
        return {
            "explained_variance": ev,
            "mse": mse,
            "cossim": s["cos"] / n,
            "l0": s["l0"] / n,
            "l1": s["l1"] / n,
            "frac_alive": float(host[k + d:].mean()),
            "l2_ratio": s["l2_ratio"] / n,
            "relative_reconstruction_bias": (s["xh2"] / n) / (s["xdot"] / n) if s["xdot"] else math.nan,
        }
