"""Compression conditions: the registry, the `--method NAME[:KEY=VALUE,...]` spec parser, what a method
may touch, and the exact restore of the FP model between conditions (docs/METHOD.md section 3).

A condition is a small frozen dataclass with a `name` (used in tables and file names), one
`apply(model)` that writes the compressed model's *dense* weights into the model in place, and
`describe()` (recorded in config.json). Methods from libraries (llm-compressor, bitsandbytes, hqq, gguf)
run the library's own quantizer and write back what it dequantizes to, so the audited forward is the
deployed model's arithmetic on the weights (activation quantization is not simulated).

What is compressed: `scope="blocks"` (default) is every linear inside the decoder layers, found from the
model itself (nn.Linear, and transformers' Conv1D for GPT-2, whose weight is [in, out]);
`scope="all"` adds the input embedding and the output head (as deployed GGUF files do). `ModelState`
snapshots every parameter and buffer, so the FP model comes back bit for bit whatever a method touched.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from qdm_engine.errors import QdmError

METHODS: dict[str, type] = {}
SCOPES = ("blocks", "all")


def register(cls):
    """Class decorator adding a condition type to METHODS under its `method` name."""
    METHODS[cls.method] = cls
    return cls


# ----------------------------------------------------------------------------------------------- targets

@dataclass(frozen=True)
class Target:
    """One weight a method compresses: its module, parameter name, and layout."""

    name: str  # parameter name in the model, e.g. model.layers.0.self_attn.q_proj.weight
    module: torch.nn.Module
    transposed: bool  # GPT-2 Conv1D stores [in, out]
    kind: str  # "linear", "embedding" or "head"

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.module.weight

    @property
    def in_features(self) -> int:
        w = self.weight
        return int(w.shape[0] if self.transposed else w.shape[1])


def _is_conv1d(mod: torch.nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def find_targets(model: torch.nn.Module, scope: str = "blocks") -> list[Target]:
    """Every linear inside the decoder layers, in layer order; with scope 'all' also the input embedding
    and the output head (a head tied to the embedding is one tensor and is listed once)."""
    from qdm_engine.engine.models import decoder_layers_path

    if scope not in SCOPES:
        raise QdmError(f"unknown --scope '{scope}'; choose blocks or all")
    path = decoder_layers_path(model)
    out = []
    for i, layer in enumerate(model.get_submodule(path)):
        for sub, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear) or _is_conv1d(mod):
                out.append(Target(f"{path}.{i}.{sub}.weight", mod, _is_conv1d(mod), "linear"))
    if not out:
        raise QdmError(f"found no linear layers inside the decoder layers ({path}) of this model")
    if scope == "all":
        seen = {id(t.weight) for t in out}
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        for mod, kind in ((emb, "embedding"), (head, "head")):
            if mod is None or id(mod.weight) in seen:
                continue
            seen.add(id(mod.weight))
            out.append(Target(names.get(id(mod.weight), kind), mod, False, kind))
    return out


def target_weights(model: torch.nn.Module, scope: str = "blocks") -> list[tuple[str, torch.nn.Parameter, bool]]:
    """(name, weight, transposed) of every targeted weight, in layer order."""
    return [(t.name, t.weight, t.transposed) for t in find_targets(model, scope)]


def transform(model: torch.nn.Module, fn, scope: str = "blocks") -> None:
    """Replace each targeted weight W (viewed as [out, in]) by fn(W, target), in place, in W's dtype."""
    with torch.no_grad():
        for t in find_targets(model, scope):
            w = t.weight
            if t.transposed:
                w.copy_(fn(w.detach().t().contiguous(), t).t())
            else:
                w.copy_(fn(w.detach(), t))


class ModelState:
    """A copy of every parameter and buffer of a model; `restore()` puts the FP model back bit for bit.

    On CUDA the copy lives in (pinned) host memory, so it costs no GPU memory.
    """

    def __init__(self, model: torch.nn.Module):
        self._pairs = []
        seen = set()
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            copy = t.detach().to("cpu", copy=True)
            if t.is_cuda:
                copy = copy.pin_memory()
            self._pairs.append((t, copy))

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in self._pairs:
                if t.shape != saved.shape:  # released by a checkpoint condition that failed to load
                    t.data = torch.empty(saved.shape, dtype=saved.dtype, device=t.device)
                t.copy_(saved, non_blocking=True)


FPWeights = ModelState  # the name the runner has always used


# ------------------------------------------------------------------------------------------ the methods

@dataclass(frozen=True)
class Key:
    """One key of a method spec: its type, default and one line of help."""

    name: str
    kind: str  # "int", "float", "bool", "str", "pattern"
    default: Any
    help: str
    choices: tuple = ()


class Method:
    """Mixin for condition dataclasses built from a `--method` spec.

    Class attributes: `method` (the spec name), `summary` (one line), `library` (who implements it),
    `requires` (importable modules), `calibration` (needs held-out tokens), `keys` (the spec keys).
    """

    method: ClassVar[str]
    summary: ClassVar[str] = ""
    library: ClassVar[str] = "qdm-engine"
    requires: ClassVar[tuple[str, ...]] = ()
    install: ClassVar[str] = ""
    calibration: ClassVar[bool] = False
    keys: ClassVar[tuple[Key, ...]] = ()
    listed: ClassVar[bool] = True  # False for shorthands (--prune) that are not `--method` names

    def check(self, model: torch.nn.Module) -> None:
        """Shape checks against the model, before any forward (a QdmError names the fix)."""
        return None

    def describe(self) -> dict:
        d = {"method": self.method, "library": self.library}
        for f in fields(self):
            if f.name in ("calib",):
                continue
            d[f.name] = getattr(self, f.name)
        return d


@dataclass(frozen=True)
class CalibrationTokens:
    """Held-out token blocks for the methods that calibrate (never the audit's blocks)."""

    ids: torch.Tensor  # [n_blocks, block_len]
    sha256: str
    source: str

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())


def needs_library(cls) -> str | None:
    """The pip install line for a method whose library is missing, else None."""
    missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return cls.install or f"pip install {' '.join(missing)}"


def _parse_value(method: str, key: Key, raw: str):
    where = f"--method {method}: {key.name}={raw}"
    try:
        if key.kind == "int":
            v = int(raw)
        elif key.kind == "float":
            v = float(raw)
            if not math.isfinite(v):
                raise ValueError
        elif key.kind == "bool":
            low = raw.lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            v = low in ("1", "true", "yes")
        elif key.kind == "pattern":
            n, m = (int(x) for x in raw.split(":"))
            if not 0 < n < m:
                raise ValueError
            v = f"{n}:{m}"
        else:
            v = raw
    except ValueError:
        expect = {"int": "a whole number", "float": "a number", "bool": "true or false",
                  "pattern": "N:M with 0 < N < M, e.g. 2:4", "str": "a value"}[key.kind]
        raise QdmError(f"{where}: expected {expect}") from None
    if key.choices and isinstance(v, str):
        v = next((c for c in key.choices if str(c).lower() == v.lower()), v)
    if key.choices and v not in key.choices:
        raise QdmError(f"{where}: choose one of {', '.join(map(str, key.choices))}")
    return v


def parse_method(spec: str, check_library: bool = True):
    """A condition from 'NAME[:KEY=VALUE,...]', e.g. 'gptq:bits=4,group=128'; a QdmError names the fix."""
    _load_all()
    spec = str(spec).strip()
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name not in spec_methods():
        raise QdmError(f"unknown --method '{name}'; known: {', '.join(sorted(spec_methods()))} "
                       "(qdm-engine methods lists them with their keys)")
    cls = METHODS[name]
    known = {k.name: k for k in cls.keys}
    values = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip().lower()
        if not eq or not raw.strip():
            raise QdmError(f"--method {spec}: '{item}' is not KEY=VALUE")
        if key not in known:
            keys = ", ".join(known) or "none"
            raise QdmError(f"--method {spec}: unknown key '{key}' for {name}; its keys: {keys}")
        if key in values:
            raise QdmError(f"--method {spec}: key '{key}' given twice")
        values[key] = _parse_value(spec, known[key], raw.strip())
    if check_library:
        fix = needs_library(cls)
        if fix:
            raise QdmError(f"--method {name} needs {cls.library}, which is not installed; {fix}")
    kwargs = {k.name: values.get(k.name, k.default) for k in cls.keys}
    try:
        return cls(**kwargs)
    except QdmError as exc:
        raise QdmError(f"--method {spec}: {exc}") from None


def spec_methods() -> dict[str, type]:
    """The methods a `--method` spec can name, in listing order."""
    _load_all()
    return {n: c for n, c in METHODS.items() if issubclass(c, Method) and c.listed}


def check_divides(targets: list[Target], block: int, what: str, fix: str) -> None:
    """Every target's input width must be a multiple of `block` (group size, GGUF block...)."""
    for t in targets:
        if t.in_features % block:
            raise QdmError(f"{what} {block} does not divide the width {t.in_features} of {t.name}; {fix}")


_LOADED = False


def _load_all() -> None:
    """Import every method module once, so they register (libraries are imported lazily inside them)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from qdm_engine.engine.compress import (  # noqa: F401
        bnb, gguf_types, hqq_method, llmc, rtn, sparsity,
    )


@dataclass(frozen=True)
class FP:
    """No compression. As a condition it is the FP-vs-FP null: the FP model run again like any other."""

    method = "fp"

    @property
    def name(self) -> str:
        return "fp-null"

    def apply(self, model: torch.nn.Module) -> None:
        return None

    def check(self, model: torch.nn.Module) -> None:
        return None

    def describe(self) -> dict:
        return {"method": self.method}


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


def spec_of(cond) -> str | None:
    """The `--method` spec that rebuilds `cond` (recorded in config.json; the FP null has none)."""
    inner = getattr(cond, "inner", cond)  # a matched condition: its method at the matched strength
    if not isinstance(inner, Method):
        return None
    name = "magnitude" if not type(inner).listed else inner.method
    cls = METHODS[name]
    parts = []
    for k in cls.keys:
        v = getattr(inner, k.name, None)
        if v is not None:
            parts.append(f"{k.name}={str(v).lower() if isinstance(v, bool) else v}")
    return name + (":" + ",".join(parts) if parts else "")
