"""GPTQ and AWQ (GEMM) folders unpacked to dense weights on the host, without gptqmodel.

Both formats store each quantized Linear as integer codes packed into int32 words, one zero point and one
scale per (group of inputs, output), and dequantize as W[o, i] = scale[g(i), o] * (q[i, o] - zero[g(i), o]).
The packed words are a little-endian stream of `bits`-bit codes (a 3-bit code may straddle two words).

- GPTQ (`quant_method: gptq`): `qweight` [in*bits/32, out] packs along the input, `qzeros`
  [groups, out*bits/32] along the output, `scales` [groups, out], `g_idx` [in] the group of each input
  (act-order / desc_act checkpoints permute it). `checkpoint_format: gptq` (v1, the default) stores
  zero - 1, written by gptqmodel as one subtraction of 0x11111111 (4-bit; 0x01010101 8-bit, 0x55555555
  2-bit) from each word, borrows included, and per code for 3-bit; `gptq_v2` stores the zero itself.
  Bits 2, 3, 4, 8 with int32 words; gptqmodel's per-module `dynamic` rules are followed for bits and
  group size ('-:pattern' leaves a module dense; a quantized lm_head is written as such a rule). The planar
  `gptq_p` layout (and 5/6/7 bits), other pack dtypes, per-module layout overrides, rotations and adapters
  are refused.
- AWQ GEMM (`quant_method: awq`, `version`/`format: gemm`): `qweight` [in, out*4/32] and `qzeros`
  [groups, out*4/32] both pack along the output, eight 4-bit codes per word in AutoAWQ's interleaved
  order (word slot k holds column 8j + [0, 2, 4, 6, 1, 3, 5, 7][k]), `scales` [groups, out], groups
  contiguous along the input. 4-bit GEMM only; GEMV, GEMV-fast, Marlin and other layouts are refused.

Everything else in the files (embeddings, norms, biases, modules left unquantized such as `lm_head`
or `modules_to_not_convert`) is read as stored; the architecture is built from config.json with its
quantization_config removed. Only .safetensors files are read (no pickles).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qdm_engine.errors import QdmError

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word slot k holds column AWQ_ORDER[k] of its block of 8
# quantization_config keys whose presence changes what the weights mean (a rotation, an adapter or activation
# quantization applied at run time, AutoGPTQ's old Marlin repacking): refused rather than unpacked wrongly
_UNSUPPORTED_KEYS = ("rotation", "adapter", "activation", "hadamard", "is_marlin_format")
_PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def packed_spec(path: str, q: dict) -> dict:
    """The layout of a GPTQ / AWQ folder from its quantization_config: {method, bits, group_size, v1 (GPTQ
    zeros stored minus one), dynamic (per-module rules)}; QdmError naming the field for anything this
    unpacker does not read."""
    method = str(q.get("quant_method", "")).lower()
    where = f"--compressed {path}"
    for key in _UNSUPPORTED_KEYS:
        if q.get(key):
            raise QdmError(f"{where}: quantization_config.{key} is set ({str(q[key])[:60]}); rotations, "
                           "adapters and activation quantization are not unpacked (plain GPTQ/AWQ weights only)")
    rules = _dynamic_rules(where, q.get("dynamic"))
    try:
        bits = int(q.get("bits", q.get("w_bit", 4)))
        group = int(q.get("group_size", q.get("q_group_size", 128)))
    except (TypeError, ValueError):
        raise QdmError(f"{where}: quantization_config bits/group_size are not integers "
                       f"({q.get('bits')!r}, {q.get('group_size')!r})") from None
    if group != -1 and group <= 0:
        raise QdmError(f"{where}: quantization_config.group_size {group} is not a positive size or -1")
    pack = str(q.get("pack_dtype") or "int32").lower().removeprefix("torch.")
    if pack != "int32":
        raise QdmError(f"{where}: pack_dtype '{pack}' is not unpacked; only int32 words are")
    if method == "gptq":
        fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
        if fmt not in GPTQ_FORMATS:
            raise QdmError(f"{where}: GPTQ checkpoint_format '{fmt}' is not unpacked; supported: "
                           + ", ".join(GPTQ_FORMATS) + " (repack with gptqmodel to one of them)")
        for b in {bits} | {int(o.get("bits", bits)) for _, _, o in rules if o}:
            if b not in GPTQ_BITS:
                raise QdmError(f"{where}: GPTQ bits={b} is not unpacked; supported: "
                               + ", ".join(map(str, GPTQ_BITS)) + " (5/6/7 bits exist only in the planar layout)")
        return {"method": "gptq", "bits": bits, "group_size": group, "v1": fmt == "gptq", "dynamic": rules}
    if method == "awq":
        fmt = str(q.get("version") or q.get("format") or "gemm").lower()
        if fmt != "gemm":
            raise QdmError(f"{where}: AWQ version/format '{fmt}' is not unpacked; only the GEMM layout is")
        if bits != 4 or any(o and int(o.get("bits", 4)) != 4 for _, _, o in rules):
            raise QdmError(f"{where}: AWQ bits={bits} is not unpacked; only 4-bit GEMM is")
        return {"method": "awq", "bits": bits, "group_size": group, "v1": False, "dynamic": rules}
    raise QdmError(f"{where}: quant_method '{method}' is not a GPTQ or AWQ folder")


def _dynamic_rules(where: str, dynamic) -> list:
    """gptqmodel's per-module `dynamic` overrides as ordered (skip, pattern, overrides) rules: the first
    pattern that matches a module's full name from its start decides; '-:' leaves it dense, '+:' or a bare
    pattern overrides its bits / group_size (anything that changes the storage layout is refused)."""
    import re

    rules = []
    for key, over in (dynamic or {}).items():
        key = str(key)
        skip = key.startswith("-:")
        try:
            pattern = re.compile(key[2:] if key.startswith(("-:", "+:")) else key)
        except re.error as exc:
            raise QdmError(f"{where}: quantization_config.dynamic pattern {key!r} is not a regex: {exc}") from None
        over = dict(over or {})
        bad = sorted(set(over) & {"format", "checkpoint_format", "pack_dtype", "quant_method", "method"})
        if bad and not skip:
            raise QdmError(f"{where}: quantization_config.dynamic {key!r} overrides {bad[0]}; per-module "
                           "layouts are not unpacked (only per-module bits and group sizes)")
        rules.append((skip, pattern, None if skip else over))
    return rules


def _module_layout(spec: dict, name: str) -> tuple[int, int] | None:
    """(bits, group_size) of module `name` after `dynamic`, or None where a '-:' rule leaves it dense."""
    for skip, pattern, over in spec.get("dynamic", ()):
        if pattern.match(name):
            if skip:
                return None
            return int(over.get("bits", spec["bits"])), int(over.get("group_size", spec["group_size"]))
    return spec["bits"], spec["group_size"]


def unpack_codes(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """int32 codes 0..2^bits-1 of int32 `words` (2-D) read as a little-endian stream of `bits`-bit codes
    along `dim` (code c occupies stream bits c*bits .. c*bits+bits-1, word w its bits 32w .. 32w+31)."""
    n = words.shape[dim]
    if count * bits > 32 * n:
        raise ValueError(f"{n} words hold fewer than {count} {bits}-bit codes")
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # whole codes per word: shift each word by 0, bits, 2*bits ... (the sign bits are masked)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32)
        w = words.to(torch.int32)
        if dim == 0:
            codes = (w.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask
            return codes.reshape(-1, w.shape[1])[:count]
        codes = (w.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask
        return codes.reshape(w.shape[0], -1)[:, :count]
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    start = torch.arange(count, dtype=torch.int64) * bits
    lo, shift = start // 32, start % 32
    hi = (lo + 1).clamp(max=n - 1)
    pair = w[..., lo] | (w[..., hi] << 32)  # the code's word and the next (a 3-bit code may straddle them)
    return ((pair >> shift) & mask).to(torch.int32).movedim(-1, dim)


def _v1_zeros(qzeros: torch.Tensor, bits: int, out: int) -> torch.Tensor:
    """GPTQ v1 zero points: gptqmodel writes zero - 1 as one int32 subtraction per word (each field's -1
    borrowing from the next when the zero is 0) for 2/4/8 bits, and per code for 3 bits; undone the same way."""
    if bits == 3:
        return (unpack_codes(qzeros, bits, out, 1) + 1) & 7
    ones = sum(1 << (bits * k) for k in range(32 // bits))
    words = ((qzeros.to(torch.int64) + ones) & 0xFFFFFFFF).to(torch.int32)  # modulo 2^32, back to int32 bits
    return unpack_codes(words, bits, out, 1)


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, v1: bool, in_features: int) -> torch.Tensor:
    """Dense float32 (out, in) weight of one GPTQ module (exact: a float16 scale times a small integer)."""
    out = scales.shape[1]
    if qweight.shape[0] != -(-in_features * bits // 32) or qzeros.shape[1] != -(-out * bits // 32):
        raise ValueError(f"qweight {tuple(qweight.shape)} / qzeros {tuple(qzeros.shape)} do not hold {bits}-bit "
                         f"codes of {in_features} inputs x {out} outputs")
    q = unpack_codes(qweight, bits, in_features, 0)  # [in, out]
    z = _v1_zeros(qzeros, bits, out) if v1 else unpack_codes(qzeros, bits, out, 1)  # [groups, out]
    g = g_idx.to(torch.int64)
    w = scales.to(torch.float32)[g] * (q - z[g]).to(torch.float32)
    return w.t().contiguous()


def dequantize_awq(qweight, qzeros, scales, bits: int = 4) -> torch.Tensor:
    """Dense float32 (out, in) weight of one AWQ GEMM module."""
    groups, out = scales.shape
    if out % 8 or qweight.shape[1] * 8 != out or qzeros.shape != (groups, out // 8):
        raise ValueError(f"qweight {tuple(qweight.shape)} / qzeros {tuple(qzeros.shape)} do not hold 4-bit "
                         f"codes of {out} outputs in {groups} groups")
    inv = torch.tensor(AWQ_ORDER).argsort()  # logical column c of a block sits in slot inv[c]
    perm = (torch.arange(out) // 8) * 8 + inv[torch.arange(out) % 8]
    q = unpack_codes(qweight, bits, out, 1)[:, perm]  # [in, out]
    z = unpack_codes(qzeros, bits, out, 1)[:, perm]  # [groups, out]
    size = q.shape[0] // groups
    w = (q - z.repeat_interleave(size, 0)).to(torch.float32) * scales.to(torch.float32).repeat_interleave(size, 0)
    return w.t().contiguous()


def _weight_files(root: Path, path: str) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise QdmError(f"--compressed {path}: no .safetensors weights (pickled .bin checkpoints are not read); "
                       "pass a folder saved with safetensors")
    return files


def dense_state_dict(path: str, spec: dict, shapes: dict[str, tuple], dtype: torch.dtype) -> dict:
    """Every tensor of the model in `dtype`, quantized Linears dequantized; `shapes` (name -> shape of the
    dense architecture) names which weights are expected and checks each dequantized one."""
    from safetensors import safe_open

    root = Path(path).expanduser()
    dense, packed = {}, {}
    for f in _weight_files(root, path):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                prefix, _, leaf = key.rpartition(".")
                if leaf in _PACKED_SUFFIXES and f"{prefix}.weight" in shapes:
                    packed.setdefault(prefix, {})[leaf] = fh.get_tensor(key)
                else:
                    t = fh.get_tensor(key)
                    dense[key] = t.to(dtype) if t.is_floating_point() else t
    where = f"--compressed {path}"
    for prefix, parts in packed.items():
        name = f"{prefix}.weight"
        layout = _module_layout(spec, prefix)
        if layout is None:
            raise QdmError(f"{where}: {prefix} is packed although quantization_config.dynamic leaves it dense")
        bits, group_size = layout
        need = ("qweight", "qzeros", "scales")
        missing = [k for k in need if k not in parts]
        if missing:
            raise QdmError(f"{where}: {prefix} has no {', '.join(missing)}; not a complete "
                           f"{spec['method'].upper()} module")
        out_f, in_f = shapes[name] if len(shapes[name]) == 2 else (None, None)
        scales = parts["scales"]
        if out_f is None or scales.shape[1] != out_f:
            raise QdmError(f"{where}: {prefix}.scales is {tuple(scales.shape)}, the dense {name} "
                           f"{shapes[name]}; the quantized module does not fit the architecture in config.json")
        try:
            if spec["method"] == "gptq":
                g_idx = parts.get("g_idx")
                if g_idx is None:
                    size = in_f if group_size == -1 else group_size
                    g_idx = torch.arange(in_f) // size
                if g_idx.shape != (in_f,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]:
                    raise ValueError(f"g_idx {tuple(g_idx.shape)} does not index {scales.shape[0]} groups "
                                     f"of {in_f} inputs")
                w = dequantize_gptq(parts["qweight"], parts["qzeros"], scales, g_idx, bits, spec["v1"], in_f)
            else:
                if parts["qweight"].shape[0] != in_f or in_f % scales.shape[0]:
                    raise ValueError(f"qweight {tuple(parts['qweight'].shape)} and {scales.shape[0]} groups "
                                     f"do not fit {in_f} inputs")
                w = dequantize_awq(parts["qweight"], parts["qzeros"], scales, bits)
        except (ValueError, IndexError, RuntimeError) as exc:
            raise QdmError(f"{where}: {prefix} cannot be unpacked as {bits}-bit "
                           f"{spec['method'].upper()}: {str(exc).splitlines()[0]}") from None
        if tuple(w.shape) != tuple(shapes[name]):
            raise QdmError(f"{where}: {prefix} unpacks to {tuple(w.shape)}, the architecture has {shapes[name]}")
        dense[name] = w.to(dtype)
    if not packed:
        raise QdmError(f"{where}: no quantized module (qweight) matches the architecture in config.json")
    return dense


def load_packed(path: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """The dense model of a GPTQ / AWQ folder on the host (the architecture of its config.json, each
    quantized Linear dequantized, every other tensor as stored)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    q = cfg.quantization_config if isinstance(cfg.quantization_config, dict) else cfg.quantization_config.to_dict()
    spec = packed_spec(path, q)
    cfg.quantization_config = None
    del cfg.quantization_config  # from_pretrained would otherwise look for a quantizer
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    shapes = {n: tuple(p.shape) for n, p in skeleton.state_dict().items()}
    cls = type(skeleton)  # the concrete class (the Auto class wants a path with a state_dict)
    del skeleton
    sd = dense_state_dict(path, spec, shapes, dtype)
    lm, info = cls.from_pretrained(None, config=cfg, state_dict=sd, dtype=dtype, output_loading_info=True)
    missing = sorted(set(info.get("missing_keys", ())) - _tied(lm))
    if missing:
        raise QdmError(f"--compressed {path}: {len(missing)} weights of the architecture are not in the files "
                       f"(first: {missing[0]}); the folder is incomplete")
    return lm


def _tied(lm) -> set[str]:
    """Parameter names that alias another one (a tied lm_head), which a folder need not store."""
    every = {n for n, _ in lm.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in lm.named_parameters()}
