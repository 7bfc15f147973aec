import json

import pytest
import torch
from qdm_testing import D_MODEL, N_LAYERS, tiny_config

from qdm_engine.engine.training import (
    decoder_layers_path,
    evaluate_sae,
    hf_hook_name,
    parse_resid_post_hook,
    train_sae,
)
from qdm_engine.errors import QdmError

pytest.importorskip("sae_lens", reason="sae_lens is not installed: SAE training is built on it")


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize(
    "family,expected", [("llama", "model.layers"), ("gpt_neox", "gpt_neox.layers"), ("gpt2", "transformer.h")]
)
def test_decoder_layers_path_per_family(family, expected):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(family, 200))
    assert decoder_layers_path(model) == expected
    assert hf_hook_name(model, "blocks.2.hook_resid_post") == f"{expected}.2"


def test_hf_hook_is_resid_post(tiny_llama):
    # blocks.L.hook_resid_post must be hidden_states[L + 1], the output of decoder layer L.
    model, _ = _load(tiny_llama)
    module = model.get_submodule(hf_hook_name(model, "blocks.1.hook_resid_post"))
    seen = {}
    handle = module.register_forward_hook(lambda m, a, o: seen.setdefault("x", o[0] if isinstance(o, tuple) else o))
    tokens = torch.randint(3, 150, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    handle.remove()
    torch.testing.assert_close(seen["x"], out.hidden_states[2], rtol=0, atol=0)
    assert not torch.equal(out.hidden_states[1], out.hidden_states[2])


@pytest.mark.parametrize("hook", ["blocks.1.hook_mlp_out", "model.layers.1", "blocks.x.hook_resid_post"])
def test_bad_hook_message(hook):
    with pytest.raises(QdmError, match="blocks.L.hook_resid_post"):
        parse_resid_post_hook(hook)


def test_hook_layer_out_of_range(tiny_llama, text_file, tmp_path):
    with pytest.raises(QdmError, match=f"has {N_LAYERS} layers"):
        train_sae(model=tiny_llama, hook=f"blocks.{N_LAYERS}.hook_resid_post", text=text_file,
                  out=tmp_path / "o", progress=False)


def test_bad_inputs_messages(tiny_llama, text_file, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(QdmError, match="not empty"):
        train_sae(model=tiny_llama, text=text_file, out=full, progress=False)
    with pytest.raises(QdmError, match="no config.json"):
        train_sae(model=tmp_path, hook="blocks.1.hook_resid_post", text=text_file, out=tmp_path / "o", progress=False)
    with pytest.raises(QdmError, match="text file .* does not exist"):
        train_sae(model=tiny_llama, hook="blocks.1.hook_resid_post", text=tmp_path / "missing.txt",
                  out=tmp_path / "o2", progress=False)
    with pytest.raises(QdmError, match="not both"):
        train_sae(model=tiny_llama, gguf_file=tmp_path / "m.gguf", hook="blocks.1.hook_resid_post",
                  text=text_file, out=tmp_path / "o3", progress=False)
    with pytest.raises(QdmError, match="tokens must be positive"):
        train_sae(model=tiny_llama, tokens=0, text=text_file, out=tmp_path / "o4", progress=False)


def test_evaluate_exact_sae(tiny_llama, text_file):
    # W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x, so the reconstruction is exact.
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    model, tok = _load(tiny_llama)
    eye = torch.eye(D_MODEL)
    sae = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=2 * D_MODEL,
                                        metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    m = evaluate_sae(sae, model, tok, text=text_file, context_size=32, ce_tokens=128, progress=False)
    assert m["fve"] == pytest.approx(1.0, abs=1e-5)
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-4)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert m["ce_zero_ablation"] != pytest.approx(m["ce_clean"], abs=1e-3)
    assert m["l0"] == pytest.approx(D_MODEL, abs=0.5)  # exactly one of x_i, -x_i is positive
    assert m["dead_fraction"] == 0.0
    assert m["positions"] > 0 and m["ce_positions"] == 4 * 31

    # A zero decoder reconstructs nothing: FVE <= 0 and splicing equals zero-ablation.
    with torch.no_grad():
        sae.W_dec.zero_()
    m0 = evaluate_sae(sae, model, tok, text=text_file, context_size=32, ce_tokens=128, progress=False)
    assert m0["fve"] < 0.0
    assert m0["ce_spliced"] == pytest.approx(m0["ce_zero_ablation"], abs=1e-4)


@pytest.mark.slow
def test_tiny_training_run(tiny_llama, text_file, tmp_path):
    from safetensors import safe_open
    from sae_lens import SAE

    out = tmp_path / "sae"
    kw = dict(model=tiny_llama, hook="blocks.1.hook_resid_post", width=96, text=text_file, tokens=48 * 128,
              batch_tokens=128, context_size=32, seed=0, eval_text=text_file, ce_tokens=256, progress=False,
              work_dir=tmp_path / "work")
    metrics = train_sae(out=out, **kw)
    assert metrics["activation_cache_reused"] is False
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "metrics.json", "sae_weights.safetensors"]
    sae = SAE.load_from_disk(str(out), device="cpu")
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.metadata.hf_hook_name == "model.layers.1"
    assert sae.cfg.architecture() == "standard"
    assert tuple(sae.W_enc.shape) == (D_MODEL, 96) and tuple(sae.W_dec.shape) == (96, D_MODEL)
    assert sae.W_enc.dtype == torch.float32  # stored compactly, loaded and encoded in float32
    with safe_open(str(out / "sae_weights.safetensors"), "pt") as f:
        assert f.get_tensor("W_enc").dtype == torch.float16
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["training_steps"] == 48 and on_disk["training_tokens"] == 48 * 128
    ev = on_disk["eval"]
    assert 0.0 <= ev["dead_fraction"] <= 1.0 and 0.0 < ev["l0"] < 96
    assert ev["fve"] > 0.0  # trained: better than predicting the mean
    assert ev["weights_roundtrip"]["max_abs_diff_rel_to_max_act"] < 1e-2
    # Same seed, activation cache reused from the work dir: the same SAE, bit for bit.
    again = train_sae(out=tmp_path / "again", **kw)
    assert again["activation_cache_reused"] is True
    sae2 = SAE.load_from_disk(str(tmp_path / "again"), device="cpu")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(sae2, name)), name
    assert again["eval"]["fve"] == ev["fve"]


def test_cli_train_sae_bad_input(tmp_path, capsys, tiny_llama, text_file):
    from qdm_engine.cli import main

    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert main(["train-sae", "--out", str(full), "--model", str(tiny_llama), "--text", str(text_file)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["train-sae", "--out", str(tmp_path / "o"), "--model", str(tiny_llama),
                 "--hook", "blocks.1.hook_mlp_out"]) == 2
    assert "blocks.L.hook_resid_post" in capsys.readouterr().err
