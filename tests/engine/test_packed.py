"""GPTQ / AWQ folders unpacked to dense weights (qdm_engine/engine/packed.py), checked against what
gptqmodel 7.7.0 itself wrote and computed: tests/data/packed/ (PROVENANCE.md, make_packed.py)."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from qdm_engine.cli import main
from qdm_engine.engine.checkpoints import detect_format
from qdm_engine.engine.packed import dequantize_gptq, load_packed, unpack_codes
from qdm_engine.errors import QdmError

DATA = Path(__file__).resolve().parents[1] / "data" / "packed"
VARIANTS = sorted(p.stem for p in (DATA / "reference").glob("*.safetensors"))
BASE = {"gptq-3bit-g32-asym": "base-mha", "awq-gemm-4bit-g32": "base-wide"}
LOGIT_ATOL = 1e-3  # our float32 forward vs gptqmodel's float16 one (its torch kernels): measured <= 6.2e-4


def test_all_variants_shipped():
    assert {"gptq-4bit-g32", "gptq-4bit-g32-actorder-asym", "gptq-8bit-g32", "gptq-3bit-g32-asym",
            "gptq_v2-4bit-g32-asym", "gptq-4bit-g32-lmhead", "gptq-4bit-g32-skip-down",
            "awq-gemm-4bit-g32"} <= set(VARIANTS)


def test_dynamic_rules_as_gptqmodel_wrote_them():
    """lm_head=True is written as a dynamic rule quantizing lm_head at 8 bits; '-:' leaves down_proj dense."""
    head = load_file(str(DATA / "gptq-4bit-g32-lmhead" / "model.safetensors"))
    assert head["lm_head.qweight"].shape == (32 * 8 // 32, 200)  # 8-bit codes along the 32 inputs
    skip = load_file(str(DATA / "gptq-4bit-g32-skip-down" / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.weight" in skip and "model.layers.0.mlp.down_proj.qweight" not in skip


@pytest.mark.parametrize("name", VARIANTS)
def test_dense_weights_equal_gptqmodel_dequantize(name):
    """Every quantized Linear: our float32 weight is exact (float16 scale x small integer), gptqmodel's
    dequantize_weight() returns it in float16, so ours rounded to float16 must equal it bit for bit; every
    other tensor is the file's; and the logits are gptqmodel's forward within LOGIT_ATOL (its float16
    arithmetic), while the base model's are not."""
    from transformers import AutoModelForCausalLM

    folder = DATA / name
    ref = load_file(str(DATA / "reference" / f"{name}.safetensors"))
    stored = load_file(str(folder / "model.safetensors"))
    lm = load_packed(str(folder), torch.float32)
    ours = lm.state_dict()
    weights = [k for k in ref if k.endswith(".weight")]
    assert sorted(weights) == sorted(k[:-len("qweight")] + "weight" for k in stored if k.endswith(".qweight"))
    for k in weights:
        assert ref[k].dtype == torch.float16 and ours[k].shape == ref[k].shape, k
        assert torch.equal(ours[k].half(), ref[k]), (k, (ours[k] - ref[k].float()).abs().max().item())
        assert ((ours[k] - ref[k].float()).abs() <= ref[k].float().abs() * 2.0 ** -11 + 2.0 ** -25).all(), k
    plain = [k for k in stored if k.endswith((".weight", ".bias"))]
    assert "model.embed_tokens.weight" in plain
    for k in plain:
        assert torch.equal(ours[k], stored[k].float()), k
    linears = {f"{n}.weight" for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears <= set(weights) | set(plain)  # every Linear either unpacked or stored dense
    with torch.no_grad():
        got = lm(input_ids=ref["input_ids"]).logits
        base_lm = AutoModelForCausalLM.from_pretrained(str(DATA / BASE.get(name, "base")))
        base = base_lm(input_ids=ref["input_ids"]).logits
    err = (got - ref["logits"]).abs().max().item()
    assert err < LOGIT_ATOL, err
    assert (base - ref["logits"]).abs().max().item() > LOGIT_ATOL  # the check tells a quantized model from its base


def test_v1_zero_offset_is_applied():
    """checkpoint_format 'gptq' stores zero - 1: read as v2 the weights are wrong (so the test above sees it)."""
    sd = load_file(str(DATA / "gptq-4bit-g32-actorder-asym" / "model.safetensors"))
    ref = load_file(str(DATA / "reference" / "gptq-4bit-g32-actorder-asym.safetensors"))
    p = "model.layers.0.mlp.down_proj"  # 64 inputs: two groups
    args = (sd[f"{p}.qweight"], sd[f"{p}.qzeros"], sd[f"{p}.scales"], sd[f"{p}.g_idx"], 4)
    assert torch.equal(dequantize_gptq(*args, True, 64).half(), ref[f"{p}.weight"])
    assert not torch.equal(dequantize_gptq(*args, False, 64).half(), ref[f"{p}.weight"])
    assert not torch.equal(sd[f"{p}.g_idx"].long(), torch.arange(64) // 32)  # act-order: g_idx is not contiguous


def _pack_stream(codes: np.ndarray, bits: int) -> np.ndarray:
    """Independent packer (numpy, Python ints): codes along the last axis as a little-endian bit stream
    of 32-bit words, the layout GPTQ writes for 2/3/4/8 bits."""
    n_words = -(-codes.shape[-1] * bits // 32)
    out = np.zeros(codes.shape[:-1] + (n_words,), dtype=np.int64)
    for idx in np.ndindex(codes.shape[:-1]):
        stream = sum(int(c) << (bits * j) for j, c in enumerate(codes[idx]))
        out[idx] = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
    return out.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_codes_inverts_independent_packer(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** bits, size=(5, 64))
    words = torch.from_numpy(_pack_stream(codes, bits))
    assert torch.equal(unpack_codes(words, bits, 64, 1), torch.from_numpy(codes).int())
    assert torch.equal(unpack_codes(words.T.contiguous(), bits, 64, 0), torch.from_numpy(codes).int().T)
    assert torch.equal(unpack_codes(words, bits, 61, 1), torch.from_numpy(codes[:, :61]).int())  # a ragged tail


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_v1_zero_points_with_borrows(bits):
    """gptqmodel writes v1 zeros as one int32 subtraction per word, so a zero of 0 borrows from the next
    field; none of the shipped folders has a zero of 0, so this builds one: words from an independent
    packer, minus 0x11111111 (4-bit; 0x01010101 8-bit, 0x55555555 2-bit) modulo 2^32."""
    rng = np.random.default_rng(bits)
    per = 32 // bits
    zeros = rng.integers(0, 2 ** bits, size=(2, 2 * per))
    zeros[:, ::3] = 0
    ones = sum(1 << (bits * k) for k in range(per))
    v1 = (_pack_stream(zeros, bits).view(np.uint32).astype(np.int64) - ones) % (1 << 32)
    qzeros = torch.from_numpy(v1.astype(np.uint32).view(np.int32))
    qweight = torch.from_numpy(_pack_stream(np.full((2 * per, 32), 2 ** bits - 1), bits).T.copy())
    # one group, scale 1: W[o, i] = (2^bits - 1) - zero[o]
    w = dequantize_gptq(qweight, qzeros, torch.ones(1, 2 * per, dtype=torch.float16),
                        torch.zeros(32, dtype=torch.int32), bits, True, 32)
    assert torch.equal(w[:, 0], torch.from_numpy(2 ** bits - 1 - zeros[0]).float())


def test_awq_order_against_independent_packer():
    """AWQ GEMM: eight 4-bit codes per word along the output, column 8j + [0, 2, 4, 6, 1, 3, 5, 7][k] in
    slot k (AutoAWQ's layout, packed here from its description, not from its code)."""
    from qdm_engine.engine.packed import dequantize_awq

    rng = np.random.default_rng(0)
    n_in, n_out, group = 64, 48, 32
    q = rng.integers(0, 16, size=(n_in, n_out))
    z = rng.integers(0, 16, size=(n_in // group, n_out))
    s = (rng.random((n_in // group, n_out)) * 0.1 + 0.01).astype(np.float16)

    def pack(codes):
        words = np.zeros((codes.shape[0], codes.shape[1] // 8), dtype=np.int64)
        for j in range(codes.shape[1] // 8):
            for k, col in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
                words[:, j] |= codes[:, 8 * j + col].astype(np.int64) << (4 * k)
        return torch.from_numpy(words.astype(np.uint32).view(np.int32))

    expect = (q - np.repeat(z, group, 0)) * np.repeat(s.astype(np.float64), group, 0)
    got = dequantize_awq(pack(q), pack(z), torch.from_numpy(s))
    assert np.array_equal(got.double().numpy(), expect.T)


def _sweep(base, sae, text_file, out, *extra):
    return main(["sweep", "--model", str(base), "--sae", str(sae), "--text", str(text_file), "--tokens", "256",
                 "--block-len", "32", "--quiet", "--out", str(out), *extra])


@pytest.mark.parametrize("name,base,d_model", [("gptq-4bit-g32-actorder-asym", "base", 32),
                                               ("awq-gemm-4bit-g32", "base-wide", 64)])
def test_sweep_audits_folder_against_its_base(name, base, d_model, tmp_path, text_file):
    """`--compressed FOLDER` end to end: per-feature r equals an independent computation on a model whose
    Linears hold gptqmodel's own dequantized weights (float16, ours are exact: hence 1e-3), with
    transformers' hidden_states, SAELens's encode and numpy float64 Pearson."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qdm_testing import build_sae
    from qdm_engine.engine.tokens import make_blocks, read_text

    sae_dir = build_sae(tmp_path / "sae", d_in=d_model)
    out = tmp_path / "run"
    assert _sweep(DATA / base, sae_dir, text_file, out, "--compressed", f"ck={DATA / name}") == 0
    got = pd.read_parquet(out / "features" / "ck.parquet")
    cfg = json.loads((out / "config.json").read_text())["conditions"][0]
    assert cfg["format"] == name.split("-")[0] and set(cfg["sha256"]) == {"model.safetensors"}
    tok = AutoTokenizer.from_pretrained(str(DATA / base))
    blocks = make_blocks(tok, read_text(str(text_file)), 32, 256, True)
    m = AutoModelForCausalLM.from_pretrained(str(DATA / base), dtype=torch.float32)
    sae = SAE.load_from_disk(str(sae_dir))
    ref = load_file(str(DATA / "reference" / f"{name}.safetensors"))
    stored = load_file(str(DATA / name / "model.safetensors"))
    with torch.no_grad():
        x = m(input_ids=blocks.ids, output_hidden_states=True).hidden_states[2][:, 1:].reshape(-1, d_model)
        for k, p in m.named_parameters():
            src = ref.get(k, stored.get(k))
            p.copy_(src.float())
        y = m(input_ids=blocks.ids, output_hidden_states=True).hidden_states[2][:, 1:].reshape(-1, d_model)
        fx, fy = sae.encode(x).double().numpy(), sae.encode(y).double().numpy()
    active = got["active"].to_numpy()
    assert active.sum() > 10
    checked = 0
    for i in np.flatnonzero(active):
        if fy[:, i].std() == 0:
            continue
        r = np.corrcoef(fx[:, i], fy[:, i])[0, 1]
        assert abs(r - got["r"].iloc[i]) < 1e-3, (i, r, got["r"].iloc[i])
        checked += 1
    assert checked > 10
    mean_r = got.loc[active, "r"].mean()
    assert 0.5 < mean_r < 1.0, mean_r  # 4-bit weights: close to the base, not the identity


def _variant(tmp_path, src, **changes):
    """A copy of a shipped folder whose quantization_config has `changes` (None removes a key)."""
    dst = tmp_path / f"{src}-changed"
    shutil.copytree(DATA / src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg["quantization_config"].pop(k, None)
        else:
            cfg["quantization_config"][k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("src,changes,message", [
    ("gptq-4bit-g32", {"checkpoint_format": "gptq_p", "format": "gptq_p"},
     "GPTQ checkpoint_format 'gptq_p' is not unpacked; supported: gptq, gptq_v2"),
    ("gptq-4bit-g32", {"checkpoint_format": "marlin"}, "GPTQ checkpoint_format 'marlin' is not unpacked"),
    ("gptq-4bit-g32", {"bits": 5}, "GPTQ bits=5 is not unpacked; supported: 2, 3, 4, 8"),
    ("gptq-4bit-g32", {"pack_dtype": "int16"}, "pack_dtype 'int16' is not unpacked"),
    ("gptq-4bit-g32", {"dynamic": {"+:.*down_proj": {"bits": 6}}}, "GPTQ bits=6 is not unpacked"),
    ("gptq-4bit-g32", {"dynamic": {".*down_proj": {"format": "marlin"}}},
     "quantization_config.dynamic '.*down_proj' overrides format; per-module layouts are not unpacked"),
    ("gptq-4bit-g32", {"rotation": "hadamard"}, "quantization_config.rotation is set (hadamard)"),
    ("gptq-4bit-g32", {"is_marlin_format": True}, "quantization_config.is_marlin_format is set (True)"),
    ("awq-gemm-4bit-g32", {"version": "gemv", "format": "gemv"}, "AWQ version/format 'gemv' is not unpacked"),
    ("awq-gemm-4bit-g32", {"bits": 8}, "AWQ bits=8 is not unpacked; only 4-bit GEMM is"),
])
def test_refused_layouts_exit_2_with_one_line(src, changes, message, tmp_path, text_file, tiny_sae, capsys):
    ck = _variant(tmp_path, src, **changes)
    with pytest.raises(QdmError, match=re.escape(message)):
        detect_format(str(ck))
    out = tmp_path / "run"
    capsys.readouterr()
    assert _sweep(DATA / "base", tiny_sae, text_file, out, "--compressed", str(ck)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_module_that_does_not_fit_the_architecture_is_named(tmp_path):
    """A folder whose packed tensors do not fit config.json's widths: a QdmError naming the tensor."""
    from safetensors.torch import save_file

    ck = _variant(tmp_path, "gptq-4bit-g32")
    sd = load_file(str(ck / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.scales"] = sd["model.layers.1.mlp.up_proj.scales"][:, :32].contiguous()
    save_file(sd, str(ck / "model.safetensors"))
    with pytest.raises(QdmError, match="model.layers.1.mlp.up_proj.scales is \\(1, 32\\), the dense"):
        load_packed(str(ck), torch.float32)


def test_codes_of_another_width_are_refused(tmp_path):
    """A module read with the wrong bits (here: 4-bit words declared 2-bit) is refused, not unpacked as noise."""
    ck = _variant(tmp_path, "gptq-4bit-g32", bits=2)
    message = r"model.layers.0.mlp.down_proj cannot be unpacked as 2-bit GPTQ: qweight \(8, 32\)"
    with pytest.raises(QdmError, match=message):
        load_packed(str(ck), torch.float32)


def test_folder_missing_a_weight_is_refused(tmp_path):
    """transformers would initialise a weight the files lack at random; the loader refuses instead."""
    from safetensors.torch import save_file

    ck = _variant(tmp_path, "gptq-4bit-g32")
    sd = load_file(str(ck / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(ck / "model.safetensors"))
    with pytest.raises(QdmError, match=re.escape("1 weights of the architecture are not in the files (first: "
                                                 "model.norm.weight)")):
        load_packed(str(ck), torch.float32)
