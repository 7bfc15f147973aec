"""Read-out sites inside a decoder layer (hook_attn_out, hook_mlp_out, attn.hook_z) against independent
references: transformers' own hidden_states, and the layer's own output projection."""

import pytest
import torch

from qdm_testing import build_sae, build_tiny_model
from qdm_engine.engine.models import decoder_layers, load_model, read_out
from qdm_engine.engine.sites import site_module, site_width
from qdm_engine.errors import QdmError

FAMILIES = ["llama", "qwen2", "gemma2", "gpt_neox", "gpt2"]


def _read(model, hooks, ids):
    from contextlib import ExitStack

    with ExitStack() as stack, torch.no_grad():
        ros = {h: stack.enter_context(read_out(model, h)) for h in hooks}
        out = model(input_ids=ids, output_hidden_states=True)
        return {h: r.value.clone() for h, r in ros.items()}, out.hidden_states


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_and_mlp_out_add_up_to_the_layer_update(tmp_path, family):
    """What the attention and the MLP add to the residual is hidden_states[L+1] - hidden_states[L]."""
    model, _, _ = load_model(str(build_tiny_model(tmp_path / family, family, seed=3)))
    ids = torch.randint(3, 150, (2, 12), generator=torch.Generator().manual_seed(0))
    for layer in (0, 2):
        got, hs = _read(model, [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out",
                                f"blocks.{layer}.hook_resid_post"], ids)
        update = hs[layer + 1] - hs[layer]
        if layer == 2:  # the last hidden state is after the final norm in transformers' output
            update = got[f"blocks.{layer}.hook_resid_post"] - hs[layer]
        total = got[f"blocks.{layer}.hook_attn_out"] + got[f"blocks.{layer}.hook_mlp_out"]
        torch.testing.assert_close(total, update, atol=2e-5, rtol=1e-5)
        assert got[f"blocks.{layer}.hook_attn_out"].abs().sum() > 0 and got[f"blocks.{layer}.hook_mlp_out"].abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_z_through_the_output_projection_is_attn_out(tmp_path, family):
    model, _, _ = load_model(str(build_tiny_model(tmp_path / family, family, seed=4)))
    layers = decoder_layers(model)
    ids = torch.randint(3, 150, (2, 10), generator=torch.Generator().manual_seed(1))
    got, _ = _read(model, ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"], ids)
    z = got["blocks.1.attn.hook_z"]
    assert z.shape[-1] == site_width(model, layers, "blocks.1.attn.hook_z")
    proj, where = site_module(layers[1], "z", "blocks.1.attn.hook_z")
    assert where == "in"
    with torch.no_grad():
        out = proj(z)
        if hasattr(layers[1], "post_feedforward_layernorm"):
            out = layers[1].post_attention_layernorm(out)
    torch.testing.assert_close(out, got["blocks.1.hook_attn_out"], atol=1e-5, rtol=1e-5)


def test_unknown_site_lists_the_valid_ones(tiny_llama):
    from qdm_engine.engine.models import parse_hook

    with pytest.raises(QdmError, match=r"hook 'blocks.1.hook_q' does not exist in this model; valid hooks: "
                                       r"blocks.L.hook_resid_pre, .*blocks.L.attn.hook_z with L in 0..2"):
        parse_hook("blocks.1.hook_q", 3)


@pytest.mark.parametrize("hook, width", [("blocks.1.hook_mlp_out", 32), ("blocks.1.attn.hook_z", 32),
                                         ("blocks.0.hook_attn_out", 32)])
def test_sweep_at_a_sub_layer_site(tiny_llama, text_file, tmp_path, hook, width):
    from qdm_engine.audit import sweep

    sae = build_sae(tmp_path / "sae", d_in=width, hook=hook)
    res = sweep(model=str(tiny_llama), sae=str(sae), bits="4", text=str(text_file), tokens=256, block_len=32,
                progress=False, log=lambda _m: None)
    assert res.config["hook"] == hook
    row = res.summary.set_index("condition").loc["int4"]
    assert row["n_active"] > 0 and 0 < row["mean_r"] < 1
    null = sweep(model=str(tiny_llama), sae=str(sae), bits=None, null=True, text=str(text_file), tokens=256,
                 block_len=32, progress=False, log=lambda _m: None)
    feats = null.features["fp-null"]
    assert (feats.loc[feats["active"], "r"] > 1 - 1e-9).all()
