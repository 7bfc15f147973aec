"""`qdm-engine ppl`: sliding-window perplexity for the conditions of a finished run.

Reloads the run's model (from config.json), walks the run's own audit text with a sliding window
(docs/METHOD.md section 6: window W, stride S, BOS at the start of each window, only new targets scored,
token-weighted), for FP and each compression condition, and adds `ppl_sliding` and
`dppl_sliding_pct` columns to the run's summary (rewritten atomically).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from qdm_engine.analysis.results import load_config, load_summary
from qdm_engine.atomic import replace_file
from qdm_engine.engine.compression import RTN, FPWeights, MagnitudePrune, parse_method
from qdm_engine.engine.models import parse_dtype
from qdm_engine.engine.perplexity import perplexity, sliding_window_nll
from qdm_engine.engine import corpus
from qdm_engine.errors import QdmError


def _condition(desc: dict):
    """The condition a run's config describes; None for the FP-vs-FP null (it has the FP perplexity)."""
    if desc.get("spec"):
        return parse_method(desc["spec"])
    if desc["method"] == "rtn":  # runs written before specs were recorded
        return RTN(int(desc["bits"]))
    if desc["method"] in ("prune", "prune-matched"):
        return MagnitudePrune(float(desc["sparsity"]))
    if desc["method"] == "fp":
        return None
    raise QdmError(f"condition {desc.get('name')} of this run records no spec; rerun the sweep with this version")


def _stream_ids(tok, source: str, field: str, n: int) -> torch.Tensor:
    """The first `n` token ids of the text, tokenized as the sweep streams it (engine.corpus)."""
    parts, have = [], 0
    for chunk in corpus.token_stream(tok, source, field):
        parts.append(torch.from_numpy(chunk))
        have += chunk.size
        if have >= n:
            break
    return torch.cat(parts)[:n] if parts else torch.zeros(0, dtype=torch.long)


def _estimate(lm, ids, span: int, bos_id, device, n_forwards: int) -> str:
    """'3m 10s (600 window forwards at 0.32 s, timed on one)': one window's forward, timed, times the count."""
    chunk = ids[:span]
    if bos_id is not None:
        chunk = torch.cat([torch.tensor([bos_id], dtype=ids.dtype), chunk])
    with torch.inference_mode():
        t0 = time.perf_counter()
        lm(input_ids=chunk[None].to(device), use_cache=False)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
        per = time.perf_counter() - t0
    return f"{tqdm.format_interval(per * n_forwards)} ({n_forwards} window forwards at {per:.2f} s, timed on one)"


def sliding_ppl(run_dir, window: int = 2048, stride: int = 512, tokens: int | None = None,
                device: str | None = None, dtype: str | None = None, progress: bool = True,
                log=print) -> pd.DataFrame:
    """Sliding-window perplexity of FP and every condition of `run_dir`; returns and stores the new columns."""
    from qdm_engine.audit import load_lm

    run_dir = Path(run_dir)
    config, summary = load_config(run_dir), load_summary(run_dir)
    if stride < 1 or window < 2 or stride >= window:
        raise QdmError(f"need 0 < --stride < --window, got window {window}, stride {stride}")
    load = config.get("model", {}).get("load")
    if load is None:
        raise QdmError(f"run '{run_dir}' records no model loading arguments; rerun the sweep with this version")
    device = device or config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = parse_dtype(dtype or config.get("dtype"), device)
    source, field = str(config["tokens"]["text"]), config["tokens"].get("text_field") or "text"
    if source == corpus.STDIN:
        raise QdmError(f"run '{run_dir}' read its text from standard input, which cannot be read again; rerun the "
                       "sweep with --text FILE to score it with a sliding window")
    if not corpus.head(source, 1000, field):  # every input is checked before the model loads
        raise QdmError(f"the run's text '{source}' is empty or gone; restore it to score it with a sliding window")
    lm, tok, _ = load_lm(load["model"], load["gguf_file"], torch_dtype, device, load["trust_remote_code"], progress)
    bos_id = tok.bos_token_id if config["tokens"].get("bos", True) else None
    cfg = config["tokens"]
    n_audit = cfg["n_blocks"] * (cfg["block_len"] - (1 if cfg.get("bos_token_id") is not None else 0))
    ids = _stream_ids(tok, source, field, tokens or n_audit)
    span = window - (1 if bos_id is not None else 0)
    n_windows = 1 + max(0, -(-(ids.numel() - span) // stride))
    conds = {c["name"]: _condition(c) for c in config["conditions"]}
    skipped = [n for n, c in conds.items() if getattr(c, "calibration", False)]
    if skipped:  # their calibration tokens are not stored with the run: leave them out, never guess
        log(f"not rescored (calibrated methods, rerun the sweep to compare them): {', '.join(skipped)}")
        conds = {n: c for n, c in conds.items() if n not in skipped}
    log(f"sliding-window perplexity: {ids.numel()} tokens, window {window}, stride {stride}, "
        f"{n_windows} windows x {1 + sum(c is not None for c in conds.values())} models")
    n_models = 1 + sum(c is not None for c in conds.values())
    log(f"this will take about {_estimate(lm, ids, span, bos_id, device, n_windows * n_models)}")
    bar = tqdm(total=n_windows * n_models, unit="window", disable=not progress)  # its ETA covers every model
    ppl = {}
    with torch.inference_mode():
        bar.set_description("fp")
        ppl["fp"] = perplexity(*sliding_window_nll(lm, ids, window, stride, bos_id, device, bar))
        saved = FPWeights(lm) if any(conds.values()) else None
        for name, cond in conds.items():
            if cond is None:
                ppl[name] = ppl["fp"]
                continue
            bar.set_description(name)
            cond.apply(lm)
            try:
                ppl[name] = perplexity(*sliding_window_nll(lm, ids, window, stride, bos_id, device, bar))
            finally:
                saved.restore()
    bar.close()
    base = summary["condition"].str.split("/").str[-1]  # several SAEs: '<tag>/int6' rows share int6's ppl
    summary["ppl_sliding"] = base.map(ppl)  # a condition left out stays empty (NaN), never the FP value
    summary["dppl_sliding_pct"] = 100.0 * (summary["ppl_sliding"] / ppl["fp"] - 1.0)
    config["sliding_ppl"] = {"window": window, "stride": stride, "tokens": int(ids.numel()), "windows": n_windows,
                             "bos": bos_id is not None}
    replace_file(run_dir / "summary.csv", summary.to_csv(index=False))
    records = summary.astype(object).where(summary.notna(), None).to_dict(orient="records")
    replace_file(run_dir / "summary.json", json.dumps(records, indent=2) + "\n")
    replace_file(run_dir / "config.json", json.dumps(config, indent=2, default=str) + "\n")
    return summary
