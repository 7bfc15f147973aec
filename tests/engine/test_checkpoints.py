"""`--compressed`: a downloaded checkpoint audited against its base model."""

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch

from qdm_testing import build_tiny_model
from qdm_engine.cli import main
from qdm_engine.engine.checkpoints import detect_format, parse_compressed, same_tokenizer
from qdm_engine.errors import QdmError

needs_llmc = pytest.mark.skipif(importlib.util.find_spec("llmcompressor") is None,
                                reason="llmcompressor is not installed")


def _sweep(tiny_llama, tiny_sae, text_file, out, *extra):
    return main(["sweep", "--model", str(tiny_llama), "--sae", str(tiny_sae), "--text", str(text_file), "--tokens",
                 "256", "--block-len", "32", "--quiet", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def w4a16(tiny_llama, tmp_path_factory):
    """A compressed-tensors W4A16 (group 16) checkpoint of the tiny model, written by llm-compressor."""
    if importlib.util.find_spec("llmcompressor") is None:
        pytest.skip("llmcompressor is not installed")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16)
    recipe = QuantizationModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)},
                                  ignore=["lm_head"])
    oneshot(model=m, recipe=recipe)
    out = tmp_path_factory.mktemp("ckpt") / "tiny-w4a16"
    m.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(str(tiny_llama)).save_pretrained(out)
    return out


def test_parse_and_detect(tiny_llama, tmp_path):
    assert parse_compressed("q4=/x/model.gguf") == ("q4", "/x/model.gguf")
    assert parse_compressed("/x/model.Q4_K_M.gguf") == ("model.Q4_K_M", "/x/model.Q4_K_M.gguf")
    assert parse_compressed("/x/my-awq/") == ("my-awq", "/x/my-awq/")
    assert detect_format(str(tiny_llama)) == ("hf", None, None)
    with pytest.raises(QdmError, match="does not exist"):
        detect_format(str(tmp_path / "nope"))
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    assert detect_format(str(gptq)) == ("gptq", None, {"quant_method": "gptq", "bits": 4})  # tests/engine/test_packed.py
    (gptq / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "torchao"}}))
    with pytest.raises(QdmError, match="quantization format 'torchao' cannot be loaded here"):
        detect_format(str(gptq))


def test_identical_checkpoint_audits_at_r_1(tiny_llama, tiny_sae, text_file, tmp_path):
    out = tmp_path / "run"
    assert _sweep(tiny_llama, tiny_sae, text_file, out, "--compressed", f"same={tiny_llama}") == 0
    summary = pd.read_csv(out / "summary.csv").set_index("condition")
    assert summary.loc["same", "dppl_pct"] == pytest.approx(0.0, abs=1e-9)
    feats = pd.read_parquet(out / "features" / "same.parquet")
    active = feats[feats["active"]]
    assert len(active) > 10 and np.allclose(active["r"], 1.0, atol=1e-9)
    cfg = json.loads((out / "config.json").read_text())
    c = cfg["conditions"][0]
    assert c["format"] == "hf" and c["path"] == str(tiny_llama) and "model.safetensors" in c["sha256"]


@needs_llmc
def test_w4a16_checkpoint_equals_independent_computation(tiny_llama, tiny_sae, text_file, tmp_path, w4a16):
    """Per-feature r of an llm-compressor W4A16 folder vs transformers' own dequantized load + hidden_states,
    SAELens's own encode and numpy float64 Pearson: within 1e-6."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    from qdm_engine.engine.tokens import make_blocks, read_text

    out = tmp_path / "run"
    assert _sweep(tiny_llama, tiny_sae, text_file, out, "--compressed", str(w4a16)) == 0
    got = pd.read_parquet(out / "features" / "tiny-w4a16.parquet")
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    blocks = make_blocks(tok, read_text(str(text_file)), 32, 256, True)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    ck = AutoModelForCausalLM.from_pretrained(str(w4a16), dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    sae = SAE.load_from_disk(str(tiny_sae))
    with torch.no_grad():
        x = base(input_ids=blocks.ids, output_hidden_states=True).hidden_states[2][:, 1:].reshape(-1, 32)
        y = ck(input_ids=blocks.ids, output_hidden_states=True).hidden_states[2][:, 1:].reshape(-1, 32)
        fx, fy = sae.encode(x).double().numpy(), sae.encode(y).double().numpy()
    active = got["active"].to_numpy()
    assert active.sum() > 10
    for i in np.flatnonzero(active):
        if fy[:, i].std() == 0:
            continue
        r = np.corrcoef(fx[:, i], fy[:, i])[0, 1]
        assert abs(r - got["r"].iloc[i]) < 1e-6, (i, r, got["r"].iloc[i])
    assert got.loc[active, "r"].mean() < 1.0  # 4-bit weights: not the identity
    cfg = json.loads((out / "config.json").read_text())
    c = cfg["conditions"][0]
    assert c["format"] == "compressed-tensors" and c["bits"] == 4 and c["quantization_config"]


def test_mismatches_exit_2_naming_both_sides(tiny_llama, tiny_sae, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from qdm_testing import make_text, make_tokenizer

    # a different tokenizer (trained on other text), same architecture
    other_tok = make_tokenizer(make_text(seed=5).upper())
    wrong_tok = tmp_path / "wrong-tok"
    AutoModelForCausalLM.from_pretrained(str(tiny_llama)).save_pretrained(wrong_tok)
    other_tok.save_pretrained(wrong_tok)
    # the right tokenizer, another width
    narrow = tmp_path / "narrow"
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                                 bos_token_id=1, eos_token_id=2)).save_pretrained(narrow)
    tok.save_pretrained(narrow)
    cases = [(wrong_tok, "its tokenizer does not match the base model's"),
             (narrow, "has width 16, the base model 32"),
             (tmp_path / "missing", "does not exist")]
    capsys.readouterr()  # what building the folders printed
    for path, message in cases:
        out = tmp_path / f"run-{path.name}"
        assert _sweep(tiny_llama, tiny_sae, text_file, out, "--compressed", str(path)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()


def test_same_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert same_tokenizer(tok, AutoTokenizer.from_pretrained(str(tiny_llama))) is None


def write_tiny_llama_gguf(model_dir, path, qtype=None):
    """A GGUF file of the tiny Llama, written with the gguf library the way llama.cpp's converter lays it
    out (q/k rows permuted, byte-level BPE tokenizer); block linears quantized to `qtype` when given."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = m.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    toks = [None] * len(tj["model"]["vocab"])
    for t, i in tj["model"]["vocab"].items():
        toks[i] = t
    w.add_tokenizer_model("gpt2")
    w.add_token_list(toks)
    w.add_token_merges([" ".join(x) if isinstance(x, list) else x for x in tj["model"]["merges"]])
    special = {tok.unk_token, tok.bos_token, tok.eos_token}
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in toks])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)

    def perm(a, heads):  # llama.cpp's converter interleaves the rotary halves of q and k
        return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    def put(name, a, linear=False):
        if linear and qtype is not None:
            t = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)
        else:
            w.add_tensor(name, a)

    sd = {k: v.float().numpy() for k, v in m.state_dict().items()}
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", perm(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads), True)
        put(f"blk.{i}.attn_k.weight", perm(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads), True)
        for g, h in names.items():
            put(f"blk.{i}.{g}.weight", sd[p + h + ".weight"], True)
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_checkpoint_against_itself_and_its_source(tiny_llama, tiny_sae, text_file, tmp_path):
    """GGUF files of the tiny Llama written with the gguf library: the F32 file against itself audits at
    r = 1; the Q8_0 file against its HF source gives what --method gguf:type=Q8_0 gives (the same bytes,
    dequantized by transformers' GGUF loader instead of ours) within 1e-9."""
    f32 = write_tiny_llama_gguf(tiny_llama, tmp_path / "tiny-f32.gguf")
    q8 = write_tiny_llama_gguf(tiny_llama, tmp_path / "tiny-q8_0.gguf", "Q8_0")
    out = tmp_path / "self"
    assert main(["sweep", "--gguf-file", str(f32), "--sae", str(tiny_sae), "--text", str(text_file), "--tokens",
                 "256", "--block-len", "32", "--quiet", "--out", str(out), "--compressed", f"same={f32}"]) == 0
    same = pd.read_parquet(out / "features" / "same.parquet")
    assert same["active"].sum() > 10 and np.allclose(same.loc[same["active"], "r"], 1.0, atol=1e-9)
    out = tmp_path / "vs-source"
    assert _sweep(tiny_llama, tiny_sae, text_file, out, "--compressed", str(q8), "--method", "gguf:type=Q8_0") == 0
    ck = pd.read_parquet(out / "features" / "tiny-q8_0.parquet")
    ours = pd.read_parquet(out / "features" / "gguf-q8_0.parquet")
    act = ck["active"].to_numpy()
    assert np.allclose(ck.loc[act, "r"], ours.loc[act, "r"], atol=1e-9, rtol=0)
    assert ck.loc[act, "r"].mean() < 1.0
    cfg = json.loads((out / "config.json").read_text())
    c = next(c for c in cfg["conditions"] if c["name"] == "tiny-q8_0")
    assert c["format"] == "gguf" and c["gguf_file"] == "tiny-q8_0.gguf" and "tiny-q8_0.gguf" in c["sha256"]
