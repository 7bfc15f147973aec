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
    with pytest.raises(QdmError, match="quantization format 'gptq' cannot be loaded here; pip install gptqmodel"):
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


@needs_llmc
def test_checkpoint_beside_in_process_methods(tiny_llama, tiny_sae, text_file, tmp_path, w4a16):
    """A checkpoint in a sweep with in-process conditions: it runs after them (the base's snapshot is dropped
    before it), each condition exactly as it is in a sweep of its own."""
    mixed = tmp_path / "mixed"
    assert _sweep(tiny_llama, tiny_sae, text_file, mixed, "--bits", "4", "--compressed", f"ck={w4a16}",
                  "--method", "rtn:bits=4,group=16") == 0
    summary = pd.read_csv(mixed / "summary.csv")
    assert summary["condition"].tolist() == ["fp", "int4", "int4-g16", "ck"]
    for name, args in [("int4", ["--bits", "4"]), ("ck", ["--compressed", f"ck={w4a16}"]),
                       ("int4-g16", ["--method", "rtn:bits=4,group=16"])]:
        alone = tmp_path / f"alone-{name}"
        assert _sweep(tiny_llama, tiny_sae, text_file, alone, *args) == 0
        a = pd.read_parquet(alone / "features" / f"{name}.parquet")["r"].to_numpy()
        b = pd.read_parquet(mixed / "features" / f"{name}.parquet")["r"].to_numpy()
        assert np.array_equal(a, b, equal_nan=True), name
        s_alone = pd.read_csv(alone / "summary.csv").set_index("condition").loc[name, "ppl"]
        assert s_alone == summary.set_index("condition").loc[name, "ppl"]


@needs_llmc
def test_checkpoint_condition_restores_the_base(tiny_llama, tiny_sae, text_file, w4a16):
    """Without release_base the runner puts the base back bit for bit after a checkpoint (its tensors were
    released and replaced by the checkpoint's, then refilled from the snapshot)."""
    from transformers import AutoModelForCausalLM

    from qdm_engine.engine.checkpoints import make_checkpoint
    from qdm_engine.engine.compression import RTN
    from qdm_engine.engine.runner import run_conditions
    from qdm_engine.engine.sae import load_sae
    from qdm_engine.engine.tokens import make_blocks, read_text
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sae = load_sae(str(tiny_sae))
    blocks = make_blocks(AutoTokenizer.from_pretrained(str(tiny_llama)), read_text(str(text_file)), 32, 128, True)
    ck = make_checkpoint(str(w4a16))
    runs = run_conditions(model, [sae], [sae.hook_name], blocks, [ck, RTN(4)], 4, progress=False, topk=0, units=0)
    assert [r.name for r in runs] == ["fp", ck.name, "int4"]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert runs[1].moments[0].pearson().nan_to_num().mean() < 1.0  # the checkpoint did run


@pytest.mark.parametrize("kind, method", [("nf4", "nf4"), ("fp4", "fp4"), ("int8", "llm-int8")])
def test_bitsandbytes_checkpoint_equals_the_method(tiny_llama, tiny_sae, text_file, tmp_path, kind, method):
    """A bitsandbytes folder written by transformers (quantized on load, save_pretrained) audits exactly like
    our in-process simulation of the same format (bitsandbytes' quantize/dequantize round trip on the base):
    the same dense weights, so the same per-feature r (within 1e-9) and perplexity."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    q = (BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else
         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32))
    folder = tmp_path / f"tiny-bnb-{kind}"
    AutoModelForCausalLM.from_pretrained(str(tiny_llama), quantization_config=q, dtype=torch.float32) \
        .save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tiny_llama)).save_pretrained(folder)
    assert detect_format(str(folder))[0] == "bitsandbytes"
    out = tmp_path / "run"
    assert _sweep(tiny_llama, tiny_sae, text_file, out, "--method", method, "--compressed", f"ck={folder}") == 0
    ours = pd.read_parquet(out / "features" / f"{method}.parquet")
    theirs = pd.read_parquet(out / "features" / "ck.parquet")
    active = ours["active"]
    assert active.sum() > 10 and ours.loc[active, "r"].mean() < 1.0
    assert np.allclose(ours.loc[active, "r"], theirs.loc[active, "r"], atol=1e-9, rtol=0)
    summary = pd.read_csv(out / "summary.csv").set_index("condition")
    assert summary.loc["ck", "ppl"] == pytest.approx(summary.loc[method, "ppl"], rel=1e-9)
    c = json.loads((out / "config.json").read_text())["conditions"][1]
    assert c["format"] == "bitsandbytes" and c["quantization_config"]["quant_method"] == "bitsandbytes"
    assert summary.loc["ck", "bits"] == (8 if kind == "int8" else 4)


@pytest.mark.parametrize("kind", ["int8", "int4-g16", "fp8"])
def test_torchao_checkpoint_loads_to_torchaos_own_dequantization(tiny_llama, tiny_sae, text_file, tmp_path, kind):
    """A torchao folder (TorchAoConfig quantized on load, save_pretrained): the dense weights we audit are bit for
    bit torchao's own `dequantize()` of the in-memory quantized model, and the audit of the folder equals the
    audit of those dense weights saved as a plain transformers folder."""
    pytest.importorskip("torchao")
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    from qdm_engine.engine.checkpoints import load_dense

    cfg = {"int8": Int8WeightOnlyConfig(), "fp8": Float8WeightOnlyConfig(),
           "int4-g16": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(16))}[kind]
    q = AutoModelForCausalLM.from_pretrained(str(tiny_llama), quantization_config=TorchAoConfig(quant_type=cfg),
                                             dtype=torch.float32)
    folder = tmp_path / f"tiny-torchao-{kind}"
    q.save_pretrained(folder, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    tok.save_pretrained(folder)
    assert detect_format(str(folder))[0] == "torchao"
    dense, _ = load_dense(str(folder), "torchao", None, torch.float32)
    theirs = dict(q.named_parameters())
    n_quantized = 0
    for name, p in dense.named_parameters():
        assert type(p.data) is torch.Tensor, name
        ref = theirs[name].data
        if type(ref) is not torch.Tensor:
            ref, n_quantized = ref.dequantize(), n_quantized + 1
        assert torch.equal(p.data, ref.to(torch.float32)), name
    assert n_quantized >= 14  # every decoder-layer linear
    plain = tmp_path / "plain"
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    fresh.load_state_dict(dense.state_dict())
    fresh.save_pretrained(plain)
    tok.save_pretrained(plain)
    out = tmp_path / "run"
    assert _sweep(tiny_llama, tiny_sae, text_file, out, "--compressed", f"ao={folder}",
                  "--compressed", f"plain={plain}") == 0
    a = pd.read_parquet(out / "features" / "ao.parquet")
    b = pd.read_parquet(out / "features" / "plain.parquet")
    assert a["active"].sum() > 10 and a.loc[a["active"], "r"].mean() < 1.0
    assert np.array_equal(a["r"].to_numpy(), b["r"].to_numpy(), equal_nan=True)
    assert json.loads((out / "config.json").read_text())["conditions"][0]["format"] == "torchao"


def _fake_hub_repo(cache, repo, files, commit):
    """A repository in the layout of the Hugging Face cache (refs/main -> snapshots/<commit>/...), which
    huggingface_hub resolves offline exactly as it resolves a downloaded one."""
    import shutil

    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files:
        shutil.copy(f, snap / f.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return snap


def test_hub_ids_resolve_through_the_hugging_face_cache(tiny_llama, tiny_sae, text_file, tmp_path, monkeypatch,
                                                         capsys):
    """'owner/name' and 'owner/name:FILE.gguf' go through huggingface_hub (offline here: from its cache) and
    audit exactly like the same local folder / file; their hub id and commit are recorded; an unknown id is
    one line, exit 2."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder_files = [f for f in tiny_llama.iterdir() if f.is_file()]
    _fake_hub_repo(tmp_path / "hub", "acme/tiny-ft", folder_files, "a" * 40)
    gguf = write_tiny_llama_gguf(tiny_llama, tmp_path / "tiny-q8_0.gguf", "Q8_0")
    _fake_hub_repo(tmp_path / "hub", "acme/tiny-GGUF", [gguf], "b" * 40)
    out = tmp_path / "run"
    assert _sweep(tiny_llama, tiny_sae, text_file, out, "--compressed", "acme/tiny-ft",
                  "--compressed", "acme/tiny-GGUF:tiny-q8_0.gguf", "--compressed", f"local={gguf}") == 0
    summary = pd.read_csv(out / "summary.csv").set_index("condition")
    assert summary.loc["tiny-ft", "dppl_pct"] == pytest.approx(0.0, abs=1e-9)
    a = pd.read_parquet(out / "features" / "tiny-q8_0.parquet")["r"].to_numpy()
    b = pd.read_parquet(out / "features" / "local.parquet")["r"].to_numpy()
    assert np.array_equal(a, b, equal_nan=True) and np.nanmean(a) < 1.0
    conds = {c["name"]: c for c in json.loads((out / "config.json").read_text())["conditions"]}
    assert conds["tiny-ft"]["hub"] == {"hub_id": "acme/tiny-ft", "file": None, "revision": "a" * 40}
    assert conds["tiny-q8_0"]["hub"] == {"hub_id": "acme/tiny-GGUF", "file": "tiny-q8_0.gguf", "revision": "b" * 40}
    assert conds["tiny-q8_0"]["sha256"] == conds["local"]["sha256"]
    capsys.readouterr()
    assert _sweep(tiny_llama, tiny_sae, text_file, tmp_path / "run2", "--compressed", "acme/nothing-here") == 2
    err = capsys.readouterr().err
    assert "the Hugging Face hub could not provide it" in err and err.count("\n") == 1, err


def test_unknown_quantization_format_is_refused(tiny_llama, tiny_sae, text_file, tmp_path, capsys):
    """A folder whose quantization_config names a format we cannot load: one line listing what loads, exit 2,
    nothing written."""
    import shutil

    folder = tmp_path / "eetq"
    shutil.copytree(tiny_llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "eetq", "weights": "int8"}
    (folder / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    out = tmp_path / "run"
    assert _sweep(tiny_llama, tiny_sae, text_file, out, "--compressed", str(folder)) == 2
    err = capsys.readouterr().err
    assert "quantization format 'eetq' cannot be loaded here; supported: GGUF files" in err, err
    assert err.count("\n") == 1 and not out.exists()
