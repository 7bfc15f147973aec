"""Streaming float64 per-feature moments of paired activations (METHOD.md section 4).

For feature i over N scored positions, with x the FP activation and y the compressed one, we keep
N, the means of x and y, the centred sums M2x = sum (x - mean_x)^2, M2y and Cxy = sum (x - mean_x)(y - mean_y),
the FP fire count (x > 0), FP max x and the compressed fire count (y > 0), all float64.

Centred sums merged with Chan's pairwise formula stay accurate for features of large mean and small
variance, where raw sums (sum x^2 - (sum x)^2 / N) cancel catastrophically. Merging is exact in the sense
that matters: merge(a, b) equals the statistics of the concatenated data up to float64 rounding, in
any batch split, and merging in a fixed order is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

_F64 = torch.float64


@dataclass
class FeatureMoments:
    n: torch.Tensor  # 0-d float64: scored positions
    mean_x: torch.Tensor  # [F] float64
    mean_y: torch.Tensor
    m2x: torch.Tensor
    m2y: torch.Tensor
    cxy: torch.Tensor
    fires_x: torch.Tensor  # [F] float64 counts of x > 0
    fires_y: torch.Tensor  # [F] float64 counts of y > 0
    max_x: torch.Tensor  # [F] float64, -inf before any position

    @classmethod
    def zeros(cls, n_features: int, device: torch.device | str = "cpu") -> "FeatureMoments":
        z = lambda: torch.zeros(n_features, dtype=_F64, device=device)  # noqa: E731
        return cls(
            n=torch.zeros((), dtype=_F64, device=device),
            mean_x=z(), mean_y=z(), m2x=z(), m2y=z(), cxy=z(), fires_x=z(), fires_y=z(),
            max_x=torch.full((n_features,), float("-inf"), dtype=_F64, device=device),
        )

    @classmethod
    def from_activations(cls, fx: torch.Tensor, fy: torch.Tensor, chunk: int = 4096) -> "FeatureMoments":
        """Moments of one batch of activations fx, fy [T, F] (any float dtype), computed in float64.

        Features are processed `chunk` columns at a time so the float64 copies stay small.
        """
        if fx.shape != fy.shape or fx.dim() != 2:
            raise ValueError(f"expected two [T, F] tensors of one shape, got {tuple(fx.shape)} and {tuple(fy.shape)}")
        t, f = fx.shape
        out = cls.zeros(f, device=fx.device)
        out.n.fill_(t)
        if t == 0:
            return out
        for lo in range(0, f, chunk):
            hi = min(lo + chunk, f)
            x = fx[:, lo:hi].to(_F64)
            y = fy[:, lo:hi].to(_F64)
            mx, my = x.mean(0), y.mean(0)
            dx, dy = x - mx, y - my
            out.mean_x[lo:hi], out.mean_y[lo:hi] = mx, my
            out.m2x[lo:hi] = (dx * dx).sum(0)
            out.m2y[lo:hi] = (dy * dy).sum(0)
            out.cxy[lo:hi] = (dx * dy).sum(0)
            out.fires_x[lo:hi] = (x > 0).sum(0).to(_F64)
            out.fires_y[lo:hi] = (y > 0).sum(0).to(_F64)
            out.max_x[lo:hi] = x.amax(0)
        return out

    def merge(self, other: "FeatureMoments") -> "FeatureMoments":
        """Statistics of the union of both position sets (Chan et al.'s pairwise update).

        Branch-free on the counts (an empty side is selected on the device, never read back), so a
        merge never waits for the GPU: the run loop can keep queueing work while earlier batches finish.
        An empty side returns the other side's values exactly.
        """
        na, nb = self.n, other.n
        n = na + nb
        frac = nb / n.clamp_min(1)  # nb / (na + nb); 0 when both are empty
        w = na * frac
        dx = other.mean_x - self.mean_x
        dy = other.mean_y - self.mean_y
        merged = FeatureMoments(
            n=n,
            mean_x=self.mean_x + dx * frac,
            mean_y=self.mean_y + dy * frac,
            m2x=self.m2x + other.m2x + dx * dx * w,
            m2y=self.m2y + other.m2y + dy * dy * w,
            cxy=self.cxy + other.cxy + dx * dy * w,
            fires_x=self.fires_x + other.fires_x,
            fires_y=self.fires_y + other.fires_y,
            max_x=torch.maximum(self.max_x, other.max_x),
        )
        a_empty, b_empty = na == 0, nb == 0
        return FeatureMoments(**{
            f.name: torch.where(b_empty, getattr(self, f.name), torch.where(a_empty, getattr(other, f.name),
                                                                            getattr(merged, f.name)))
            for f in fields(self)
        })

    @staticmethod
    def merge_all(parts) -> "FeatureMoments":
        """Merge a non-empty sequence left to right: a fixed order, so the result is deterministic."""
        parts = list(parts)
        total = parts[0]
        for p in parts[1:]:
            total = total.merge(p)
        return total

    @classmethod
    def combine(cls, packed: torch.Tensor) -> "FeatureMoments":
        """Merge G packed moments [G, 9, F] (see `pack`) in one vectorised step.

        With N = sum n_g and the pooled mean m = sum n_g m_g / N, the centred sums add up as
        M2 = sum M2_g + sum n_g (m_g - m)^2 (and likewise the cross term): exact algebra, evaluated on
        deviations from the pooled mean, so it keeps the accuracy of the pairwise merge. It costs a
        fixed handful of kernels however many groups there are (a left fold costs G merges), and is
        deterministic (fixed-order reductions, no atomics). Empty groups (n_g = 0) contribute nothing.
        """
        if packed.dim() != 3 or packed.shape[1] != 9 or packed.shape[0] < 1 or packed.dtype != _F64:
            raise ValueError(f"expected float64 packed moments [G, 9, F], got {tuple(packed.shape)} {packed.dtype}")
        n_g, mx_g, my_g, m2x_g, m2y_g, cxy_g, fx_g, fy_g, max_g = packed.unbind(1)
        n = n_g.sum(0)
        inv = 1.0 / n.clamp_min(1)
        mean_x = (n_g * mx_g).sum(0) * inv
        mean_y = (n_g * my_g).sum(0) * inv
        dx, dy = mx_g - mean_x, my_g - mean_y
        n_feat = packed.shape[2]
        return cls(
            n=n[0].clone() if n_feat else packed.new_zeros(()),
            mean_x=mean_x,
            mean_y=mean_y,
            m2x=m2x_g.sum(0) + (n_g * dx * dx).sum(0),
            m2y=m2y_g.sum(0) + (n_g * dy * dy).sum(0),
            cxy=cxy_g.sum(0) + (n_g * dx * dy).sum(0),
            fires_x=fx_g.sum(0),
            fires_y=fy_g.sum(0),
            max_x=max_g.amax(0),
        )

    def clone(self) -> "FeatureMoments":
        return FeatureMoments(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def to(self, device: torch.device | str) -> "FeatureMoments":
        return FeatureMoments(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def pack(self) -> torch.Tensor:
        """All fields as one [9, F] float64 tensor (row 0 is n broadcast), for collectives and storage."""
        rows = [getattr(self, f.name) for f in fields(self)]
        rows[0] = rows[0].expand_as(self.mean_x)
        return torch.stack(rows)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> "FeatureMoments":
        names = [f.name for f in fields(cls)]
        vals = {name: packed[i].clone() for i, name in enumerate(names)}
        vals["n"] = packed[0, 0].clone() if packed.shape[1] else torch.zeros((), dtype=_F64)
        return cls(**vals)

    @property
    def n_features(self) -> int:
        return int(self.mean_x.numel())

    def pearson(self) -> torch.Tensor:
        """Per-feature Pearson r (float64); NaN where either side has zero variance."""
        denom = torch.sqrt(self.m2x * self.m2y)
        r = self.cxy / denom
        r = torch.where(denom > 0, r, torch.full_like(r, float("nan")))
        return r.clamp(-1.0, 1.0)

    def fire_rate_x(self) -> torch.Tensor:
        return self.fires_x / self.n.clamp_min(1)

    def fire_rate_y(self) -> torch.Tensor:
        return self.fires_y / self.n.clamp_min(1)
