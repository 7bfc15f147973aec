"""bitsandbytes formats through bitsandbytes' own quantizer and dequantizer: NF4 and FP4 (the 4-bit
loads of transformers' BitsAndBytesConfig) and LLM.int8's row-wise int8 weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdm_engine.engine.compress import Key, Method, check_divides, find_targets, register, transform
from qdm_engine.errors import QdmError

_INSTALL = "pip install bitsandbytes (or pip install 'qdm-engine[methods]')"


def bnb_4bit_round_trip(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> torch.Tensor:
    """dequantize_4bit(quantize_4bit(w)): the weight a bitsandbytes 4-bit load computes with."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=double_quant)
    return F.dequantize_4bit(packed, state).to(w.dtype).reshape(w.shape)


@dataclass(frozen=True)
class _Bnb4(Method):
    group: int = 64
    double_quant: bool = False
    scope: str = "blocks"
    library = "bitsandbytes"
    requires = ("bitsandbytes",)
    install = _INSTALL
    keys = (
        Key("group", "int", 64, "block size of the absmax scales", (32, 64, 128, 256, 512, 1024, 2048, 4096)),
        Key("double_quant", "bool", False, "also quantize the block scales (bnb_4bit_use_double_quant)"),
        Key("scope", "str", "blocks", "blocks: decoder-layer linears; all: also embeddings and head",
            ("blocks", "all")),
    )

    @property
    def name(self) -> str:
        return (self.method + ("" if self.group == 64 else f"-g{self.group}") + ("-dq" if self.double_quant else "")
                + ("-all" if self.scope == "all" else ""))

    def check(self, model: torch.nn.Module) -> None:
        if any(t.weight.numel() % self.group for t in find_targets(model, self.scope)):
            raise QdmError(f"{self.method}: block size {self.group} does not divide a weight's size; use group=64")

    def apply(self, model: torch.nn.Module) -> None:
        transform(model, lambda w, _t: bnb_4bit_round_trip(w, self.method, self.group, self.double_quant),
                  self.scope)

    def describe(self) -> dict:
        return {"method": self.method, "bits": 4, "group": self.group, "double_quant": self.double_quant,
                "scope": self.scope, "library": self.library}


@register
@dataclass(frozen=True)
class NF4(_Bnb4):
    method = "nf4"
    summary = "4-bit NormalFloat with per-block absmax (bitsandbytes load_in_4bit, QLoRA)"


@register
@dataclass(frozen=True)
class FP4(_Bnb4):
    method = "fp4"
    summary = "4-bit float (E2M1) with per-block absmax (bitsandbytes bnb_4bit_quant_type='fp4')"


def llm_int8_round_trip(w: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' int8 row-wise quantization of a weight and its dequantization (LLM.int8 weights).

    As `load_in_8bit` deploys it: bitsandbytes' Int8Params casts the weight to float16 before quantizing,
    so the row absmax and the rounding are those of the float16 weight."""
    import bitsandbytes.functional as F

    q, row_stats, _ = F.int8_vectorwise_quant(w.contiguous().to(torch.float16))
    return F.int8_vectorwise_dequant(q, row_stats).to(w.dtype).reshape(w.shape)


@register
@dataclass(frozen=True)
class LLMInt8(Method):
    """LLM.int8 weights: int8 per output row, absmax (bitsandbytes load_in_8bit)."""

    method = "llm-int8"
    summary = "int8 per output row, absmax (bitsandbytes load_in_8bit weights; outlier activations not simulated)"
    library = "bitsandbytes"
    requires = ("bitsandbytes",)
    install = _INSTALL

    @property
    def name(self) -> str:
        return "llm-int8"

    def apply(self, model: torch.nn.Module) -> None:
        transform(model, lambda w, _t: llm_int8_round_trip(w))

    def describe(self) -> dict:
        return {"method": self.method, "bits": 8, "granularity": "per-output-row", "library": self.library}
