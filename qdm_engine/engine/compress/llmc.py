"""Methods run by llm-compressor (GPTQ, AWQ, Wanda, SparseGPT, and its FP8 / MXFP4 / NVFP4 schemes).

llm-compressor changes the model it is given (it attaches scales, observers and hooks, and AWQ folds
its smoothing scales into norms and neighbouring linears), so it runs on a copy of the model without
our read-out hooks; every parameter of that copy is then written back into the audited model, and the
quantized linears as compressed-tensors' own `fake_quantize(W, scale, zero_point, args)`, which is what
a checkpoint llm-compressor saves dequantizes to. The copy is dropped afterwards. The calibration
methods use held-out token blocks (`calib`), never the audit's.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from dataclasses import dataclass, field

import torch

from qdm_engine.engine.compress import CalibrationTokens, Key, Method, check_divides, find_targets, register
from qdm_engine.errors import QdmError

# llm-compressor configures its console log when first imported: errors only unless the user set a level
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
_INSTALL = "pip install llmcompressor (or pip install 'qdm-engine[methods]')"


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` without any forward hooks (ours read out and may stop the forward)."""
    with torch.inference_mode(False):
        clone = copy.deepcopy(model)
    for mod in clone.modules():
        mod._forward_hooks.clear()
        mod._forward_pre_hooks.clear()
        if hasattr(mod, "_forward_hooks_with_kwargs"):
            mod._forward_hooks_with_kwargs.clear()
        if hasattr(mod, "_forward_pre_hooks_with_kwargs"):
            mod._forward_pre_hooks_with_kwargs.clear()
    return clone


@contextlib.contextmanager
def _quiet_cpu_safe():
    """llm-compressor's logs off; on CPU-only torch its pinned-memory staging (AWQ) made a no-op."""
    from loguru import logger

    logger.disable("llmcompressor")
    logger.disable("compressed_tensors")
    prev = logging.getLogger("llmcompressor").level
    tqdm_env = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # its per-layer bars; ours shows the condition
    logging.getLogger("llmcompressor").setLevel(logging.ERROR)
    pin = torch.Tensor.pin_memory
    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.pin_memory = pin
        if tqdm_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_env
        logging.getLogger("llmcompressor").setLevel(prev)
        logger.enable("llmcompressor")
        logger.enable("compressed_tensors")


def _dataset(calib: CalibrationTokens):
    from datasets import Dataset

    ids = calib.ids.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def run_llmcompressor(model: torch.nn.Module, modifiers: list, calib: CalibrationTokens | None) -> None:
    """Apply llm-compressor `modifiers` to a hook-free copy of `model` and write the dense result back."""
    from llmcompressor import oneshot

    clone = _plain_copy(model)
    kwargs = {}
    if calib is not None:
        kwargs = dict(dataset=_dataset(calib), num_calibration_samples=int(calib.ids.shape[0]),
                      max_seq_length=int(calib.ids.shape[1]), shuffle_calibration_samples=False)
    with _quiet_cpu_safe(), torch.inference_mode(False), contextlib.redirect_stderr(io.StringIO()):
        oneshot(model=clone, recipe=modifiers, **kwargs)  # its per-layer bars are hidden; ours names the condition
    write_back(model, clone)
    del clone


def dense_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The dequantized weight of a linear that llm-compressor quantized (None if it did not)."""
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
        return None
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    g = getattr(module, "weight_global_scale", None)
    kw = {"global_scale": g} if g is not None else {}
    return fake_quantize(module.weight, module.weight_scale, getattr(module, "weight_zero_point", None),
                         scheme.weights, **kw)


def write_back(model: torch.nn.Module, clone: torch.nn.Module) -> None:
    """Every parameter and buffer inside the decoder layers, from the compressed copy (quantized linears
    dequantized); the embeddings, final norm and head stay FP whatever the library did to its copy."""
    from qdm_engine.engine.models import decoder_layers_path

    inside = decoder_layers_path(model) + "."
    mods = dict(clone.named_modules())
    new = {}
    for name, mod in mods.items():
        d = dense_weight(mod)
        if d is not None:
            new[f"{name}.weight" if name else "weight"] = d
    src = dict(clone.named_parameters(remove_duplicate=False)) | dict(clone.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
            v = new.get(name, src.get(name))
            if v is None or not name.startswith(inside):
                continue
            if v.shape != t.shape:
                raise QdmError(f"llm-compressor changed the shape of {name}: {tuple(t.shape)} -> {tuple(v.shape)}")
            t.copy_(v.detach().to(t.device, t.dtype))


def _ignore(model: torch.nn.Module) -> list[str]:
    """Everything outside the decoder-layer linears: the head (embeddings are not Linear)."""
    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if m is head]
    return names


def _weight_args(bits: int, group: int | None, sym: bool, kind: str = "int", actorder=None):
    from compressed_tensors.quantization import QuantizationArgs

    strategy = "group" if group else "channel"
    kw = dict(num_bits=bits, type=kind, symmetric=sym, strategy=strategy)
    if group:
        kw["group_size"] = group
    if actorder:
        kw["actorder"] = actorder
    return QuantizationArgs(**kw)


def _scheme(weights) -> dict:
    from compressed_tensors.quantization import QuantizationScheme

    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


class _Calibrated(Method):
    calibration = True
    library = "llm-compressor"
    requires = ("llmcompressor",)
    install = _INSTALL

    def _calib(self) -> CalibrationTokens:
        if self.calib is None:
            raise QdmError(f"--method {self.method} needs calibration tokens; the sweep supplies held-out "
                           "blocks (or pass --calib-text)")
        return self.calib


def _int_keys(bits, group, sym):
    return (
        Key("bits", "int", bits, "weight bit width", (2, 3, 4, 8)),
        Key("group", "int", group, "group size along the input (per output row when absent)"),
        Key("sym", "bool", sym, "symmetric (true) or asymmetric with a zero point (false)"),
    )


def _wname(prefix, bits, group, sym, extra=""):
    return f"{prefix}-w{bits}" + (f"g{group}" if group else "") + ("" if sym else "-asym") + extra


def _check_group(model, group, what):
    if group:
        check_divides(find_targets(model), group, f"{what} group size",
                      "pick a group size that divides every layer's width (e.g. 32, 64 or 128)")


@register
@dataclass(frozen=True)
class GPTQ(_Calibrated):
    bits: int = 4
    group: int | None = 128
    sym: bool = True
    act_order: bool = False
    damp: float = 0.01
    calib: CalibrationTokens | None = field(default=None, compare=False, repr=False)
    method = "gptq"
    summary = "GPTQ: column-by-column rounding with second-order error compensation on calibration data"
    keys = _int_keys(4, 128, True) + (
        Key("act_order", "bool", False, "quantize columns in order of decreasing Hessian diagonal"),
        Key("damp", "float", 0.01, "Hessian dampening fraction"),
    )

    @property
    def name(self) -> str:
        return _wname("gptq", self.bits, self.group, self.sym, "-act" if self.act_order else "")

    def check(self, model):
        _check_group(model, self.group, "gptq")

    def apply(self, model):
        from llmcompressor.modifiers.quantization import GPTQModifier

        w = _weight_args(self.bits, self.group, self.sym, actorder="static" if self.act_order else None)
        mod = GPTQModifier(config_groups=_scheme(w), ignore=_ignore(model), dampening_frac=self.damp,
                           actorder="static" if self.act_order else None)
        run_llmcompressor(model, [mod], self._calib())


@register
@dataclass(frozen=True)
class AWQ(_Calibrated):
    bits: int = 4
    group: int | None = 128
    sym: bool = False
    calib: CalibrationTokens | None = field(default=None, compare=False, repr=False)
    method = "awq"
    summary = "AWQ: activation-aware per-channel scales folded into the previous layer, then group-wise RTN"
    keys = _int_keys(4, 128, False)

    @property
    def name(self) -> str:
        return _wname("awq", self.bits, self.group, True) + ("-sym" if self.sym else "")

    def check(self, model):
        _check_group(model, self.group, "awq")

    def apply(self, model):
        from llmcompressor.modifiers.awq import AWQModifier

        w = _weight_args(self.bits, self.group, self.sym)
        mod = AWQModifier(config_groups=_scheme(w), ignore=_ignore(model))
        run_llmcompressor(model, [mod], self._calib())


@dataclass(frozen=True)
class _Prune(_Calibrated):
    sparsity: float = 0.5
    pattern: str | None = None
    calib: CalibrationTokens | None = field(default=None, compare=False, repr=False)
    keys = (
        Key("sparsity", "float", 0.5, "fraction of each layer's weights zeroed"),
        Key("pattern", "pattern", None, "N:M semi-structured sparsity (e.g. 2:4) instead of a fraction"),
    )

    def __post_init__(self):
        from qdm_engine.engine.compress.sparsity import check_sparsity

        check_sparsity(self.sparsity, self.pattern)

    @property
    def name(self) -> str:
        from qdm_engine.engine.compress.sparsity import sparsity_tag

        return f"{self.method}-{sparsity_tag(self.sparsity, self.pattern)}"

    def check(self, model):
        if self.pattern:
            m = int(self.pattern.split(":")[1])
            check_divides(find_targets(model), m, f"{self.pattern} pattern block", "use a pattern whose M divides the widths")

    def _kw(self, model) -> dict:
        s = (int(self.pattern.split(":")[0]) / int(self.pattern.split(":")[1])) if self.pattern else self.sparsity
        return dict(sparsity=s, mask_structure=self.pattern or "0:0", targets=["Linear"], ignore=_ignore(model))

    def apply(self, model):
        from llmcompressor.modifiers import pruning

        run_llmcompressor(model, [getattr(pruning, self.modifier)(**self._kw(model))], self._calib())

    def describe(self) -> dict:
        d = super().describe()
        if self.pattern:
            n, m = (int(x) for x in self.pattern.split(":"))
            d["sparsity"] = n / m
        return d


@register
@dataclass(frozen=True)
class Wanda(_Prune):
    method = "wanda"
    summary = "Wanda: prune the smallest |W| x input-activation-norm weights per output row (no update)"
    modifier = "WandaPruningModifier"


@register
@dataclass(frozen=True)
class SparseGPT(_Prune):
    method = "sparsegpt"
    summary = "SparseGPT: prune with second-order (OBS) updates of the remaining weights"
    modifier = "SparseGPTModifier"


class _Scheme(Method):
    """A data-free llm-compressor scheme (QuantizationModifier): weights quantized, activations left FP."""

    library = "llm-compressor (compressed-tensors schemes)"
    requires = ("llmcompressor",)
    install = _INSTALL

    def _weights(self):
        raise NotImplementedError

    def apply(self, model):
        from llmcompressor.modifiers.quantization import QuantizationModifier

        mod = QuantizationModifier(config_groups=_scheme(self._weights()), ignore=_ignore(model))
        run_llmcompressor(model, [mod], None)


@register
@dataclass(frozen=True)
class FP8(_Scheme):
    group: int | None = None
    method = "fp8"
    summary = "FP8 E4M3 weights, one scale per output row (or per group), weight-only"
    keys = (Key("group", "int", None, "group size (per output row when absent)"),)

    @property
    def name(self) -> str:
        return "fp8" + (f"-g{self.group}" if self.group else "")

    def check(self, model):
        _check_group(model, self.group, "fp8")

    def _weights(self):
        return _weight_args(8, self.group, True, kind="float")

    def describe(self):
        return {**super().describe(), "bits": 8, "format": "float8_e4m3fn"}


def _preset_weights(name: str):
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    return PRESET_SCHEMES[name]["weights"]


class _Preset(_Scheme):
    """A compressed-tensors preset whose weights use a fixed block (`group`) of `bits`-bit floats."""

    preset: str = ""
    group: int = 0
    bits: int = 4

    @property
    def name(self) -> str:
        return self.method

    def check(self, model):
        _check_group(model, self.group, self.method)

    def _weights(self):
        return _preset_weights(self.preset)

    def describe(self):
        return {**super().describe(), "bits": self.bits, "group": self.group, "scheme": self.preset}


@register
@dataclass(frozen=True)
class MXFP4(_Preset):
    method = "mxfp4"
    summary = "OCP microscaling FP4: E2M1 weights, one power-of-two (E8M0) scale per 32 (MXFP4A16)"
    preset, group = "MXFP4A16", 32


@register
@dataclass(frozen=True)
class NVFP4(_Preset):
    method = "nvfp4"
    summary = "NVIDIA FP4: E2M1 weights, an FP8 scale per 16 and a global scale per tensor (NVFP4A16)"
    preset, group = "NVFP4A16", 16
