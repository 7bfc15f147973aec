"""`qdm-engine prune-sae`: the pruned-SAE remedy of Gupte et al. 2025 (arXiv 2507.15977), METHOD.md 4c.

Rebuilds a finished run's compressed model for one condition (from config.json's spec, as `qdm-engine ppl`
does), reads calibration activations at the SAE's site on held-out blocks (the text after the audit
blocks, disjoint from them), prunes the FP SAE with a Wanda-style score at each ratio, writes each pruned
SAE as a SAELens-format folder, and measures every SAE (the unpruned one first) on the run's audit tokens,
on the FP and on the compressed model, with the sweep's reconstruction (and, with --splice, spliced-loss)
metrics.

The rule (Wanda, Sun et al. 2023, applied to the SAE's two matrices as linear layers y = W x, W [out, in]):
    score[o, i] = |W[o, i]| * ||X_i||_2      (||X_i||: the norm of input i over all calibration positions)
    in each row o (one output), the floor(ratio * in) entries of lowest score are set to zero
    (ties: the lower input index first, a stable sort).
  encoder: out = feature f, in = input dimension j; W[f, j] = W_enc[j, f] (SAELens stores W_enc [d_in, d_sae]);
           X = the encoder's input, x - b_dec (after the SAE's input normalisation; x alone when the SAE does
           not subtract b_dec from its input)
  decoder: out = output dimension j, in = feature f; W[j, f] = W_dec[f, j]; X = the unpruned SAE's feature
           activations on the same positions (divided by ||W_dec_f|| for a TopK SAE that rescales by the
           decoder norm, as SAELens's decode does)
Both norms are measured once, with the unpruned SAE, on the compressed model's read-outs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import torch

from qdm_engine.analysis.results import check_out_dir, load_config
from qdm_engine.atomic import temp_dir_beside
from qdm_engine.engine.recon import RECON_METRICS
from qdm_engine.engine.splice import SPLICE_METRICS
from qdm_engine.errors import QdmError

PRUNE_COLUMNS = ["sae", "ratio", "model", *RECON_METRICS, *SPLICE_METRICS]


def wanda_prune(W: torch.Tensor, in_norm: torch.Tensor, ratio: float) -> torch.Tensor:
    """W [out, in] with the floor(ratio * in) entries of lowest |W| * in_norm zeroed in every row."""
    n_drop = int(W.shape[1] * ratio)
    out = W.clone()
    if n_drop == 0:
        return out
    score = W.abs().to(torch.float64) * in_norm.to(torch.float64)[None, :]
    drop = torch.argsort(score, dim=1, stable=True)[:, :n_drop]
    return out.scatter_(1, drop, torch.zeros_like(drop, dtype=out.dtype))


def _parse_ratios(ratios) -> list[float]:
    vals = [float(r) for r in ratios]
    bad = [r for r in vals if not 0.0 <= r < 1.0]
    if not vals or bad:
        raise QdmError(f"--ratios must be numbers in [0, 1), got {', '.join(map(str, bad or vals)) or 'none'}")
    return sorted(set(vals))


def _raw_sae(source: str):
    """(cfg dict, state dict of float tensors, SAELens SAE or None) of the SAE as stored."""
    from qdm_engine.engine.sae import _read_disk_cfg, _sae_lens_available

    path = Path(source)
    if _sae_lens_available():
        from sae_lens import SAE

        if path.is_dir():
            sae = SAE.load_from_disk(str(path), device="cpu")
        else:
            release, sae_id = source.split(":", 1)
            sae = SAE.from_pretrained(release, sae_id, device="cpu")
        return sae.cfg.to_dict(), {k: v.detach().clone() for k, v in sae.state_dict().items()}, sae
    if not path.is_dir():
        raise QdmError(f"the run's SAE '{source}' is a SAELens release: pip install sae-lens to prune it")
    from safetensors.torch import load_file

    return _read_disk_cfg(path), load_file(str(path / "sae_weights.safetensors")), None


def _write_sae(dest: Path, source: str, state: dict, sae_obj) -> None:
    """A SAELens-format folder (cfg.json + sae_weights.safetensors) holding `state`."""
    if sae_obj is not None:
        with torch.no_grad():
            for name, t in state.items():
                getattr(sae_obj, name).data.copy_(t)
        sae_obj.save_model(str(dest))
        return
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(source) / "cfg.json", dest / "cfg.json")
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "sae_weights.safetensors"))


def calibration_norms(model, sae, hook: str, blocks, batch_size: int, device: str, rescale_norm=None):
    """(||X_j|| of the encoder's input [d_in], ||a_f|| of the feature activations [d_sae]) over the scored
    positions of `blocks`, float64, read at `hook` of `model` as it is now."""
    from qdm_engine.engine.models import StopForward, read_out, stop_after

    enc = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    dec = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    with torch.inference_mode(), read_out(model, hook) as ro, stop_after(model, [hook]):
        for lo in range(0, blocks.n_blocks, batch_size):
            ids = blocks.ids[lo:lo + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except StopForward:
                pass
            x = ro.value.reshape(-1, ro.value.shape[-1])[blocks.score_mask[lo:lo + batch_size].flatten().to(device)]
            xin = sae.normalise_input(x) - sae.b_dec  # b_dec is zero when the SAE does not subtract it
            enc += (xin.to(torch.float64) ** 2).sum(0)
            acts = sae.encode(x).to(torch.float64)
            if rescale_norm is not None:
                acts = acts / rescale_norm.to(acts)
            dec += (acts ** 2).sum(0)
    return enc.sqrt(), dec.sqrt()


def prune_sae(run_dir, condition: str, ratios=(0.25, 0.5), out=None, calib_tokens: int = 4096,
              splice: bool = False, batch_size: int = 8, device: str | None = None, progress: bool = True,
              log=print) -> pd.DataFrame:
    """Prune the run's FP SAE on `condition`'s compressed model and measure each SAE; returns the table
    (also written to OUT/prune_sae.csv, with each pruned SAE in OUT/ratio-R/)."""
    from qdm_engine.audit import _held_out_blocks, load_lm
    from qdm_engine.engine.compression import FPWeights
    from qdm_engine.engine.models import parse_dtype
    from qdm_engine.engine.runner import run_conditions
    from qdm_engine.engine.sae import load_sae
    from qdm_engine.engine import corpus
    from qdm_engine.sliding_ppl import _condition

    run_dir = Path(run_dir)
    config = load_config(run_dir)
    ratios = _parse_ratios(ratios)
    if out is None:
        raise QdmError("prune-sae needs --out DIR for the pruned SAEs")
    out = check_out_dir(out)
    names = [c["name"] for c in config["conditions"]]
    if condition not in names:
        raise QdmError(f"run '{run_dir}' has no condition '{condition}'; choose --condition from {', '.join(names)}")
    cond = _condition(next(c for c in config["conditions"] if c["name"] == condition))
    if cond is None:
        raise QdmError(f"condition '{condition}' is the FP model itself; choose a compressed condition")
    if getattr(cond, "calibration", False):
        raise QdmError(f"condition '{condition}' is a calibrated method whose calibration tokens the run does not "
                       "store; choose an uncalibrated condition (RTN, magnitude pruning, ...)")
    if len(config.get("saes", [])) > 1:
        log(f"this run audits {len(config['saes'])} SAEs; pruning the first ({config['saes'][0]['tag']})")
    load = config.get("model", {}).get("load")
    if load is None:
        raise QdmError(f"run '{run_dir}' records no model loading arguments; rerun the sweep with this version")
    source, hook = str(config["sae"]["source"]), config["hook"]
    tcfg = config["tokens"]
    text, field = str(tcfg["text"]), tcfg.get("text_field") or "text"
    if text == corpus.STDIN:
        raise QdmError(f"run '{run_dir}' read its text from standard input, which cannot be read again; rerun the "
                       "sweep with --text FILE to prune its SAE")
    if not corpus.head(text, 1000, field):  # every input is checked before the model loads
        raise QdmError(f"the run's text '{text}' is empty or gone; restore it to prune the SAE on that run")
    device = device or config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, state, sae_obj = _raw_sae(source)
    fp_sae = load_sae(source, device=device)
    lm, tok, _ = load_lm(load["model"], load["gguf_file"], parse_dtype(config.get("dtype"), device), device,
                         load["trust_remote_code"], progress)
    blocks = corpus.stream_blocks(tok, text, tcfg["block_len"], tcfg["budget"], tcfg.get("bos", True), field=field)
    if tcfg.get("ids_sha256") and corpus.ids_sha256(blocks.ids) != tcfg["ids_sha256"]:
        raise QdmError(f"the run's text '{text}' no longer gives the audited tokens (their sha256 differs); restore "
                       "the text the sweep read")
    calib = _held_out_blocks(tok, text, tcfg["block_len"], max(tcfg["block_len"], calib_tokens), tcfg.get("bos", True),
                             blocks.n_blocks, field=field)
    rescale = None
    if cfg.get("architecture") == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        rescale = state["W_dec"].to(torch.float32).norm(dim=-1).to(device)
    log(f"calibration: {calib.scored_positions} positions at {hook} of {condition} (held out from the audit blocks)")
    saved = FPWeights(lm)
    cond.apply(lm)
    try:
        enc_norm, dec_norm = calibration_norms(lm, fp_sae, hook, calib, batch_size, device, rescale)
    finally:
        saved.restore()

    tmp = temp_dir_beside(out)
    try:
        paths = []
        for r in ratios:
            pruned = dict(state)
            W_enc, W_dec = state["W_enc"], state["W_dec"]
            pruned["W_enc"] = wanda_prune(W_enc.t(), enc_norm.cpu(), r).t().contiguous()
            pruned["W_dec"] = wanda_prune(W_dec.t(), dec_norm.cpu(), r).t().contiguous()
            dest = tmp / f"ratio-{r:g}"
            _write_sae(dest, source, pruned, sae_obj)
            paths.append(dest)
        saes = [fp_sae] + [load_sae(p, device=device) for p in paths]  # our loader reads what was written
        runs = run_conditions(lm, saes, [hook] * len(saes), blocks, [cond], batch_size, device, progress,
                              ppl=splice, topk=0, units=0, splice=splice)
        rows = []
        for i, r in enumerate([0.0] + ratios):
            label = "unpruned" if i == 0 else f"ratio-{r:g}"
            for run, model_name in zip(runs, ("fp", condition)):
                rows.append({"sae": label, "ratio": r, "model": model_name, **run.recon[i],
                             **(run.splice[i] if run.splice else {})})
        table = pd.DataFrame(rows).reindex(columns=PRUNE_COLUMNS)
        table.to_csv(tmp / "prune_sae.csv", index=False)
        meta = {"run": str(run_dir.resolve()), "condition": condition, "spec": config["conditions"][names.index(condition)].get("spec"),
                "sae": source, "hook": hook, "ratios": ratios, "splice": splice,
                "calibration": {"tokens": calib.n_blocks * calib.block_len, "scored_positions": calib.scored_positions,
                                "blocks": f"the {calib.n_blocks} blocks after the run's {blocks.n_blocks} audit blocks"},
                "rule": "wanda: |W| x input norm, floor(ratio x inputs) lowest per output row zeroed (METHOD.md 4c)"}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return table


def format_prune(table: pd.DataFrame) -> str:
    cols = ["sae", "model", "explained_variance", "mse", "cossim", "l0", "frac_alive"]
    cols += [c for c in ("ce_loss_score", "kl_div_score") if c in table and table[c].notna().any()]
    return table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}")
