"""`qdm-engine prune-sae`: the Wanda-style rule against a direct numpy computation, the pruned weights of a
real run against norms measured independently (transformers' hidden_states, SAELens's encode), the
folders loadable by SAELens, and ratio 0 giving the unpruned SAE's metrics exactly."""

import numpy as np
import pandas as pd
import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason="sae_lens is not installed: these tests compare with it")

from qdm_engine.cli import main  # noqa: E402
from qdm_engine.engine.compression import RTN  # noqa: E402
from qdm_engine.engine.models import load_model  # noqa: E402
from qdm_engine.engine.recon import RECON_METRICS  # noqa: E402
from qdm_engine.engine.tokens import make_blocks, read_text  # noqa: E402
from qdm_engine.prune_sae import wanda_prune  # noqa: E402


def _numpy_wanda(W, norm, ratio):
    """Row by row: zero the floor(ratio * n_in) entries of lowest |W| * norm (stable: lower index first)."""
    W = np.array(W, dtype=np.float64)
    score = np.abs(W) * np.asarray(norm, dtype=np.float64)[None, :]
    k = int(W.shape[1] * ratio)
    for o in range(W.shape[0]):
        W[o, np.argsort(score[o], kind="stable")[:k]] = 0.0
    return W


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9])
def test_wanda_rule_matches_numpy(ratio):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 30, generator=g)
    norm = torch.rand(30, generator=g)
    norm[3] = norm[7] = 0.0  # inputs never seen: their weights go first (ties: lower index first)
    W[5, :] = 1.0  # a row of ties
    got = wanda_prune(W, norm, ratio)
    assert got.dtype == W.dtype
    np.testing.assert_array_equal(got.numpy().astype(np.float64), _numpy_wanda(W.numpy(), norm.numpy(), ratio))
    assert int((got == 0).sum()) == 40 * int(30 * ratio)


def test_prune_sae_on_a_run(tiny_llama, tiny_sae, text_file, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "pruned"
    assert main(["sweep", "--model", str(tiny_llama), "--sae", str(tiny_sae), "--text", str(text_file), "--tokens",
                 "320", "--block-len", "32", "--bits", "4", "--quiet", "--out", str(run)]) == 0
    summary = pd.read_csv(run / "summary.csv").set_index("condition")
    assert summary[list(RECON_METRICS)].notna().all().all()
    capsys.readouterr()
    assert main(["prune-sae", str(run), "--condition", "int4", "--ratios", "0,0.5", "--calib-tokens", "256",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "explained_variance" in printed and "ratio-0.5" in printed
    table = pd.read_csv(out / "prune_sae.csv")
    by = table.set_index(["sae", "model"])
    # ratio 0 is the unpruned SAE: exactly its metrics, on both models
    for model in ("fp", "int4"):
        for m in RECON_METRICS:
            assert by.loc[("ratio-0", model), m] == by.loc[("unpruned", model), m], (model, m)
    # the unpruned SAE's metrics are the sweep's (same tokens, same models)
    for m in RECON_METRICS:
        assert by.loc[("unpruned", "int4"), m] == pytest.approx(summary.loc["int4", m], rel=1e-9, abs=1e-12), m
        assert by.loc[("unpruned", "fp"), m] == pytest.approx(summary.loc["fp", m], rel=1e-9, abs=1e-12), m
    assert by.loc[("ratio-0.5", "int4"), "mse"] != by.loc[("unpruned", "int4"), "mse"]

    # The pruned weights against the rule applied to norms measured here, independently: the compressed
    # model's hidden_states on the held-out blocks after the audit blocks, SAELens's own encode.
    ref_sae = sae_lens.SAE.load_from_disk(str(tiny_sae))
    pruned = sae_lens.SAE.load_from_disk(str(out / "ratio-0.5"))  # SAELens loads what was written
    model, tok, _ = load_model(str(tiny_llama), progress=False)
    RTN(4).apply(model)
    text = read_text(text_file)
    audit = make_blocks(tok, text, 32, 320, True)
    calib = make_blocks(tok, text, 32, 256, True, skip_blocks=audit.n_blocks)
    with torch.no_grad():
        hs = model(input_ids=calib.ids, output_hidden_states=True).hidden_states[2]  # blocks.1.hook_resid_post
        x = hs[calib.score_mask]
        enc_norm = ((x.double() - ref_sae.b_dec.double()) ** 2).sum(0).sqrt().numpy()
        dec_norm = (ref_sae.encode(x).double() ** 2).sum(0).sqrt().numpy()
    W_enc = _numpy_wanda(ref_sae.W_enc.detach().numpy().T, enc_norm, 0.5).T
    W_dec = _numpy_wanda(ref_sae.W_dec.detach().numpy().T, dec_norm, 0.5).T
    np.testing.assert_array_equal(pruned.W_enc.detach().numpy().astype(np.float64), W_enc)
    np.testing.assert_array_equal(pruned.W_dec.detach().numpy().astype(np.float64), W_dec)
    for name in ("b_enc", "b_dec"):
        torch.testing.assert_close(getattr(pruned, name), getattr(ref_sae, name), rtol=0, atol=0)


def test_prune_sae_bad_input(tiny_llama, tiny_sae, text_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["sweep", "--model", str(tiny_llama), "--sae", str(tiny_sae), "--text", str(text_file), "--tokens",
                 "128", "--block-len", "32", "--bits", "4", "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["prune-sae", str(run), "--condition", "int3", "--out", str(tmp_path / "o")]) == 2
    assert "no condition 'int3'" in capsys.readouterr().err
    assert main(["prune-sae", str(run), "--condition", "int4", "--ratios", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "--ratios must be numbers in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
