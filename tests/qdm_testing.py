"""Builders for tiny offline test inputs (imported by conftest.py and by tests)."""

import random
from pathlib import Path

import torch

D_MODEL = 32
N_LAYERS = 3
WORDS = ("the of and to in a is was for on as with by he at from his it an were are which this be "
         "river castle army season album song king city church game film team war early later north "
         "south first second played released built named between during after under over").split()


def make_text(n_lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        lines.append(" " if i % 5 == 0 else " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + " .")
    return "\n".join(lines) + "\n"


def make_tokenizer(text: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<bos>", "<eos>"], show_progress=False)
    tk.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def tiny_config(family: str, vocab: int):
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, num_hidden_layers=N_LAYERS, bos_token_id=1, eos_token_id=2)
    attn = dict(hidden_size=D_MODEL, intermediate_size=64, num_attention_heads=4)
    if family == "llama":
        return LlamaConfig(**common, **attn, num_key_value_heads=2)
    if family == "mistral":
        return MistralConfig(**common, **attn, num_key_value_heads=2)
    if family == "qwen2":
        return Qwen2Config(**common, **attn, num_key_value_heads=2)
    if family == "gemma2":
        return Gemma2Config(**common, **attn, num_key_value_heads=2, head_dim=8)
    if family == "gpt_neox":
        return GPTNeoXConfig(**common, **attn)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


def build_tiny_model(path: Path, family: str = "llama", seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(make_text())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok)))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_sae(path: Path, arch: str = "standard", d_in: int = D_MODEL, d_sae: int = 128,
              hook: str = "blocks.1.hook_resid_post", seed: int = 0, **extra) -> Path:
    """A random SAELens SAE saved with SAELens's own save_model (b_enc shifted so features fire sometimes).
    Skips the calling test where sae_lens is not installed (the GPU image has none)."""
    import pytest

    pytest.importorskip("sae_lens", reason="sae_lens is not installed: this test builds its SAE with it")
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    kinds = {"standard": (StandardSAE, StandardSAEConfig), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
             "topk": (TopKSAE, TopKSAEConfig)}
    cls, cfg_cls = kinds[arch]
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook), **extra))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in ** 0.5)
        sae.b_enc.copy_(torch.randn(d_sae) * 0.3)
        sae.b_dec.copy_(torch.randn(d_in) * 0.1)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae) * 0.2)
    sae.save_model(str(path))
    return path


