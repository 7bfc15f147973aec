"""Magnitude pruning (our kernel), unstructured per tensor or N:M along the input (docs/METHOD.md
section 3). Wanda and SparseGPT are in `llmc.py` (llm-compressor's implementations)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdm_engine.engine.compress import Key, Method, check_divides, find_targets, register, transform
from qdm_engine.errors import QdmError
from qdm_engine.kernels.prune import magnitude_prune


def sparsity_tag(sparsity: float, pattern: str | None) -> str:
    """'50' for 0.5, '17.5' for 0.175, '2of4' for the 2:4 pattern."""
    if pattern:
        n, m = pattern.split(":")
        return f"{n}of{m}"
    return f"{100 * sparsity:.10g}"


def nm_prune(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Zero the n smallest-|w| of every m consecutive input weights of each row (ties by index)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // m, m)
    order = torch.sort(g.abs(), dim=-1, stable=True).indices[..., :n]
    keep = torch.ones_like(g, dtype=torch.bool).scatter_(-1, order, False)
    return (g * keep).reshape(rows, cols).to(w.dtype)


def check_sparsity(sparsity: float, pattern: str | None) -> None:
    if pattern is None and not 0.0 <= float(sparsity) < 1.0:
        raise QdmError(f"sparsity must be in [0, 1) (a fraction of the weights), got {sparsity}")


@register
@dataclass(frozen=True)
class Magnitude(Method):
    """Magnitude pruning: exactly floor(s * numel) smallest-|w| weights per tensor, or N:M."""

    sparsity: float = 0.5
    pattern: str | None = None
    method = "magnitude"
    summary = "magnitude pruning, per tensor (exactly floor(s*numel) weights) or N:M (e.g. 2:4)"
    library = "qdm-engine (Triton mask kernel)"
    keys = (
        Key("sparsity", "float", 0.5, "fraction of weights zeroed per tensor"),
        Key("pattern", "pattern", None, "N:M semi-structured sparsity (e.g. 2:4) instead of a fraction"),
    )

    def __post_init__(self):
        check_sparsity(self.sparsity, self.pattern)

    @property
    def name(self) -> str:
        return f"magnitude-{sparsity_tag(self.sparsity, self.pattern)}"

    def check(self, model: torch.nn.Module) -> None:
        if self.pattern:
            m = int(self.pattern.split(":")[1])
            check_divides(find_targets(model), m, f"{self.pattern} pattern block", "use a pattern whose M divides the widths")

    def apply(self, model: torch.nn.Module) -> None:
        if self.pattern:
            n, m = (int(x) for x in self.pattern.split(":"))
            transform(model, lambda w, _t: nm_prune(w, n, m))
        else:
            transform(model, lambda w, _t: magnitude_prune(w, self.sparsity))

    def describe(self) -> dict:
        return {"method": self.method, "sparsity": 0.5 if self.pattern else self.sparsity, "pattern": self.pattern,
                "scope": "per-tensor" if not self.pattern else "per-row N:M", "library": self.library}


@register
@dataclass(frozen=True)
class MagnitudePrune(Magnitude):
    """`--prune S`: per-tensor magnitude pruning at sparsity S (named prune-S)."""

    method = "prune"
    listed = False

    @property
    def name(self) -> str:
        return f"prune-{self.sparsity:g}"

    def describe(self) -> dict:
        return {"method": self.method, "sparsity": self.sparsity, "scope": "per-tensor"}
