import json
from pathlib import Path

import pytest
import torch
from qdm_testing import D_MODEL, N_LAYERS, tiny_config

from qdm_engine.atomic import current_umask
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
def test_tiny_training_run(tiny_llama, text_file, tmp_path, monkeypatch):
    from safetensors import safe_open
    from sae_lens import SAE

    import qdm_engine.engine.training as training

    out = tmp_path / "sae"
    kw = dict(model=tiny_llama, hook="blocks.1.hook_resid_post", width=96, text=text_file, tokens=48 * 128,
              batch_tokens=128, context_size=32, seed=0, eval_text=text_file, ce_tokens=256, progress=False,
              work_dir=tmp_path / "work")
    # A run that fails after training (here in the evaluation) leaves no output folder, complete-looking
    # or half-written, so the same command can simply be run again.
    real_evaluate = training.evaluate_sae

    def failing_evaluate(*a, **k):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(training, "evaluate_sae", failing_evaluate)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train_sae(out=out, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    monkeypatch.setattr(training, "evaluate_sae", real_evaluate)

    metrics = train_sae(out=out, **kw)
    assert metrics["activation_cache_reused"] is True  # the failed run's cache, in the work dir
    assert metrics["cached_positions"] == 6144  # what --tokens asks for (192 blocks of 32), not the whole text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae", "work"]
    umask = current_umask()  # the folder and its files get the umask's modes (safetensors alone writes 0600)
    assert [oct(p.stat().st_mode & 0o777) for p in (out, *sorted(out.iterdir()))] == \
        [oct(0o777 & ~umask)] + [oct(0o666 & ~umask)] * 3
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
    # Same seed, activation cache made afresh (not reused from the work dir): the same SAE, bit for bit.
    again = train_sae(out=tmp_path / "again", **{**kw, "work_dir": tmp_path / "work2"})
    assert again["activation_cache_reused"] is False
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


# ---- defaults that ship with the package, inputs checked before compute, the cache bounded by --tokens ----

def test_default_texts_ship_with_the_package():
    """train-sae's default texts are package data (with their attribution), not files beside the repository."""
    import hashlib

    import qdm_engine
    from qdm_engine.engine.training import DEFAULT_EVAL_TEXT, DEFAULT_TRAIN_TEXT

    package = Path(qdm_engine.__file__).resolve().parent
    attribution = (package / "data" / "wikitext-2-raw" / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for path in (DEFAULT_TRAIN_TEXT, DEFAULT_EVAL_TEXT):
        assert path.resolve().is_relative_to(package / "data"), path
        assert path.is_file() and "shared" not in path.relative_to(package).parts
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert path.name in attribution and digest in attribution  # the attribution describes these bytes
    assert "CC BY-SA 3.0" in attribution and "Merity" in attribution
    assert DEFAULT_TRAIN_TEXT.stat().st_size + DEFAULT_EVAL_TEXT.stat().st_size <= 1_200_000  # prefixes only


@pytest.mark.parametrize("n_text_tokens,tokens,expected", [
    (303_104, 16_384, 64),   # the cache covers --tokens, not the whole text
    (303_104, 2_097_152, 1184),  # a short text: all of it (several epochs)
    (303_104, 100, 8),   # at least one store batch
    (2_000, 16_384, 0),  # too short for one store batch: refused by the caller
])
def test_cache_blocks(n_text_tokens, tokens, expected):
    from qdm_engine.engine.training import cache_blocks

    n = cache_blocks(n_text_tokens, tokens, 256)
    assert n == expected and n % 8 == 0
    assert n * 255 <= n_text_tokens


def test_bad_inputs_are_reported_before_the_model_loads(tiny_llama, text_file, tmp_path, monkeypatch):
    import qdm_engine.engine.training as training

    def no_model(*_a, **_k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(training, "resolve_model_dir", no_model)
    kw = dict(model=tiny_llama, hook="blocks.1.hook_resid_post", text=text_file, eval_text=text_file,
              out=tmp_path / "o", progress=False)
    cases = [
        (dict(eval_text=tmp_path / "no-eval.txt"), r"text file .*no-eval.txt' does not exist; pass --eval-text FILE"),
        (dict(text=tmp_path / "no-train.txt"), r"no-train.txt' does not exist; pass --text FILE"),
        (dict(tokens=100, batch_tokens=1024), r"--tokens 100 is less than one training step \(--batch-tokens 1024\)"),
        (dict(model=tmp_path / "empty"), r"model folder '.*empty' is empty; pass to --model"),
        (dict(out=text_file), r"is not empty; give --out"),
        (dict(width=0), r"--width must be positive"),
        (dict(context_size=1), r"--context-size must be at least 2"),
    ]
    (tmp_path / "empty").mkdir()
    for change, message in cases:
        with pytest.raises(QdmError, match=message):
            train_sae(**{**kw, **change})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_tokens_bound_the_activation_cache(tiny_llama, text_file, tmp_path, monkeypatch):
    """With a long text and a small --tokens, only the blocks --tokens needs are cached."""
    import sae_lens

    seen = {}

    class Stop(Exception):
        pass

    class FakeCacheRunner:
        def __init__(self, cfg, override_dataset=None):
            seen["positions"] = cfg.training_tokens
            seen["context"] = cfg.context_size

        def run(self):
            raise Stop

    monkeypatch.setattr(sae_lens, "CacheActivationsRunner", FakeCacheRunner)
    with pytest.raises(Stop):
        train_sae(model=tiny_llama, hook="blocks.1.hook_resid_post", text=text_file, tokens=512, batch_tokens=128,
                  context_size=32, out=tmp_path / "o", progress=False)
    assert seen == {"positions": 512, "context": 32}
    assert not (tmp_path / "o").exists()


def test_short_eval_text_is_reported_before_caching(tiny_llama, text_file, tmp_path, monkeypatch):
    import sae_lens

    def no_cache(*_a, **_k):
        raise AssertionError("activations were cached before the held-out text was checked")

    monkeypatch.setattr(sae_lens, "CacheActivationsRunner", no_cache)
    short = tmp_path / "short.txt"
    short.write_text("the river .\n")
    with pytest.raises(QdmError, match=r"--eval-text .*short.txt gives only \d+ tokens, less than one block of 32"):
        train_sae(model=tiny_llama, hook="blocks.1.hook_resid_post", text=text_file, eval_text=short, tokens=512,
                  batch_tokens=128, context_size=32, out=tmp_path / "o", progress=False)


@pytest.mark.slow
def test_cli_defaults_work_for_an_installed_user(tmp_path):
    """`train-sae --out DIR` and nothing else, as a user who installed the package: the package copied alone
    into a temp folder (no repository, no ../shared beside it), run from a temp HOME. Small --tokens."""
    import os
    import shutil
    import subprocess
    import sys

    import qdm_engine
    from qdm_engine.engine.default import cache_root

    site, home = tmp_path / "site", tmp_path / "home"
    shutil.copytree(Path(qdm_engine.__file__).resolve().parent, site / "qdm_engine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(site), "QDM_CACHE": str(cache_root()),
           "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "qdm_engine.cli", "train-sae", "--out", "sae", "--tokens", "2048",
                           "--eval-tokens", "512", "--quiet"], cwd=home, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in home.iterdir()) == ["sae"]
    assert sorted(p.name for p in (home / "sae").iterdir()) == ["cfg.json", "metrics.json", "sae_weights.safetensors"]
    metrics = json.loads((home / "sae" / "metrics.json").read_text())
    assert Path(metrics["train_text"]).is_relative_to(site / "qdm_engine" / "data")
    assert Path(metrics["eval"]["text"]).is_relative_to(site / "qdm_engine" / "data")
    assert metrics["cached_positions"] == 2048 and metrics["training_steps"] == 2
    assert metrics["d_sae"] == 8 * metrics["d_in"] and metrics["hook_name"] == "blocks.14.hook_resid_post"
    assert metrics["eval"]["positions"] > 0 and "held-out L0" in proc.stdout
