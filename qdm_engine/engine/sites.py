"""Read-out sites inside a decoder layer, named as TransformerLens / SAELens name them.

    blocks.L.hook_resid_pre    input of decoder layer L                (= hidden_states[L])
    blocks.L.hook_resid_post   output of decoder layer L               (= hidden_states[L+1])
    blocks.L.hook_attn_out     what the attention adds to the residual  (its output; after the post-attention
                               norm in families that normalise sub-layer outputs: Gemma-2/3, OLMo-2)
    blocks.L.hook_mlp_out      what the MLP adds to the residual        (likewise after the post-MLP norm)
    blocks.L.attn.hook_z       the heads' outputs, concatenated: the input of the attention's output
                               projection ([.., n_heads * d_head], as SAELens' hook_z SAEs read it)

The modules are found from the layer itself: the attention is the child named self_attn / attn /
attention, the MLP the child named mlp / feed_forward, the output projection the attention's o_proj /
c_proj / dense / out_proj.
"""

from __future__ import annotations

import re

import torch

from qdm_engine.errors import QdmError

SITE_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|attn\.hook_z)$")
KINDS = {"hook_resid_pre": "pre", "hook_resid_post": "post", "hook_attn_out": "attn_out",
         "hook_mlp_out": "mlp_out", "attn.hook_z": "z"}
_ATTN = ("self_attn", "attn", "attention", "self_attention")
_MLP = ("mlp", "feed_forward", "ffn")
_OPROJ = ("o_proj", "c_proj", "dense", "out_proj")


def valid_sites(n_layers: int) -> str:
    return (f"blocks.L.hook_resid_pre, blocks.L.hook_resid_post, blocks.L.hook_attn_out, blocks.L.hook_mlp_out "
            f"or blocks.L.attn.hook_z with L in 0..{n_layers - 1}")


def parse_site(hook: str, n_layers: int) -> tuple[int, str]:
    """(layer, kind) with kind in pre, post, attn_out, mlp_out, z; a QdmError listing the valid sites."""
    m = SITE_RE.match(hook or "")
    if m is None or int(m.group(1)) >= n_layers:
        raise QdmError(f"hook '{hook}' does not exist in this model; valid hooks: {valid_sites(n_layers)}")
    return int(m.group(1)), KINDS[m.group(2)]


def _child(mod: torch.nn.Module, names: tuple[str, ...], what: str, hook: str) -> torch.nn.Module:
    for n in names:
        sub = getattr(mod, n, None)
        if isinstance(sub, torch.nn.Module):
            return sub
    raise QdmError(f"hook '{hook}': cannot find the {what} module of this model's decoder layer "
                   f"(looked for {', '.join(names)}); read the residual stream instead (hook_resid_post)")


def site_module(layer: torch.nn.Module, kind: str, hook: str) -> tuple[torch.nn.Module, str]:
    """(module, 'out' | 'in'): the module whose output (or first input) is the site's value."""
    post_norms = hasattr(layer, "post_feedforward_layernorm")  # Gemma-2/3, OLMo-2 normalise sub-layer outputs
    if kind == "attn_out":
        if post_norms:
            return layer.post_attention_layernorm, "out"
        return _child(layer, _ATTN, "attention", hook), "out"
    if kind == "mlp_out":
        if post_norms:
            return layer.post_feedforward_layernorm, "out"
        return _child(layer, _MLP, "MLP", hook), "out"
    if kind == "z":
        attn = _child(layer, _ATTN, "attention", hook)
        return _child(attn, _OPROJ, "attention output projection", hook), "in"
    raise ValueError(kind)


def site_width(model: torch.nn.Module, layers, hook: str) -> int:
    """The width of the vectors read at `hook` (d_model, or n_heads * d_head for attn.hook_z)."""
    layer, kind = parse_site(hook, len(layers))
    if kind != "z":
        return int(model.get_input_embeddings().weight.shape[1])
    proj, _ = site_module(layers[layer], kind, hook)
    w = proj.weight
    return int(w.shape[0] if type(proj).__name__ == "Conv1D" else w.shape[1])
