"""Compression conditions: small frozen dataclasses with a `name` and one `apply(model)` (METHOD.md section 3).

Only the transformer-block linears of the family map are touched (attention q/k/v/o, MLP up/gate/down);
embeddings, unembedding, norms, biases and the SAE never are. `FPWeights` keeps a copy of exactly those
tensors so a sweep restores the FP model between conditions without reloading it. A new method is a new
dataclass decorated with `@register`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdm_engine.engine.models import family_of
from qdm_engine.errors import QdmError
from qdm_engine.kernels.fake_quant import fake_quant_rtn
from qdm_engine.kernels.prune import magnitude_prune

METHODS: dict[str, type] = {}


def register(cls):
    """Class decorator adding a condition type to METHODS under its `method` name."""
    METHODS[cls.method] = cls
    return cls


def target_weights(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, bool]]:
    """(name, weight, transposed) of every linear the family map targets, in layer order."""
    fam = family_of(model)
    layers = model.get_submodule(fam.layers)
    out = []
    for i, layer in enumerate(layers):
        for path in fam.targets:
            mod = layer.get_submodule(path)
            out.append((f"{fam.layers}.{i}.{path}.weight", mod.weight, fam.transposed))
    return out


def _transform(model: torch.nn.Module, fn) -> None:
    """Replace each targeted weight W (as [out, in]) by fn(W), in place, in W's dtype."""
    with torch.no_grad():
        for _, w, transposed in target_weights(model):
            if transposed:
                w.copy_(fn(w.detach().t().contiguous()).t())
            else:
                w.copy_(fn(w.detach()))


@dataclass(frozen=True)
class FP:
    """No compression. As a condition it is the FP-vs-FP null: the FP model run again like any other."""

    method = "fp"

    @property
    def name(self) -> str:
        return "fp-null"

    def apply(self, model: torch.nn.Module) -> None:
        return None

    def describe(self) -> dict:
        return {"method": self.method}


@register
@dataclass(frozen=True)
class RTN:
    """Round-to-nearest fake quantization, `bits` bits, symmetric, one scale per output row."""

    bits: int
    method = "rtn"

    def __post_init__(self):
        if not 2 <= int(self.bits) <= 16:
            raise QdmError(f"bits must be in 2..16, got {self.bits}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def apply(self, model: torch.nn.Module) -> None:
        _transform(model, lambda w: fake_quant_rtn(w, self.bits))

    def describe(self) -> dict:
        return {"method": self.method, "bits": self.bits, "granularity": "per-output-row", "symmetric": True}


@register
@dataclass(frozen=True)
class MagnitudePrune:
    """Per-tensor magnitude pruning: exactly floor(sparsity * numel) smallest-|w| weights zeroed."""

    sparsity: float
    method = "prune"

    def __post_init__(self):
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise QdmError(f"pruning sparsity must be in [0, 1), got {self.sparsity}")

    @property
    def name(self) -> str:
        return f"prune-{self.sparsity:g}"

    def apply(self, model: torch.nn.Module) -> None:
        _transform(model, lambda w: magnitude_prune(w, self.sparsity))

    def describe(self) -> dict:
        return {"method": self.method, "sparsity": self.sparsity, "scope": "per-tensor"}


class FPWeights:
    """A copy of the targeted FP weights; `restore()` puts them back after a condition."""

    def __init__(self, model: torch.nn.Module):
        self._pairs = [(w, w.detach().clone()) for _, w, _ in target_weights(model)]

    def restore(self) -> None:
        with torch.no_grad():
            for w, saved in self._pairs:
                w.copy_(saved)


def parse_bits(spec: str) -> list[int]:
    """'8..4' -> [8, 7, 6, 5, 4]; '8,6,4' -> [8, 6, 4]; each in 2..16."""
    spec = str(spec).strip()
    try:
        if ".." in spec:
            a, b = (int(x) for x in spec.split(".."))
            bits = list(range(a, b - 1, -1)) if a >= b else list(range(a, b + 1))
        else:
            bits = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as exc:
        raise QdmError(f"cannot read --bits '{spec}'; use a range like 8..4 or a list like 8,6,4") from exc
    if not bits:
        raise QdmError(f"--bits '{spec}' names no bit width; use a range like 8..4 or a list like 8,6,4")
    bad = [b for b in bits if not 2 <= b <= 16]
    if bad:
        raise QdmError(f"--bits {spec}: {bad[0]} is outside 2..16")
    return bits
