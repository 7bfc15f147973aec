"""Top-k FP positions per feature, kept during the FP pass, against independent numpy computations.

Order: activation descending, ties to the earlier position; positions where a feature does not fire
are never reported. Float tolerances: the engine encodes in float32 GEMMs (or float32 dot products for
the conditions), numpy in float64, so activations agree to ~1e-5 of their size; positions are compared
exactly except between activations closer than that tolerance.
"""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from qdm_testing import build_sae
from qdm_engine.engine.compression import RTN
from qdm_engine.engine.models import load_model
from qdm_engine.engine.runner import run_conditions
from qdm_engine.engine.sae import load_sae
from qdm_engine.engine.tokens import make_blocks, read_text
from qdm_engine.engine.topk import TopK


def numpy_topk(acts: np.ndarray, k: int) -> pd.DataFrame:
    """Reference: per feature sort its positive activations by (-value, row), keep the first k."""
    rows = []
    for f in range(acts.shape[1]):
        col = acts[:, f]
        order = np.lexsort((np.arange(len(col)), -col))
        for rank, row in enumerate([r for r in order if col[r] > 0][:k]):
            rows.append((f, rank, row, col[row]))
    return pd.DataFrame(rows, columns=["feature", "rank", "row", "fp_act"])


def test_topk_ties_and_silent_features_match_numpy_in_any_chunking():
    rng = np.random.default_rng(0)
    t, f, k = 300, 12, 5
    acts = np.maximum(rng.normal(0, 1, (t, f)), 0).astype(np.float32)
    acts[:, 3] = 0  # never fires
    acts[:, 4] = 0
    acts[[7, 200], 4] = 2.5  # fires twice: two entries, not k
    acts[:, 5] = np.round(acts[:, 5], 1)  # many exact ties, also at the k-th value
    acts[:, 6] = np.minimum(acts[:, 6], 0.5)
    acts[[10, 50, 90, 150, 250, 299], 6] = 1.0  # six-way tie at the top: the five earliest rows win
    acts[:, 7] = 0.5 * (rng.random(t) < 0.5)  # a constant value on about half the rows
    ref = numpy_topk(acts, k)
    assert (ref["feature"] == 3).sum() == 0 and (ref["feature"] == 4).sum() == 2
    for chunks in ([t], [1, 299], [64, 64, 64, 64, 44], [150, 150]):
        tracker, lo = TopK(f, k, "cpu"), 0
        for size in chunks:
            tracker.update(torch.from_numpy(acts[lo:lo + size]), lo)
            lo += size
        got = tracker.entries()
        pd.testing.assert_frame_equal(got.reset_index(drop=True),
                                      ref.astype(got.dtypes.to_dict()).reset_index(drop=True))
    six = ref[ref["feature"] == 6]
    assert six["row"].tolist() == [10, 50, 90, 150, 250]


def _hidden(model, ids: torch.Tensor, layer: int) -> np.ndarray:
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    return hs[layer + 1].double().numpy()  # blocks.L.hook_resid_post is the output of decoder layer L


def _np_encode(x: np.ndarray, sae) -> np.ndarray:
    w, b_enc, b_dec = (t.double().numpy() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    pre = (x - b_dec) @ w + b_enc
    if sae.k is not None:
        kth = -np.sort(-pre, axis=-1)[..., sae.k - 1:sae.k]
        return np.where(pre >= kth, np.maximum(pre, 0), 0.0)
    act = np.maximum(pre, 0)
    if sae.threshold is not None:
        act = act * (pre > sae.threshold.double().numpy())
    return act


@pytest.mark.parametrize("arch,extra", [("standard", {}), ("jumprelu", {}), ("topk", {"k": 9})])
def test_run_keeps_the_top_k_positions_and_each_conditions_activations_there(
        arch, extra, tiny_llama, text_file, tmp_path):
    model, tok, _ = load_model(str(tiny_llama), progress=False)
    sae = load_sae(build_sae(tmp_path / "sae", arch, **extra))
    blocks = make_blocks(tok, read_text(text_file), 32, 32 * 10, True)
    k = 6
    runs = run_conditions(model, [sae], [sae.hook_name], blocks, [RTN(4)], 3, progress=False, topk=k)
    got = runs[0].topk[0]
    assert list(got.columns) == ["feature", "rank", "block", "pos", "fp_act"]

    layer = int(sae.hook_name.split(".")[1])
    ids = blocks.ids
    keep = blocks.score_mask.numpy()
    assert not keep[:, 0].any()  # BOS is position 0 and never scored
    fp = _np_encode(_hidden(model, ids, layer), sae)  # [blocks, len, F]
    compressed = copy.deepcopy(model)
    RTN(4).apply(compressed)
    c = _np_encode(_hidden(compressed, ids, layer), sae)
    block_of, pos_of = np.nonzero(keep)
    ref = numpy_topk(fp[block_of, pos_of], k)
    ref["block"], ref["pos"] = block_of[ref["row"]], pos_of[ref["row"]]

    scale = np.abs(fp).max()
    tol = 2e-5 * scale
    # the same features, the same number of entries each (features that never fire have none)
    assert got.groupby("feature").size().to_dict() == ref.groupby("feature").size().to_dict()
    assert set(range(sae.d_sae)) - set(got["feature"])  # some features never fire at this scale
    m = got.merge(ref, on=["feature", "rank"], suffixes=("", "_ref"))
    assert len(m) == len(got)
    np.testing.assert_allclose(m["fp_act"], m["fp_act_ref"], rtol=0, atol=tol)
    # the engine's value at its own position is the numpy value there; positions agree exactly except
    # where the reference holds near-equal activations (order decided below the float32 tolerance)
    np.testing.assert_allclose(m["fp_act"], fp[m["block"], m["pos"], m["feature"]], rtol=0, atol=tol)
    differ = (m["block"] != m["block_ref"]) | (m["pos"] != m["pos_ref"])
    assert (np.abs(m.loc[differ, "fp_act"] - m.loc[differ, "fp_act_ref"]) <= tol).all()
    assert differ.mean() < 0.05

    # each condition's activations at those positions, slot [rank, feature]
    at = runs[1].topk[0]
    assert at.shape == (k, sae.d_sae)
    mine = at[got["rank"], got["feature"]]
    np.testing.assert_allclose(mine, c[got["block"], got["pos"], got["feature"]], rtol=0, atol=2e-5 * np.abs(c).max())
    assert np.abs(mine - got["fp_act"]).max() > 0  # INT4 moves them


def test_null_condition_reproduces_the_fp_activations(tiny_llama, tiny_sae, text_file):
    from qdm_engine.engine.compression import FP

    model, tok, _ = load_model(str(tiny_llama), progress=False)
    sae = load_sae(tiny_sae)
    blocks = make_blocks(tok, read_text(text_file), 32, 32 * 8, True)
    runs = run_conditions(model, [sae], [sae.hook_name], blocks, [FP()], 4, progress=False)
    got = runs[0].topk[0]
    same = runs[1].topk[0][got["rank"], got["feature"]]
    np.testing.assert_allclose(same, got["fp_act"], rtol=1e-5, atol=1e-6)
