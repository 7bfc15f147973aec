"""HQQ (half-quadratic quantization, data-free) through the hqq library's own HQQLinear."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdm_engine.engine.compress import Key, Method, check_divides, find_targets, register, transform


def hqq_round_trip(w: torch.Tensor, bits: int, group: int, axis: int) -> torch.Tensor:
    """HQQLinear(nn.Linear(W)).dequantize(): the weight an HQQ-quantized linear computes with."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=axis)
    q = HQQLinear(lin, cfg, compute_dtype=w.dtype, device=str(w.device), del_orig=True)
    return q.dequantize().to(w.dtype).reshape(w.shape)


@register
@dataclass(frozen=True)
class HQQ(Method):
    bits: int = 4
    group: int = 64
    axis: int = 1
    method = "hqq"
    summary = "half-quadratic quantization: zero point and scale optimised per group, no calibration data"
    library = "hqq"
    requires = ("hqq",)
    install = "pip install hqq (or pip install 'qdm-engine[methods]')"
    keys = (
        Key("bits", "int", 4, "bit width", (1, 2, 3, 4, 8)),
        Key("group", "int", 64, "group size"),
        Key("axis", "int", 1, "grouping axis (1: along the input, as transformers' HqqConfig)", (0, 1)),
    )

    @property
    def name(self) -> str:
        return f"hqq-w{self.bits}g{self.group}" + ("" if self.axis == 1 else "-axis0")

    def check(self, model: torch.nn.Module) -> None:
        if self.axis == 1:
            check_divides(find_targets(model), self.group, "hqq group size",
                          "pick a group size that divides every layer's width (e.g. 32, 64 or 128)")

    def apply(self, model: torch.nn.Module) -> None:
        transform(model, lambda w, _t: hqq_round_trip(w, self.bits, self.group, self.axis))

    def describe(self) -> dict:
        return {"method": self.method, "bits": self.bits, "group": self.group, "axis": self.axis,
                "library": self.library}
