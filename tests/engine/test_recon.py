"""Reconstruction and spliced-loss metrics of the sweep (engine/recon.py, engine/splice.py, the fused
kernels/reconstruct.py) against SAELens's own metric functions (sae_lens/evals.py) run on the same tiny
model, SAE and tokens, for the FP model and an RTN INT4 condition, and against a numpy float64 oracle.

SAELens's functions take a TransformerLens-like model; the adapter below gives them the tiny HF model with
its own forward hooks (written here, independently of engine/splice.py), the tokens of our blocks as one
batch, and the BOS id as the ignored token (our statistics drop the BOS positions, METHOD.md section 2)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sae_lens = pytest.importorskip("sae_lens", reason="sae_lens is not installed: these tests compare with it")

from qdm_testing import build_sae  # noqa: E402
from qdm_engine.engine.compression import RTN  # noqa: E402
from qdm_engine.engine.models import load_model  # noqa: E402
from qdm_engine.engine.recon import RECON_METRICS, ReconSums  # noqa: E402
from qdm_engine.engine.runner import run_conditions  # noqa: E402
from qdm_engine.engine.sae import load_sae  # noqa: E402
from qdm_engine.engine.splice import SPLICE_METRICS  # noqa: E402
from qdm_engine.engine.tokens import make_blocks, read_text  # noqa: E402
from qdm_engine.kernels.reconstruct import reconstruct_stats_reference, reconstruct_stats_triton  # noqa: E402

LAYER = 1
HOOK = f"blocks.{LAYER}.hook_resid_post"


class _Adapter:
    """What sae_lens.evals calls on a HookedRootModule, for an HF causal LM (hook_resid_post only)."""

    def __init__(self, model):
        self.model = model

    def _logits(self, tokens):
        return self.model(input_ids=tokens, use_cache=False).logits

    @staticmethod
    def _loss(logits, tokens):
        lp = F.log_softmax(logits.float(), dim=-1)
        return -lp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)

    def __call__(self, tokens, return_type="both", loss_per_token=True, **_kw):
        logits = self._logits(tokens)
        return logits, self._loss(logits, tokens)

    def run_with_hooks(self, tokens, return_type="both", fwd_hooks=(), loss_per_token=True, **_kw):
        (name, fn), = fwd_hooks
        assert name == HOOK
        layer = self.model.model.layers[LAYER]
        handle = layer.register_forward_hook(
            lambda _m, _a, out: (fn(out[0], None), *out[1:]) if isinstance(out, tuple) else fn(out, None))
        try:
            logits = self._logits(tokens)
        finally:
            handle.remove()
        return logits, self._loss(logits, tokens)

    def run_with_cache(self, tokens, names_filter=(), **_kw):
        hs = self.model(input_ids=tokens, use_cache=False, output_hidden_states=True).hidden_states
        return None, {HOOK: hs[LAYER + 1]}


class _Store:
    def __init__(self, ids):
        self.ids = ids

    def get_batch_tokens(self, _n):
        return self.ids


def _sae_lens_metrics(model, sae_path, blocks):
    from sae_lens import SAE
    from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    sae = SAE.load_from_disk(str(sae_path))
    adapter, store, scaler = _Adapter(model), _Store(blocks.ids), ActivationScaler()
    with torch.no_grad():
        m, feats = get_sparsity_and_variance_metrics(
            sae, adapter, store, scaler, n_batches=1, compute_l2_norms=True, compute_sparsity_metrics=True,
            compute_variance_metrics=True, compute_featurewise_density_statistics=True,
            eval_batch_size_prompts=blocks.n_blocks, model_kwargs={}, ignore_tokens=[blocks.bos_id])
        m["frac_alive"] = float((np.array(feats["feature_density"]) > 0).mean())
        m.update(get_downstream_reconstruction_metrics(
            sae, adapter, store, scaler, compute_kl=True, compute_ce_loss=True, n_batches=1,
            eval_batch_size_prompts=blocks.n_blocks, ignore_tokens=[blocks.bos_id]))
    return m


@pytest.fixture(scope="module")
def setup(tiny_llama, tiny_sae, text_file):
    model, tok, _ = load_model(str(tiny_llama), progress=False)
    blocks = make_blocks(tok, read_text(text_file), 32, 32 * 10, True)
    runs = run_conditions(model, [load_sae(tiny_sae)], [HOOK], blocks, [RTN(4)], 4, progress=False, topk=0,
                          splice=True)
    return model, blocks, runs


@pytest.mark.parametrize("which", ["fp", "int4"])
def test_metrics_match_sae_lens(setup, tiny_sae, which):
    model, blocks, runs = setup
    run = runs[0] if which == "fp" else runs[1]
    assert run.name == which
    if which == "int4":
        from qdm_engine.engine.compression import FPWeights

        saved = FPWeights(model)
        RTN(4).apply(model)
    try:
        ref = _sae_lens_metrics(model, tiny_sae, blocks)
    finally:
        if which == "int4":
            saved.restore()
    got = {**run.recon[0], **run.splice[0]}
    assert set(RECON_METRICS) <= set(got) and set(SPLICE_METRICS) <= set(got)
    assert 0.0 < got["frac_alive"] <= 1.0 and got["l0"] > 1, "the test SAE must fire"
    for name in RECON_METRICS:
        assert got[name] == pytest.approx(ref[name], abs=1e-6, rel=1e-6), name
    for name in SPLICE_METRICS[2:]:  # the mean CE and KL values
        assert got[name] == pytest.approx(ref[name], abs=1e-6, rel=1e-6), name
    # The scores: within 1e-4, or within SAELens's own float32 rounding of its means (~1e-6 each) carried
    # through the score's denominator where that is small (the untrained tiny model: CE_ablation ~ CE_clean).
    for name, (a, s, c) in {"ce_loss_score": ("ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae"),
                            "kl_div_score": ("kl_div_with_ablation", "kl_div_with_sae", None)}.items():
        den = ref[a] - (ref[c] if c else 0.0)
        tol = max(1e-4, 2e-6 / abs(den) + 2e-6 * abs(ref[a] - ref[s]) / den ** 2)
        assert got[name] == pytest.approx(ref[name], abs=tol), name
    # the splice changes the model's output (a random SAE on an untrained model: the scores are not in 0..1)
    assert got["kl_div_with_sae"] > 1e-4 and got["ce_loss_with_sae"] != got["ce_loss_without_sae"]


def test_condition_metrics_differ_from_fp(setup):
    _model, _blocks, runs = setup
    assert runs[0].recon[0]["mse"] != runs[1].recon[0]["mse"]
    assert runs[0].splice[0]["ce_loss_without_sae"] != runs[1].splice[0]["ce_loss_without_sae"]


def test_recon_sums_match_numpy_float64(tmp_path):
    """ReconSums over several batches against a float64 numpy computation on the whole set, for a
    layer-norm SAE (the normalisation is undone on the reconstruction)."""
    path = build_sae(tmp_path / "sae", "standard", d_in=24, d_sae=96, seed=3, normalize_activations="layer_norm")
    sae = load_sae(path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g) * 2 + 0.7
    acc = ReconSums(sae, "cpu")
    for lo in range(0, 300, 128):
        acc.add(x[lo:lo + 128])
    got = acc.metrics()
    ref_sae = sae_lens.SAE.load_from_disk(str(path))
    with torch.no_grad():
        acts = ref_sae.encode(x).double().numpy()
        xh = ref_sae.decode(ref_sae.encode(x)).double().numpy()
    xs = x.double().numpy()
    e2 = ((xs - xh) ** 2).sum(1)
    nx, nxh = np.linalg.norm(xs, axis=1), np.linalg.norm(xh, axis=1)
    var = (xs ** 2).sum(1).mean() - (xs.mean(0) ** 2).sum()
    ref = {"explained_variance": 1 - e2.mean() / var, "mse": e2.mean(), "cossim": ((xs * xh).sum(1) / (nx * nxh)).mean(),
           "l0": (acts != 0).sum(1).mean(), "l1": np.abs(acts).sum(1).mean(), "frac_alive": (acts != 0).any(0).mean(),
           "l2_ratio": (nxh / nx).mean(), "relative_reconstruction_bias": (nxh ** 2).mean() / (xs * xh).sum(1).mean()}
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, abs=1e-6, rel=1e-6), name


@pytest.mark.parametrize("mode", ["relu", "jumprelu", "topk", "norm"])
def test_fused_kernel_matches_reference(mode):
    """The fused kernel under the interpreter against the torch reference: one column tile (large blocks)
    and several (small blocks: the encode recomputed per tile, l0/l1 counted once)."""
    g = torch.Generator().manual_seed(1)
    t, d, f = 70, 24, 100
    x = torch.randn(t, d, generator=g) * 2 + 0.3
    W_enc, b_enc = torch.randn(d, f, generator=g) / d ** 0.5, torch.randn(f, generator=g) * 0.3
    b_dec, W_dec, b_out = torch.randn(d, generator=g) * 0.1, torch.randn(f, d, generator=g) / f ** 0.5, torch.randn(d, generator=g)
    b_enc[:10] = -100.0  # ten dead features: the fired flags are checked both ways
    thr = torch.rand(f, generator=g) * 0.2 if mode == "jumprelu" else None
    k = 7 if mode == "topk" else None
    ss = (torch.rand(t, generator=g) + 0.5, torch.randn(t, generator=g)) if mode == "norm" else (None, None)
    ref, fired = reconstruct_stats_reference(x, x, W_enc, b_enc, b_dec, thr, k, W_dec, b_out, *ss)
    assert 0 < fired.sum() < f and (ref[:, 4] > 0).all()
    for blocks in ({}, dict(block_t=16, block_f=32, block_d=16, block_o=16)):
        got, got_fired = reconstruct_stats_triton(x, x, W_enc, b_enc, b_dec, thr, k, W_dec, b_out, *ss, **blocks)
        assert torch.equal(got_fired, fired)
        torch.testing.assert_close(got[:, 4], ref[:, 4], rtol=0, atol=0)  # l0: counts, exact
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-5)


def test_splice_without_logits_is_refused_before_the_model_loads(tiny_llama, tiny_sae, text_file, tmp_path, capsys):
    from qdm_engine.cli import main

    out = tmp_path / "run"
    assert main(["sweep", "--model", str(tiny_llama), "--sae", str(tiny_sae), "--text", str(text_file), "--bits", "4",
                 "--splice", "--no-ppl", "--quiet", "--out", str(out)]) == 2
    assert "--splice needs the logits of every forward: drop --no-ppl" in capsys.readouterr().err
    assert not out.exists()


def test_sae_without_a_decoder_leaves_the_metrics_empty(tiny_llama, text_file):
    """An SAE built without W_dec (as the synthetic benchmarks build theirs) still audits; no metrics."""
    from qdm_engine.engine.sae import SAEWeights

    model, tok, _ = load_model(str(tiny_llama), progress=False)
    g = torch.Generator().manual_seed(0)
    sae = SAEWeights(torch.randn(32, 64, generator=g) / 6, -0.1 * torch.rand(64, generator=g), torch.zeros(32),
                     "standard", HOOK)
    blocks = make_blocks(tok, read_text(text_file), 32, 32 * 4, True)
    runs = run_conditions(model, [sae], [HOOK], blocks, [RTN(4)], 4, progress=False, topk=0)
    assert runs[0].recon == [{}] and runs[1].recon == [{}] and runs[1].moments
