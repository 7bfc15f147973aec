"""Compression methods behind `--method`: spec parsing, each method against its library's own result,
the FP model restored bit for bit after every method, calibration, and the CLI end to end."""

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch

from qdm_testing import D_MODEL, build_tiny_model, make_tokenizer, make_text
from qdm_engine.engine.compress import (
    CalibrationTokens, ModelState, find_targets, parse_method, spec_methods,
)
from qdm_engine.engine.models import load_model
from qdm_engine.errors import QdmError

HAVE_LLMC = importlib.util.find_spec("llmcompressor") is not None
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAVE_HQQ = importlib.util.find_spec("hqq") is not None
needs_llmc = pytest.mark.skipif(not HAVE_LLMC, reason="llmcompressor is not installed")


def _ggml_ready() -> bool:
    from qdm_engine.engine.compress.ggml import ggml_status

    return ggml_status() is None


needs_ggml = pytest.mark.skipif(not _ggml_ready(), reason="ggml not built (qdm-engine build-ggml)")

# every method with group sizes the tiny model (width 32, MLP 64) can take
SPECS = [
    "rtn:bits=4", "rtn:bits=4,group=16,sym=false", "gptq:bits=4,group=16", "gptq:bits=3,group=16,act_order=true",
    "awq:bits=4,group=16", "hqq:bits=4,group=16", "nf4", "fp4", "llm-int8", "fp8", "mxfp4", "nvfp4",
    "gguf:type=Q8_0", "gguf:type=Q4_0", "gguf:type=Q5_1", "gguf:type=Q4_K", "gguf:type=Q2_K",
    "magnitude:sparsity=0.3", "magnitude:pattern=2:4", "wanda:sparsity=0.5", "wanda:pattern=2:4",
    "sparsegpt:sparsity=0.5", "sparsegpt:pattern=2:4",
]


def _available(spec: str) -> bool:
    try:
        parse_method(spec)
    except QdmError:
        return False
    return True


def _calib(n=8, length=32, seed=0) -> CalibrationTokens:
    g = torch.Generator().manual_seed(seed)
    return CalibrationTokens(torch.randint(3, 190, (n, length), generator=g), "test", "random ids")


def _bind(cond, calib=None):
    if getattr(cond, "calibration", False):
        return dataclasses.replace(cond, calib=calib or _calib())
    return cond


# ------------------------------------------------------------------------------------------- the specs

def test_listing_has_at_least_14_methods_with_keys_and_libraries():
    from qdm_engine.engine.compress.listing import format_methods, method_rows

    rows = method_rows()
    assert len(rows) >= 14
    names = [r["method"] for r in rows]
    for m in ("rtn", "gptq", "awq", "hqq", "nf4", "fp4", "fp8", "mxfp4", "nvfp4", "gguf", "magnitude", "wanda",
              "sparsegpt"):
        assert m in names
    calibrated = {r["method"] for r in rows if r["calibration"]}
    assert calibrated == {"gptq", "awq", "wanda", "sparsegpt"}
    text = format_methods(rows)
    assert "gptq" in text and "act_order=False" in text and "llm-compressor" in text


@pytest.mark.parametrize("spec, name", [
    ("rtn:bits=4", "int4"), ("rtn:bits=4,group=128", "int4-g128"), ("rtn:bits=3,sym=false", "int3-asym"),
    ("gptq:bits=4,group=128", "gptq-w4g128"), ("gptq", "gptq-w4g128"), ("gptq:act_order=true", "gptq-w4g128-act"),
    ("awq:bits=4", "awq-w4g128"), ("hqq:bits=4", "hqq-w4g64"), ("nf4", "nf4"), ("fp8", "fp8"),
    ("gguf:type=Q4_0", "gguf-q4_0"), ("gguf:type=q8_0", "gguf-q8_0"), ("wanda:sparsity=0.5", "wanda-50"),
    ("wanda:pattern=2:4", "wanda-2of4"), ("sparsegpt:sparsity=0.25", "sparsegpt-25"),
    ("magnitude:sparsity=0.175", "magnitude-17.5"), ("mxfp4", "mxfp4"), ("nvfp4", "nvfp4"),
])
def test_condition_names_are_short_and_deterministic(spec, name):
    if not _available(spec):
        pytest.skip(f"{spec}: library not installed")
    assert parse_method(spec).name == name
    assert parse_method(spec) == parse_method(spec)


@pytest.mark.parametrize("spec, message", [
    ("gpqt:bits=4", "unknown --method 'gpqt'"),
    ("rtn:bitz=4", "unknown key 'bitz' for rtn; its keys: bits, group, sym, scope"),
    ("rtn:bits=four", "bits=four: expected a whole number"),
    ("rtn:bits=1", "bits must be in 2..16"),
    ("rtn:bits", "'bits' is not KEY=VALUE"),
    ("rtn:bits=4,bits=5", "key 'bits' given twice"),
    ("magnitude:sparsity=1.5", "sparsity must be in [0, 1)"),
    ("magnitude:pattern=4:2", "expected N:M with 0 < N < M"),
    ("nf4:group=100", "choose one of 32, 64"),
    ("gguf:type=Q7_0", "choose one of Q8_0"),
    ("rtn:sym=maybe", "expected true or false"),
])
def test_bad_specs_name_the_fix(spec, message):
    with pytest.raises(QdmError) as exc:
        parse_method(spec)
    assert message in str(exc.value)


def test_a_missing_library_names_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "hqq" else real(n, *a))
    with pytest.raises(QdmError, match=r"--method hqq needs hqq, which is not installed; pip install hqq"):
        parse_method("hqq:bits=4")


# --------------------------------------------------------------------------- targets of any decoder model

def _tiny_family(tmp_path, family):
    import transformers

    tok = make_tokenizer(make_text())
    common = dict(vocab_size=len(tok), num_hidden_layers=2, hidden_size=D_MODEL, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    cfg = {
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=8),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(**common, head_dim=8),
        "phi3": lambda: transformers.Phi3Config(**common, pad_token_id=0),
        "olmo2": lambda: transformers.Olmo2Config(**common),
    }[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path / family)
    tok.save_pretrained(tmp_path / family)
    return tmp_path / family


EXPECTED_PER_LAYER = {  # the linears of one decoder layer, as each family's modelling code defines them
    "llama": 7, "mistral": 7, "qwen2": 7, "gemma2": 7, "gpt_neox": 4, "gpt2": 4,
    "qwen3": 7, "gemma3_text": 7, "phi3": 4, "olmo2": 7,
}


@pytest.mark.parametrize("family", list(EXPECTED_PER_LAYER))
def test_targets_found_from_the_model_in_every_family(tmp_path, family):
    path = (build_tiny_model(tmp_path / family, family) if family in ("llama", "mistral", "qwen2", "gemma2",
                                                                      "gpt_neox", "gpt2")
            else _tiny_family(tmp_path, family))
    model, _, ident = load_model(str(path))
    targets = find_targets(model)
    assert len(targets) == EXPECTED_PER_LAYER[family] * ident["n_layers"]
    assert all(t.kind == "linear" for t in targets)
    assert all(t.transposed == (family == "gpt2") for t in targets)
    linear_ids = {id(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings()
    assert {id(t.module) for t in targets} | {id(head)} >= linear_ids - {id(head)}
    # scope all adds the embedding and an untied head, once each
    every = find_targets(model, "all")
    kinds = [t.kind for t in every if t.kind != "linear"]
    tied = model.get_input_embeddings().weight is head.weight
    assert kinds == (["embedding"] if tied else ["embedding", "head"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = ModelState(model)
    parse_method("rtn:bits=3").apply(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {t.name for t in targets}
    saved.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------ restore after every method

@pytest.mark.parametrize("spec", SPECS)
def test_fp_model_restored_bitwise_after_every_method(tiny_llama, spec):
    if not _available(spec):
        pytest.skip(f"{spec}: library not installed")
    model, _, _ = load_model(str(tiny_llama))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = {n for n, _ in model.named_parameters()}
    cond = _bind(parse_method(spec))
    cond.check(model)
    saved = ModelState(model)
    with torch.inference_mode():  # as in the runner
        cond.apply(model)
    targets = {t.name for t in find_targets(model)}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, f"{spec} changed nothing"
    assert changed <= targets | {n for n in names if "layernorm" in n or "norm" in n}, changed - targets
    if not spec.startswith("awq"):
        assert changed <= targets, changed - targets
    saved.restore()
    assert {n for n, _ in model.named_parameters()} == names
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} differs after {spec} and restore"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------- each method against its library's result

def _weights(model):
    return {t.name: t.weight.detach().clone() for t in find_targets(model)}


@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_bnb_4bit_equals_transformers_bitsandbytes_load(tiny_llama, kind):
    """The weights of a transformers load_in_4bit model, dequantized before its first forward (the doc's
    warning: a CPU forward repacks them), equal ours bit for bit."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ours, _, _ = load_model(str(tiny_llama))
    parse_method(kind).apply(ours)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama), quantization_config=cfg, dtype=torch.float32,
                                               device_map="cpu")
    mods = dict(ref.named_modules())
    n = 0
    for t in find_targets(ours):
        m = mods[t.name.removesuffix(".weight")]
        dense = F.dequantize_4bit(m.weight.data, m.weight.quant_state).to(torch.float32)
        assert torch.equal(dense, t.weight), t.name
        n += 1
    assert n == 21


@pytest.mark.skipif(not HAVE_HQQ, reason="hqq is not installed")
def test_hqq_equals_hqq_quantizer(tiny_llama):
    from hqq.core.quantize import Quantizer

    ours, _, _ = load_model(str(tiny_llama))
    before = _weights(ours)
    parse_method("hqq:bits=4,group=16").apply(ours)
    for t in find_targets(ours):
        q, meta = Quantizer.quantize(before[t.name], nbits=4, group_size=16, axis=1, optimize=True,
                                     round_zero=True, compute_dtype=torch.float32, device="cpu")
        ref = Quantizer.dequantize(q, meta).reshape(t.weight.shape).to(torch.float32)
        assert torch.equal(ref, t.weight), t.name


@pytest.mark.parametrize("gtype", ["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "MXFP4"])
def test_gguf_legacy_round_trip_equals_gguf_dequantize(gtype):
    import gguf

    from qdm_engine.engine.compress.gguf_types import gguf_round_trip

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    qt = gguf.GGMLQuantizationType[gtype]
    ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qt), qt)
    assert torch.equal(gguf_round_trip(w, gtype), torch.from_numpy(ref))


@needs_ggml
@pytest.mark.parametrize("gtype", ["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"])
def test_gguf_legacy_bytes_equal_llama_cpp_quantizer(gtype):
    """The `gguf` package's quantizer (numpy) and llama.cpp's ggml (C) write the same bytes."""
    import gguf

    from qdm_engine.engine.compress.ggml import ggml_quantize

    w = (torch.randn(8, 512, generator=torch.Generator().manual_seed(2)) * 0.05).numpy()
    qt = gguf.GGMLQuantizationType[gtype]
    ours = gguf.quants.quantize(w, qt)
    theirs = ggml_quantize(w, int(qt), *gguf.GGML_QUANT_SIZES[qt])
    assert np.array_equal(ours, theirs)


@needs_ggml
@pytest.mark.parametrize("gtype", ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"])
def test_gguf_kquants_dequantize_like_ggml(gtype):
    """k-quant bytes from ggml; gguf's dequantizer equals ggml's own to_float on them."""
    import ctypes

    import gguf

    from qdm_engine.engine.compress.ggml import _load, ggml_quantize

    lib = _load()
    qt = gguf.GGMLQuantizationType[gtype]
    w = (torch.randn(4, 512, generator=torch.Generator().manual_seed(3)) * 0.05).numpy()
    q = ggml_quantize(w, int(qt), *gguf.GGML_QUANT_SIZES[qt])
    # ggml_get_type_traits(type)->to_float(const void *x, float *y, int64_t k)
    lib.ggml_get_type_traits.restype = ctypes.POINTER(ctypes.c_void_p * 8)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    traits = lib.ggml_get_type_traits(int(qt)).contents
    # struct ggml_type_traits { const char *type_name; int64_t blck_size; int64_t blck_size_interleave;
    #   size_t type_size; bool is_quantized; to_float; from_float_ref; }
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits[5])
    out = np.zeros_like(w)
    to_float(q.ctypes.data, out.ctypes.data, w.size)
    assert np.array_equal(gguf.quants.dequantize(q, qt).reshape(w.shape), out)
    assert np.abs(out - w).max() < 0.05 * {"Q6_K": 0.1, "Q5_K": 0.2, "Q4_K": 0.4, "Q3_K": 0.8, "Q2_K": 1.6}[gtype] * 4


@needs_ggml
def test_gguf_kquant_falls_back_like_llama_cpp(tiny_llama):
    """Rows of 32 weights cannot take Q4_K's 256-blocks: llama.cpp's rule uses Q5_0 there."""
    from qdm_engine.engine.compress.gguf_types import gguf_round_trip

    model, _, _ = load_model(str(tiny_llama))
    before = _weights(model)
    cond = parse_method("gguf:type=Q4_K")
    cond.check(model)
    cond.apply(model)
    for t in find_targets(model):
        assert torch.equal(t.weight, gguf_round_trip(before[t.name], "Q5_0")), t.name
    with pytest.raises(QdmError, match="blocks of 256 weights, which does not divide the width 32"):
        parse_method("gguf:type=Q4_K,fallback=false").check(model)


def _llmc_reference(model_dir, recipe, calib, tmp_path):
    """llm-compressor run by hand on a fresh load, saved compressed, reloaded dequantized by transformers."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    kw = {}
    if calib is not None:
        ids = calib.ids.tolist()
        kw = dict(dataset=Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}),
                  num_calibration_samples=len(ids), max_seq_length=len(ids[0]), shuffle_calibration_samples=False)
    oneshot(model=m, recipe=recipe, **kw)
    out = tmp_path / "compressed"
    m.save_pretrained(out, save_compressed=True)
    quantized = "quantization_config" in json.loads((out / "config.json").read_text())  # as written to disk
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quantized else {}
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, **kw)


@needs_llmc
@pytest.mark.parametrize("spec", ["gptq:bits=4,group=16", "fp8", "wanda:sparsity=0.5"])
def test_llmcompressor_methods_equal_their_saved_checkpoint(tiny_llama, tmp_path, spec):
    """Our dense weights equal what the checkpoint llm-compressor saves for the same recipe and
    calibration tokens dequantizes to, when transformers loads it back."""
    from qdm_engine.engine.compress.llmc import _ignore, _scheme, _weight_args

    calib = _calib()
    ours, _, _ = load_model(str(tiny_llama))
    cond = _bind(parse_method(spec), calib)
    with torch.inference_mode():
        cond.apply(ours)
    if spec.startswith("gptq"):
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups=_scheme(_weight_args(4, 16, True)), ignore=_ignore(ours),
                              dampening_frac=0.01, actorder=None)
    elif spec == "fp8":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        recipe = QuantizationModifier(config_groups=_scheme(_weight_args(8, None, True, kind="float")),
                                      ignore=_ignore(ours))
        calib = None
    else:
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        recipe = WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=_ignore(ours))
    ref = _llmc_reference(tiny_llama, recipe, calib, tmp_path)
    ref_params = dict(ref.named_parameters())
    for t in find_targets(ours):
        r = ref_params[t.name].detach().to(torch.float32)
        assert torch.equal(r, t.weight), f"{t.name}: max |d| {(r - t.weight).abs().max():.3g}"


def test_calibration_is_required_and_held_out(tiny_llama, tiny_sae, text_file, tmp_path):
    if not HAVE_LLMC:
        pytest.skip("llmcompressor is not installed")
    with pytest.raises(QdmError, match="needs calibration tokens"):
        parse_method("wanda").apply(load_model(str(tiny_llama))[0])
    from qdm_engine.audit import sweep
    from qdm_engine.engine.tokens import make_blocks, read_text

    res = sweep(model=str(tiny_llama), sae=str(tiny_sae), bits=None, methods=["wanda:sparsity=0.3"],
                text=str(text_file), tokens=256, block_len=32, calib_tokens=128, progress=False,
                log=lambda _m: None)
    cal = res.config["tokens"]["calibration"]
    assert cal["blocks"] == 4 and cal["tokens"] == 128 and "after the audit blocks" in cal["disjoint"]
    tok = load_model(str(tiny_llama))[1]
    text = read_text(str(text_file))
    audit = make_blocks(tok, text, 32, 256, True)
    held = make_blocks(tok, text, 32, 128, True, skip_blocks=audit.n_blocks)
    import hashlib

    assert cal["sha256"] == hashlib.sha256(held.ids.numpy().tobytes()).hexdigest()
    # disjoint: the held-out blocks are the text's tokens after every audit block
    assert audit.text_tokens >= (audit.n_blocks + held.n_blocks) * 31


# --------------------------------------------------------------------------------------- the CLI

def test_cli_sweep_with_many_methods(tiny_llama, tiny_sae, text_file, tmp_path, capsys):
    from qdm_engine.cli import main

    specs = ["rtn:bits=4,group=16", "hqq:bits=4,group=16", "nf4", "gguf:type=Q4_0", "magnitude:pattern=2:4",
             "fp8", "gptq:bits=4,group=16", "wanda:sparsity=0.5", "llm-int8"]
    specs = [s for s in specs if _available(s)]
    assert len(specs) >= 6
    out = tmp_path / "run"
    argv = ["sweep", "--model", str(tiny_llama), "--sae", str(tiny_sae), "--text", str(text_file), "--tokens",
            "256", "--block-len", "32", "--calib-tokens", "128", "--quiet", "--out", str(out)]
    for s in specs:
        argv += ["--method", s]
    assert main(argv) == 0
    import pandas as pd

    summary = pd.read_csv(out / "summary.csv")
    names = [parse_method(s).name for s in specs]
    assert summary["condition"].tolist() == ["fp"] + names  # --bits defaults to none when --method is given
    for n in names:
        assert (out / "features" / f"{n}.parquet").is_file()
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert [c["name"] for c in cfg["conditions"]] == names
    assert all("library" in c for c in cfg["conditions"])


@pytest.mark.parametrize("argv, message", [
    (["--method", "nosuch"], "unknown --method 'nosuch'"),
    (["--method", "rtn:bits=4,group=24"], "rtn group size 24 does not divide the width 32"),
    (["--method", "gguf:type=Q4_K,fallback=false"], "does not divide the width 32"),
    (["--method", "rtn:bits=4", "--method", "rtn:bits=4"], "condition int4 is listed twice"),
    (["--method", "hqq", "--scope", "all"], "--scope all is not available for hqq-w4g64"),
    (["--match", "gptq@int6"], "only a method with a sparsity fraction can be matched"),
    (["--match", "wanda"], "expected SPEC@CONDITION"),
    (["--match", "magnitude@gptq-w4g16"], "no condition named gptq-w4g16"),
])
def test_cli_bad_method_input_exits_2_with_nothing_written(tiny_llama, tiny_sae, text_file, tmp_path, capsys,
                                                          argv, message):
    from qdm_engine.cli import main

    if "gguf" in " ".join(argv) and not _ggml_ready():
        pytest.skip("ggml not built")
    out = tmp_path / "run"
    code = main(["sweep", "--model", str(tiny_llama), "--sae", str(tiny_sae), "--text", str(text_file),
                 "--tokens", "256", "--block-len", "32", "--quiet", "--out", str(out)] + argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_spec_errors_come_before_the_model_loads(tmp_path, capsys):
    from qdm_engine.cli import main

    code = main(["sweep", "--model", str(tmp_path / "no-such-model"), "--method", "rtn:bits=99", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "bits must be in 2..16" in err and "no-such-model" not in err


def test_methods_command_lists_them(capsys):
    from qdm_engine.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for m in spec_methods():
        assert f"\n{m} " in "\n" + out
    assert main(["methods", "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 14 and all({"method", "keys", "library", "calibration"} <= set(r) for r in rows)


def test_match_any_sparsity_method(tiny_llama, tiny_sae, text_file):
    from qdm_engine.audit import sweep

    logs = []
    res = sweep(model=str(tiny_llama), sae=str(tiny_sae), bits="5", match=["magnitude@int5"], text=str(text_file),
                tokens=256, block_len=32, calib_tokens=128, progress=False, log=logs.append)
    assert res.summary["condition"].tolist() == ["fp", "int5", "magnitude-matched-int5"]
    cond = res.config["conditions"][-1]
    assert cond["target"] == "int5" and len(cond["bisection"]) == 6
    best = min(cond["bisection"], key=lambda t: abs(t["ppl"] - cond["target_ppl"]))
    assert cond["sparsity"] == best["sparsity"]


def test_scope_all_also_quantizes_embeddings_and_head(tiny_llama):
    """--scope all: the tensor-wise methods also change the input embedding (and an untied head)."""
    from qdm_engine.audit import _conditions

    model, _, _ = load_model(str(tiny_llama))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (cond,) = _conditions(None, (), False, methods=["gguf:type=Q8_0"], scope="all")
    assert cond.name == "gguf-q8_0-all" and cond.scope == "all"
    saved = ModelState(model)
    cond.check(model)
    cond.apply(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    every = {t.name for t in find_targets(model, "all")}
    assert "model.embed_tokens.weight" in changed and changed == every | (
        {"lm_head.weight"} if model.get_output_embeddings().weight is model.get_input_embeddings().weight else set())
    saved.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
