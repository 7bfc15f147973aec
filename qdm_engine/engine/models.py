"""Loading causal LMs and reading their residual stream at a TransformerLens-named site.

`blocks.L.hook_resid_post` is the output of HF decoder layer L (= `hidden_states[L+1]`);
`blocks.L.hook_resid_pre` is its input (= `hidden_states[L]`). The read-out is a forward hook on the
decoder layer, so one forward pass gives both the read-out and the logits for perplexity.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qdm_engine.errors import QdmError


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its decoder layers and which block linears compression targets."""

    layers: str  # attribute path of the decoder-layer ModuleList
    targets: tuple[str, ...]  # per-layer module paths of the linears to compress
    transposed: bool = False  # GPT-2's Conv1D stores weights as [in, out]


_LLAMA_LIKE = Family(
    "model.layers",
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)
FAMILIES: dict[str, Family] = {
    "gpt_neox": Family(
        "gpt_neox.layers",
        ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gpt2": Family("transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), transposed=True),
}
SUPPORTED_FAMILIES = ", ".join(sorted(FAMILIES))

HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def model_family(model: torch.nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def family_of(model: torch.nn.Module) -> Family:
    """The family description of `model`; a QdmError naming the supported families otherwise."""
    fam = FAMILIES.get(model_family(model))
    if fam is None:
        raise QdmError(
            f"model family '{model_family(model)}' is not supported for compression; "
            f"supported: {SUPPORTED_FAMILIES}"
        )
    return fam


def decoder_layers_path(model: torch.nn.Module) -> str:
    """Module path of the decoder-layer list: from the family map, else the ModuleList as long as
    config.num_hidden_layers (`model.layers`, `gpt_neox.layers`, `transformer.h`, ...)."""
    fam = FAMILIES.get(model_family(model))
    if fam is not None:
        return fam.layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if name and isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return name
    raise QdmError(
        f"cannot find the decoder layers of model family '{model_family(model)}'; supported: {SUPPORTED_FAMILIES}"
    )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.get_submodule(decoder_layers_path(model))


def valid_hooks(n_layers: int) -> str:
    from qdm_engine.engine.sites import valid_sites

    return valid_sites(n_layers)


def parse_hook(hook: str, n_layers: int) -> tuple[int, str]:
    """(layer, kind) for a TransformerLens hook name: kind 'pre' or 'post' for the residual stream,
    'attn_out', 'mlp_out' or 'z' inside the layer (engine.sites); a QdmError listing the valid ones."""
    from qdm_engine.engine.sites import parse_site

    return parse_site(hook, n_layers)


@dataclass
class ReadOut:
    """Captures the residual stream at one site during forward passes."""

    layer: int
    side: str  # 'pre', 'post', 'attn_out', 'mlp_out' or 'z'
    value: torch.Tensor | None = field(default=None, repr=False)


@contextmanager
def read_out(model: torch.nn.Module, hook: str):
    """Context manager: a ReadOut whose `.value` holds the [B, S, d] residual of the latest forward."""
    layers = decoder_layers(model)
    layer, side = parse_hook(hook, len(layers))
    ro = ReadOut(layer, side)
    if side == "post":
        def grab(_mod, _args, output):
            ro.value = output[0] if isinstance(output, tuple) else output

        handle = layers[layer].register_forward_hook(grab)
    elif side == "pre":
        def grab(_mod, args, kwargs):
            ro.value = args[0] if args else kwargs["hidden_states"]

        handle = layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    else:  # a sub-layer site: the output (or, for hook_z, the input) of one module inside the layer
        from qdm_engine.engine.sites import site_module

        mod, where = site_module(layers[layer], side, hook)
        if where == "out":
            def grab(_mod, _args, output):
                ro.value = output[0] if isinstance(output, tuple) else output

            handle = mod.register_forward_hook(grab)
        else:
            def grab(_mod, args, kwargs):
                ro.value = args[0] if args else next(iter(kwargs.values()))

            handle = mod.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield ro
    finally:
        handle.remove()


class StopForward(Exception):
    """Raised by `stop_after` to end a forward pass once the last read-out site has been reached."""


@contextmanager
def stop_after(model: torch.nn.Module, hooks: list[str]):
    """Context manager ending every forward right after the deepest of `hooks` (features-only mode).

    Enter it after the `read_out` contexts so their hooks on the same layer run first.
    """
    layers = decoder_layers(model)
    layer, side = max((parse_hook(h, len(layers)) for h in hooks), key=lambda ls: (ls[0], ls[1] != "pre"))
    side = "pre" if side == "pre" else "post"  # a site inside layer L is reached once layer L has run

    def stop(*_args, **_kwargs):
        raise StopForward

    if side == "post":
        handle = layers[layer].register_forward_hook(stop)
    else:
        handle = layers[layer].register_forward_pre_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise QdmError(f"unknown --dtype '{name}'; choose one of {', '.join(DTYPES)} or auto")
    return DTYPES[name]


def _looks_like_path(s: str) -> bool:
    """A local path rather than a hub id ('org/name'): absolute, relative-dotted, home, or deeper than one slash."""
    return s.startswith(("/", "./", "../", "~")) or s.count("/") > 1 or s.endswith(".gguf")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextmanager
def hf_progress_bars(enabled: bool):
    """transformers' own progress bars on or off for a block (ours say what is loading)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_source(model: str | None, gguf_file: str | None = None) -> None:
    """Reject a local `--model` path or `--gguf-file` that cannot be a model, before anything loads.

    A local folder needs transformers' `config.json` and a tokenizer; without this check transformers
    fails deep in the tokenizer with a message that names neither the folder nor what is missing.
    A hub id (no such local path) is left to transformers.
    """
    if gguf_file is not None:
        gpath = Path(gguf_file).expanduser()
        if (model is None or gpath.exists()) and not gpath.is_file():
            raise QdmError(f"GGUF file '{gguf_file}' does not exist; pass the path of a .gguf file to --gguf-file")
        return
    if model is None:
        return
    p = Path(model).expanduser()
    if not p.exists():
        if _looks_like_path(model):
            raise QdmError(f"model path '{model}' does not exist; pass a model folder or a hub id to --model")
        return
    if not p.is_dir():
        raise QdmError(f"--model '{model}' is a file; pass a model folder (or a GGUF file with --gguf-file)")
    if not (p / "config.json").is_file():
        what = "is empty" if not any(p.iterdir()) else "has no config.json"
        raise QdmError(f"model folder '{model}' {what}; pass to --model a folder written by transformers' "
                       "save_pretrained (config.json, weights, tokenizer files) or a hub id")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise QdmError(f"model folder '{model}' has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                       "save the tokenizer into it (tokenizer.save_pretrained) and pass it to --model again")


def faithful_attention(lm: torch.nn.Module) -> torch.nn.Module:
    """Use eager attention where the model's attention has a logit soft-cap (Gemma-2): transformers picks
    SDPA by default, which drops the soft-cap (tanh(s / cap) * cap) and so changes what is audited."""
    if getattr(lm.config, "attn_logit_softcapping", None) and hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation("eager")
    return lm


def load_model(
    model: str | None = None,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
    progress: bool = False,
):
    """(model, tokenizer, identity) for a hub id, a local folder, or a GGUF file (dequantized by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None and gguf_file is None:
        raise QdmError("no model given: pass --model PATH_OR_HUB_ID or --gguf-file FILE")
    check_model_source(model, gguf_file)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    source = model
    if gguf_file is not None:
        gpath = Path(gguf_file).expanduser()
        if model is None or gpath.exists():
            if not gpath.is_file():
                raise QdmError(f"GGUF file '{gguf_file}' does not exist; pass the path of a .gguf file")
            source, kwargs["gguf_file"] = str(gpath.parent), gpath.name
        else:
            kwargs["gguf_file"] = gguf_file
    elif _looks_like_path(model) or Path(model).expanduser().exists():
        p = Path(model).expanduser()
        if not p.exists():
            raise QdmError(f"model path '{model}' does not exist; pass a model folder or a hub id")
        source = str(p)
    t0 = time.perf_counter()
    try:
        with hf_progress_bars(progress):
            tok = AutoTokenizer.from_pretrained(source, **kwargs)
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise QdmError(
            f"could not load model '{model or gguf_file}': {_first_line(exc)} "
            "(check the path or hub id; hub ids need the network or a local HF cache)"
        ) from exc
    lm = faithful_attention(lm).to(device).eval().requires_grad_(False)
    identity = {
        "source": model if gguf_file is None else f"{model or source}::{kwargs['gguf_file']}",
        **model_identity(lm),
        "dtype": str(dtype).removeprefix("torch."),
        "commit": getattr(lm.config, "_commit_hash", None),
        "load_seconds": round(time.perf_counter() - t0, 2),
    }
    return lm, tok, identity


def model_identity(lm: torch.nn.Module) -> dict:
    """Architecture facts recorded with every run: class, family, depth, width, parameter count."""
    return {
        "class": type(lm).__name__,
        "model_type": model_family(lm),
        "n_layers": len(decoder_layers(lm)),
        "d_model": int(lm.get_input_embeddings().weight.shape[1]),
        "n_params": int(sum(p.numel() for p in lm.parameters())),
    }
