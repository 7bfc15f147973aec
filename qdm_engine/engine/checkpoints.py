"""A downloaded compressed (or fine-tuned) checkpoint as a condition: `--compressed [NAME=]PATH`.

The checkpoint is checked against the audited base model before any forward (same tokenizer, same
depth and width, every parameter name and shape: on an architecture built on the meta device, no weights
read), then, when its condition runs, loaded to dense weights on the host and put in place of the base's
parameters, so it runs on identical tokens through the same SAE like any other condition. The base's
tensors are released before the checkpoint loads; the sweep runs checkpoints after its in-process
conditions and, from the first checkpoint on, keeps no copy of the base (its FP read-outs are cached), so
base and checkpoint are never both held at full size. Formats:

- a GGUF file (`model.gguf`, or a folder with one `.gguf` file): dequantized by transformers' GGUF loader;
- a compressed-tensors folder (llm-compressor's output: W4A16, W8A8, FP8, NVFP4, 2:4 ...): loaded with
  `CompressedTensorsConfig(dequantize=True)`, which gives the weights its kernels compute with;
- a bitsandbytes folder (NF4 / FP4 / LLM.int8, `save_pretrained` of a quantized-on-load model): loaded by
  transformers and dequantized at once, before any forward (see `load_dense`);
- a plain transformers folder (a fine-tuned or distilled variant);
any of these as a hub id, 'owner/name' (a folder) or 'owner/name:FILE.gguf', fetched into the Hugging Face
cache (`resolve_source`).
- a torchao folder (`save_pretrained` of a `TorchAoConfig` model: int8 / intx / float8 weight-only ...):
  each quantized weight replaced by its own `dequantize()`;
GPTQ / AWQ folders need gptqmodel: not wired yet, and refused with a message rather than loaded wrongly.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qdm_engine.errors import QdmError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def parse_compressed(spec: str) -> tuple[str, str]:
    """'NAME=PATH' or 'PATH' -> (name, path); the name defaults to the folder or file name."""
    spec = str(spec).strip()
    name, eq, path = spec.partition("=")
    if not eq or "/" in name or not name:
        name, path = "", spec
    if not path:
        raise QdmError(f"--compressed '{spec}': expected PATH or NAME=PATH")
    if not name:
        p = Path(path.rstrip("/").rpartition(":")[2] if _hub_file(path) else path.rstrip("/"))
        name = p.stem if p.suffix == ".gguf" else p.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "checkpoint"
    return name, path


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]  # no .bin/.pt pickles


def _hub_file(path: str) -> bool:
    """'owner/name:FILE.gguf' (one GGUF file of a hub repository), when no such local path exists."""
    repo, colon, fname = str(path).partition(":")
    return bool(colon) and fname.endswith(".gguf") and bool(HUB_ID.fullmatch(repo)) and not Path(path).exists()


def resolve_source(path: str) -> tuple[str, dict | None]:
    """(local path, hub identity or None): a local path as it is; a hub id 'owner/name' (a transformers
    folder: config, safetensors weights, tokenizer) or 'owner/name:FILE.gguf' (one GGUF file) fetched into
    the Hugging Face cache (offline: taken from the cache), with the commit it resolved to."""
    from qdm_engine.engine.models import _looks_like_path

    if Path(path).expanduser().exists():
        return path, None
    repo, _colon, fname = str(path).partition(":")
    if not (_hub_file(path) or (not _colon and HUB_ID.fullmatch(repo) and not _looks_like_path(repo))):
        return path, None  # detect_format says it does not exist
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        local = hf_hub_download(repo, fname) if fname else snapshot_download(repo, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated, network: one line either way
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QdmError(f"--compressed {path} is not a local path, and the Hugging Face hub could not provide it "
                       f"({first}); pass a local folder or .gguf file") from None
    commit = Path(local).parent.name if fname else Path(local).name  # .../snapshots/<commit>[/FILE]
    return local, {"hub_id": repo, "file": fname or None, "revision": commit}


def detect_format(path: str) -> tuple[str, str | None, dict | None]:
    """(format, gguf file name or None, quantization_config or None) of a checkpoint path."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise QdmError(f"--compressed {path}: a file must be a .gguf checkpoint; pass a model folder otherwise")
        return "gguf", p.name, None
    if not p.is_dir():
        raise QdmError(f"--compressed {path} does not exist; pass a checkpoint folder or a .gguf file")
    ggufs = sorted(p.glob("*.gguf"))
    if not (p / "config.json").is_file():
        if len(ggufs) == 1:
            return "gguf", ggufs[0].name, None
        raise QdmError(f"--compressed {path}: no config.json" + (f" and {len(ggufs)} .gguf files; pass one file"
                                                                if ggufs else "; not a transformers checkpoint"))
    cfg = json.loads((p / "config.json").read_text())
    q = cfg.get("quantization_config")
    if q is None:
        return "hf", None, None
    method = str(q.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return "compressed-tensors", None, q
    if method in ("bitsandbytes", "torchao"):
        if importlib.util.find_spec(method) is None:
            raise QdmError(f"--compressed {path} is a {method} checkpoint; pip install {method} to load it")
        return method, None, q
    hints = {"gptq": "pip install gptqmodel (GPTQ folders are not wired into qdm-engine yet)",
             "awq": "pip install gptqmodel (AWQ folders are not wired into qdm-engine yet)"}
    raise QdmError(f"--compressed {path}: quantization format '{method}' cannot be loaded here; "
                   + hints.get(method, "supported: GGUF files, compressed-tensors, bitsandbytes and torchao folders, plain transformers folders"))


def weight_hashes(path: str, gguf_file: str | None) -> dict[str, str]:
    """sha256 of each weight file of the checkpoint (its identity in config.json)."""
    p = Path(path).expanduser()
    files = [p] if p.is_file() else ([p / gguf_file] if gguf_file else
                                     sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES))
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        out[f.name] = h.hexdigest()
    return out


def load_dense(path: str, fmt: str, gguf_file: str | None, dtype: torch.dtype, trust_remote_code: bool = False,
               skeleton: bool = False):
    """(model, tokenizer) of a checkpoint, dense weights on the host; with `skeleton`, only the architecture
    built from its config on the meta device (names and shapes, no weights read: the pre-forward checks)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    src = str(p.parent if p.is_file() else p)
    kw: dict = {"trust_remote_code": trust_remote_code}
    if fmt == "gguf":
        kw["gguf_file"] = gguf_file
    mkw = dict(kw)
    if fmt == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        mkw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    from qdm_engine.engine.models import hf_progress_bars

    try:
        with hf_progress_bars(False):
            tok = AutoTokenizer.from_pretrained(src, **kw)
            if skeleton:
                cfg = AutoConfig.from_pretrained(src, **kw)
                cfg.quantization_config = None  # the dense architecture the checkpoint dequantizes to
                with torch.device("meta"):
                    lm = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
            else:
                lm = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **mkw)
                if fmt == "bitsandbytes":
                    # dense weights before the first forward: on CPUs with AVX512-BF16 that forward repacks the
                    # 4-bit weights, after which dequantizing them silently gives garbage
                    lm = lm.dequantize(dtype=dtype)
                elif fmt == "torchao":
                    _dense_torchao(lm, dtype)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QdmError(f"could not load --compressed {path} ({fmt}): {first}") from None
    return lm.eval().requires_grad_(False), tok


def _dense_torchao(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Replace each torchao-quantized weight (a tensor subclass: Int8Tensor, IntxUnpackedToInt8Tensor,
    Float8Tensor ...) by the dense tensor its own `dequantize()` gives, so the model runs plain kernels."""
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if type(p.data) is not torch.Tensor and hasattr(p.data, "dequantize"):
                dense = p.data.dequantize().to(dtype)
                setattr(module, pname, torch.nn.Parameter(dense, requires_grad=False))


def same_tokenizer(a, b, probe: str | None = None) -> str | None:
    """None when two tokenizers give the audit the same ids (vocabulary, merges via a probe text, BOS), else why not."""
    if a.get_vocab() != b.get_vocab():
        return f"vocabularies differ ({len(a.get_vocab())} vs {len(b.get_vocab())} entries)"
    # BOS starts every audit block; EOS/UNK are never placed by the audit (and transformers' GGUF loader
    # reports a gpt2-style file's EOS as its BOS), so they are not compared
    for attr in ("bos_token_id",):
        if getattr(a, attr, None) != getattr(b, attr, None):
            return f"{attr} differs ({getattr(a, attr, None)} vs {getattr(b, attr, None)})"
    probe = probe or "The quick brown fox, 1234 tokens; naïve café\nnew line  two spaces"
    if a(probe, add_special_tokens=False)["input_ids"] != b(probe, add_special_tokens=False)["input_ids"]:
        return "the audit text tokenizes differently (merges or normalisation differ)"
    return None


@dataclass(frozen=True)
class Checkpoint:
    """A downloaded checkpoint audited against the base model: its dense weights copied into the base."""

    label: str
    path: str
    format: str
    gguf_file: str | None = None
    quantization_config: dict | None = field(default=None, compare=False)
    sha256: dict = field(default_factory=dict, compare=False)
    trust_remote_code: bool = False
    hub: dict | None = field(default=None, compare=False)  # hub id, file and commit when fetched from the hub
    method = "checkpoint"

    @property
    def name(self) -> str:
        return self.label

    def check(self, model: torch.nn.Module, tokenizer=None, probe: str | None = None) -> None:
        """Tokenizer (on `probe`, a sample of the audit text), depth, width and every parameter's shape
        against the base, before any forward."""
        ck, tok = load_dense(self.path, self.format, self.gguf_file, torch.float32, self.trust_remote_code,
                             skeleton=True)  # the weights are read once, when the condition runs
        try:
            if tokenizer is not None:
                why = same_tokenizer(tokenizer, tok, probe)
                if why:
                    raise QdmError(f"--compressed {self.path}: its tokenizer does not match the base model's: {why}")
            _compatible(model, ck, self.path)
        finally:
            del ck
            gc.collect()

    # the runner may run it last and drop the base's snapshot first (the FP read-outs are cached by then)
    replaces_weights = True

    def apply(self, model: torch.nn.Module) -> None:
        """Point every parameter of the base at the checkpoint's dense tensor (no copy where dtype and device
        already match); the base's own tensors are released before the checkpoint loads, so the two are never
        both held at full size (the sweep keeps a host snapshot of the base only while a later condition
        still needs it: `ModelState.restore` copies it back into these tensors)."""
        params = list({id(p): p for p in model.parameters()}.values())
        dtype, device = params[0].dtype, params[0].device
        for p in params:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        gc.collect()
        ck, _ = load_dense(self.path, self.format, self.gguf_file, dtype, self.trust_remote_code)
        src = dict(ck.named_parameters(remove_duplicate=False)) | dict(ck.named_buffers())
        del ck
        with torch.no_grad():
            for name, p in model.named_parameters(remove_duplicate=False):
                if p.numel() == 0:  # a tied parameter takes the tensor of its first name
                    p.data = src[name].detach().to(device, p.dtype)
            for name, t in model.named_buffers():
                v = src.get(name)
                if v is not None and v.shape == t.shape:
                    t.copy_(v.detach().to(t.device, t.dtype))
        del src
        gc.collect()

    def describe(self) -> dict:
        return {"method": self.method, "path": self.path, "format": self.format, "gguf_file": self.gguf_file,
                "quantization_config": self.quantization_config, "sha256": self.sha256,
                "bits": _bits_of(self.quantization_config), "hub": self.hub}


def _bits_of(q: dict | None):
    q = q or {}
    if q.get("quant_method") == "bitsandbytes":
        return 4 if q.get("load_in_4bit") else 8 if q.get("load_in_8bit") else None
    if isinstance(q.get("bits"), int):  # GPTQ / AWQ
        return q["bits"]
    try:
        groups = (q or {}).get("config_groups") or {}
        return int(next(iter(groups.values()))["weights"]["num_bits"])
    except (StopIteration, KeyError, TypeError, ValueError):
        return None


def _compatible(base: torch.nn.Module, ck: torch.nn.Module, path: str) -> None:
    from qdm_engine.engine.models import decoder_layers, model_family

    nb, nc = len(decoder_layers(base)), len(decoder_layers(ck))
    if nb != nc:
        raise QdmError(f"--compressed {path} has {nc} layers, the base model {nb}; pass a checkpoint of the base")
    db = base.get_input_embeddings().weight.shape[1]
    dc = ck.get_input_embeddings().weight.shape[1]
    if db != dc:
        raise QdmError(f"--compressed {path} has width {dc}, the base model {db} (the SAE reads width {db})")
    theirs = {n: tuple(p.shape) for n, p in ck.named_parameters(remove_duplicate=False)}
    for n, p in base.named_parameters(remove_duplicate=False):
        if n not in theirs:
            raise QdmError(f"--compressed {path} ({model_family(ck)}) has no parameter {n} of the base "
                           f"({model_family(base)}); pass a checkpoint of the same architecture")
        if theirs[n] != tuple(p.shape):
            raise QdmError(f"--compressed {path}: {n} is {theirs[n]} there and {tuple(p.shape)} in the base")


def make_checkpoint(spec: str, trust_remote_code: bool = False) -> Checkpoint:
    """A Checkpoint condition from a `--compressed` spec (format detected, weight files hashed)."""
    label, source = parse_compressed(spec)
    path, hub = resolve_source(source)
    fmt, gguf_file, q = detect_format(path)
    return Checkpoint(label, path, fmt, gguf_file, q, weight_hashes(path, gguf_file), trust_remote_code, hub)
