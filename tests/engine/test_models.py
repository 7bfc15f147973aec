"""The read-out hook against transformers' own hidden_states, for every supported family."""

import pytest
import torch

from qdm_testing import N_LAYERS, build_tiny_model
from qdm_engine.engine.models import decoder_layers, load_model, parse_hook, read_out
from qdm_engine.errors import QdmError

FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gpt_neox", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_read_out_matches_hidden_states(tmp_path, family):
    path = build_tiny_model(tmp_path / family, family, seed=1)
    model, tok, ident = load_model(str(path))
    assert ident["model_type"] == family and ident["n_layers"] == N_LAYERS
    ids = torch.randint(3, len(tok), (2, 11), generator=torch.Generator().manual_seed(0))
    # the last layer's hidden_states entry has the final norm applied in HF, so compare layers before it
    for layer in range(N_LAYERS - 1):
        for side, offset in (("post", 1), ("pre", 0)):
            with torch.no_grad(), read_out(model, f"blocks.{layer}.hook_resid_{side}") as ro:
                out = model(input_ids=ids, output_hidden_states=True)
            ref = out.hidden_states[layer + offset]
            assert ro.value.shape == ref.shape
            torch.testing.assert_close(ro.value, ref, rtol=0, atol=0)


def test_read_out_removes_its_hook(tiny_llama):
    model, _, _ = load_model(str(tiny_llama))
    layer = decoder_layers(model)[1]
    with read_out(model, "blocks.1.hook_resid_post"):
        assert len(layer._forward_hooks) == 1
    assert len(layer._forward_hooks) == 0


@pytest.mark.parametrize("hook", ["blocks.3.hook_resid_post", "blocks.1.hook_mlp_in", "blocks.3.hook_mlp_out",
                                  "layer1", ""])
def test_bad_hook_lists_valid_ones(hook):
    with pytest.raises(QdmError, match=r"does not exist.*blocks\.L\.hook_resid_pre, blocks\.L\.hook_resid_post, "
                                       r"blocks\.L\.hook_attn_out, blocks\.L\.hook_mlp_out or blocks\.L\.attn\.hook_z "
                                       r"with L in 0\.\.2"):
        parse_hook(hook, 3)


def test_missing_model_path_is_a_user_error(tmp_path):
    with pytest.raises(QdmError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(QdmError, match="GGUF file .* does not exist"):
        load_model(gguf_file=str(tmp_path / "model.gguf"))


@pytest.mark.slow
def test_gguf_file_loads_through_transformers():
    """--gguf-file: the real SmolLM2 GGUF the default model ships as, dequantized by transformers."""
    from qdm_engine.engine.default import default_gguf_path

    model, tok, ident = load_model(gguf_file=str(default_gguf_path()), progress=False)
    assert ident["model_type"] == "llama" and ident["d_model"] == 576 and ident["n_layers"] == 30
    assert ident["source"].endswith("::SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = torch.tensor([tok("The river flows north", add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), read_out(model, "blocks.14.hook_resid_post") as ro:
        out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(ro.value, out.hidden_states[15], rtol=0, atol=0)



def test_gemma2_loads_with_eager_attention_keeping_the_soft_cap(tmp_path, monkeypatch):
    """transformers 5.17 picks SDPA for Gemma-2, which drops the attention logit soft-cap; load_model must
    switch it to eager (newer transformers refuse SDPA there; the SDPA choice is simulated on the config)."""
    from transformers import PreTrainedModel

    from qdm_engine.engine.models import faithful_attention

    real = PreTrainedModel.set_attn_implementation
    calls = []
    monkeypatch.setattr(PreTrainedModel, "set_attn_implementation",
                        lambda self, impl: calls.append(impl) or real(self, impl))
    lm, _, _ = load_model(str(build_tiny_model(tmp_path / "g", "gemma2")), dtype=torch.float32, device="cpu",
                          progress=False)
    assert calls == ["eager"] and lm.config._attn_implementation == "eager"
    lm.config._attn_implementation = "sdpa"  # what transformers 5.17 chose
    assert faithful_attention(lm).config._attn_implementation == "eager"
    calls.clear()
    load_model(str(build_tiny_model(tmp_path / "l", "llama")), dtype=torch.float32, device="cpu", progress=False)
    assert calls == []  # no soft-cap: the default attention is left alone
