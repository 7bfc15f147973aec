"""Round-to-nearest fake quantization (our Triton kernel): per output row or group-wise, symmetric or
asymmetric (docs/METHOD.md section 3). `RTN(bits)` is what `--bits` gives."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdm_engine.engine.compress import Key, Method, check_divides, find_targets, register, transform
from qdm_engine.errors import QdmError
from qdm_engine.kernels.fake_quant import fake_quant_rtn


@register
@dataclass(frozen=True)
class RTN(Method):
    """Round-to-nearest, `bits` bits, one scale per output row (or per `group` input columns)."""

    bits: int = 4
    group: int | None = None
    sym: bool = True
    scope: str = "blocks"
    method = "rtn"
    summary = "round-to-nearest integer weights, per output row or per group (our Triton kernel)"
    library = "qdm-engine (Triton fake-quant kernel)"
    keys = (
        Key("bits", "int", 4, "bit width, 2..16"),
        Key("group", "int", None, "group size along the input (per output row when absent)"),
        Key("sym", "bool", True, "symmetric (absmax) or asymmetric (min/max with a zero point)"),
        Key("scope", "str", "blocks", "blocks: decoder-layer linears; all: also embeddings and head",
            ("blocks", "all")),
    )

    def __post_init__(self):
        if not 2 <= int(self.bits) <= 16:
            raise QdmError(f"bits must be in 2..16, got {self.bits}")
        if self.group is not None and self.group < 1:
            raise QdmError(f"group must be a positive number, got {self.group}")

    @property
    def name(self) -> str:
        name = f"int{self.bits}" + (f"-g{self.group}" if self.group else "") + ("" if self.sym else "-asym")
        return name + ("-all" if self.scope == "all" else "")

    def check(self, model: torch.nn.Module) -> None:
        if self.group:
            check_divides(find_targets(model, self.scope), self.group, "rtn group size",
                          "pick a group size that divides every layer's width (e.g. 32, 64 or 128)")

    def apply(self, model: torch.nn.Module) -> None:
        transform(model, lambda w, _t: fake_quant_rtn(w, self.bits, group_size=self.group, symmetric=self.sym),
                  self.scope)

    def describe(self) -> dict:
        return {"method": self.method, "bits": self.bits, "group": self.group, "symmetric": self.sym,
                "granularity": f"group of {self.group}" if self.group else "per-output-row", "scope": self.scope,
                "library": self.library}
