"""GGUF weight types with llama.cpp's own arithmetic (what llama.cpp users deploy).

The legacy types (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) and MXFP4 are quantized by the `gguf` package
(`gguf.quants.quantize`, byte-identical to llama.cpp's reference quantizer); the k-quants (Q6_K, Q5_K,
Q4_K, Q3_K, Q2_K), which `gguf` cannot quantize, by llama.cpp's ggml library itself through ctypes
(`ggml_quantize_chunk`; see `qdm_engine.engine.compress.ggml`). Dequantization is `gguf.quants.dequantize`.
Rows are quantized along the input dimension, as llama.cpp stores a linear weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qdm_engine.engine.compress import Key, Method, find_targets, register, transform
from qdm_engine.errors import QdmError

LEGACY = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "MXFP4")
KQUANTS = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
TYPES = LEGACY + KQUANTS
# llama.cpp's own fallback (llama-quant.cpp, tensor_type_fallback) for rows not a multiple of 256
FALLBACK = {"Q6_K": "Q8_0", "Q5_K": "Q5_1", "Q4_K": "Q5_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0"}
BITS = {"Q8_0": 8, "Q6_K": 6, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "MXFP4": 4,
        "Q3_K": 3, "Q2_K": 2}


def block_size(type_name: str) -> int:
    import gguf

    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0])


def quantize_bytes(w: np.ndarray, type_name: str) -> np.ndarray:
    """The GGUF bytes of a float32 [rows, cols] array, one row of blocks per weight row."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in KQUANTS:
        from qdm_engine.engine.compress.ggml import ggml_quantize

        return ggml_quantize(w, int(qtype), *gguf.GGML_QUANT_SIZES[qtype])
    return gguf.quants.quantize(w, qtype)


def gguf_round_trip(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """dequantize(quantize(W)) in float32 on the host, returned in W's dtype and device."""
    import gguf

    a = w.detach().to("cpu", torch.float32).contiguous().numpy()
    q = quantize_bytes(a, type_name)
    d = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)).reshape(w.shape).to(w.device, w.dtype)


@register
@dataclass(frozen=True)
class GGUFType(Method):
    type: str = "Q4_K"
    scope: str = "blocks"
    fallback: bool = True
    method = "gguf"
    summary = "a GGUF weight type with llama.cpp's arithmetic (legacy via gguf, k-quants via ggml)"
    library = "gguf (legacy types), llama.cpp ggml (k-quants)"
    requires = ("gguf",)
    install = "pip install gguf"
    keys = (
        Key("type", "str", "Q4_K", "GGUF type: " + ", ".join(TYPES), TYPES),
        Key("scope", "str", "blocks", "blocks: decoder-layer linears; all: also embeddings and head "
            "(deployed GGUF files quantize both)", ("blocks", "all")),
        Key("fallback", "bool", True, "as llama.cpp: a k-quant on a row not a multiple of 256 uses "
            + ", ".join(f"{a}->{b}" for a, b in FALLBACK.items())),
    )

    def __post_init__(self):
        if self.type in KQUANTS:
            from qdm_engine.engine.compress.ggml import ggml_status

            problem = ggml_status()
            if problem:
                raise QdmError(f"type {self.type} needs llama.cpp's ggml library: {problem}")

    @property
    def name(self) -> str:
        return f"gguf-{self.type.lower()}" + ("-all" if self.scope == "all" else "")

    @property
    def bits(self) -> int:
        return BITS[self.type]

    def type_for(self, width: int) -> str:
        """The type a row of `width` weights gets: the asked type, or llama.cpp's fallback."""
        if width % block_size(self.type) and self.fallback and self.type in FALLBACK:
            return FALLBACK[self.type]
        return self.type

    def check(self, model: torch.nn.Module) -> None:
        for t in find_targets(model, self.scope):
            block = block_size(self.type_for(t.in_features))
            if t.in_features % block:
                raise QdmError(f"gguf type {self.type} packs blocks of {block} weights, which does not divide the "
                               f"width {t.in_features} of {t.name}; pick a type with blocks of 32 "
                               f"({', '.join(LEGACY)})" + ("" if self.fallback or self.type not in FALLBACK
                                                          else " or drop fallback=false"))

    def apply(self, model: torch.nn.Module) -> None:
        transform(model, lambda w, _t: gguf_round_trip(w, self.type_for(w.shape[1])), self.scope)

    def describe(self) -> dict:
        return {"method": self.method, "type": self.type, "bits": self.bits, "block": block_size(self.type),
                "scope": self.scope, "library": self.library,
                "fallback": (f"rows not a multiple of {block_size(self.type)} use {FALLBACK[self.type]} "
                             "(llama.cpp's rule)") if self.fallback and self.type in FALLBACK else None}
