"""`sweep()`: the audit end to end, the public Python API that the CLI calls.

Loads the model, SAE and tokens, runs FP plus each compression condition on identical tokens
(engine.runner), turns the per-feature moments into tables and the taxonomy (analysis), and writes
the run folder (analysis.results).
"""

from __future__ import annotations

import hashlib
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qdm_engine import __version__
from qdm_engine.analysis.results import check_out_dir, write_run
from qdm_engine.analysis.taxonomy import Thresholds, classify, summarize
from qdm_engine.engine.compression import FP, RTN, MagnitudePrune, family_of, parse_bits
from qdm_engine.engine.models import decoder_layers, load_model, parse_dtype, parse_hook
from qdm_engine.engine.perplexity import perplexity
from qdm_engine.engine.runner import ConditionRun, run_conditions
from qdm_engine.engine.sae import load_sae
from qdm_engine.engine.tokens import make_blocks, read_text
from qdm_engine.errors import QdmError
from qdm_engine.kernels.moments import FeatureMoments

SUMMARY_COLUMNS = [
    "condition", "method", "bits", "sparsity", "ppl", "dppl_pct", "mean_r", "median_r",
    "survived_pct", "degraded_pct", "damaged_pct", "n_active", "undefined_n", "n_tokens", "seconds",
]


@dataclass
class SweepResult:
    summary: pd.DataFrame  # one row per condition, FP first
    features: dict[str, pd.DataFrame]  # condition name -> per-feature table
    config: dict = field(default_factory=dict)
    out: Path | None = None


def feature_table(m: FeatureMoments, th: Thresholds) -> pd.DataFrame:
    """Per-feature table of one condition from its moments (FP statistics from the x side)."""
    r = m.pearson().cpu().numpy()
    fp_rate = m.fire_rate_x().cpu().numpy()
    df = pd.DataFrame({
        "feature": np.arange(m.n_features, dtype=np.int64),
        "r": r,
        "fp_rate": fp_rate,
        "fp_mean": m.mean_x.cpu().numpy(),
        "fp_peak": m.max_x.cpu().numpy(),
        "c_rate": m.fire_rate_y().cpu().numpy(),
    })
    df["active"] = fp_rate > th.active
    df["cls"] = classify(r, fp_rate, th)
    return df


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("qdm-engine", "torch", "transformers", "triton", "sae-lens", "numpy", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["qdm-engine"] = out["qdm-engine"] or __version__
    return out


def _conditions(bits, prune, null: bool) -> list:
    conds: list = [RTN(b) for b in (parse_bits(bits) if isinstance(bits, str) else list(bits or []))]
    conds += [MagnitudePrune(float(s)) for s in (prune or [])]
    if null:
        conds.insert(0, FP())
    if not conds:
        raise QdmError("nothing to audit: give --bits and/or --prune")
    names = [c.name for c in conds]
    if len(set(names)) != len(names):
        raise QdmError(f"a condition is listed twice: {', '.join(names)}")
    return conds


def _default_components():
    try:
        from qdm_engine.engine import default
    except ImportError as exc:
        raise QdmError("the embedded default model is not available in this install; pass --model and --sae") from exc
    return default


def sweep(
    model: str | None = None,
    sae: str | None = None,
    bits="8..4",
    prune=(),
    *,
    gguf_file: str | None = None,
    hook: str | None = None,
    text: str | None = None,
    tokens: int | None = 16384,
    block_len: int = 128,
    batch_size: int = 8,
    bos: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    thresholds: Thresholds = Thresholds(),
    null: bool = False,
    out: str | Path | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    log=print,
) -> SweepResult:
    """Audit FP vs each condition (RTN `bits`, pruning `prune`) on identical tokens through one SAE.

    Returns the summary and per-feature tables; with `out`, also writes the run folder there.
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    conditions = _conditions(bits, prune, null)
    if batch_size < 1:
        raise QdmError(f"--batch-size must be at least 1, got {batch_size}")
    if out is not None:
        out = check_out_dir(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QdmError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    torch_dtype = parse_dtype(dtype, device)

    uses_default = (model is None and gguf_file is None) or sae is None or text is None
    default = _default_components() if uses_default else None
    if text is None:
        text = str(default.DEFAULT_TEXT)
    text_str = read_text(text)  # fail fast on a bad text, before any model loads

    if model is None and gguf_file is None:
        lm, tok, model_id = default.load_default_model(dtype=torch_dtype, progress=progress)
        lm = lm.to(device)
    else:
        lm, tok, model_id = load_model(model, gguf_file, torch_dtype, device, trust_remote_code, progress)
    sae_w = load_sae(sae if sae is not None else default.DEFAULT_SAE_DIR, device=device)

    hook = hook or sae_w.hook_name
    n_layers = len(decoder_layers(lm))
    parse_hook(hook, n_layers)
    if sae_w.d_in != model_id["d_model"]:
        raise QdmError(
            f"SAE d_in {sae_w.d_in} does not match the model's d_model {model_id['d_model']}; "
            "pass an SAE trained on this model"
        )
    family_of(lm)  # compression needs a known family: fail before any forward pass
    blocks = make_blocks(tok, text_str, block_len, tokens, bos)
    log(
        f"auditing {model_id['source']} at {hook} with SAE {sae_w.identity.get('source')} "
        f"({sae_w.architecture}, {sae_w.d_sae} features) on {blocks.n_blocks * blocks.block_len} tokens "
        f"({blocks.scored_positions} scored), {len(conditions)} conditions, device {device}, {model_id['dtype']}"
    )

    runs = run_conditions(lm, sae_w, blocks, conditions, hook, batch_size, device, progress)
    summary, features = _tables(runs, thresholds, blocks.scored_positions)
    config = {
        "qdm_engine_version": __version__,
        "started": started,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "command": sys.argv,
        "versions": _versions(),
        "model": model_id,
        "sae": sae_w.identity,
        "hook": hook,
        "tokens": {
            "text": str(text),
            "text_sha256": hashlib.sha256(text_str.encode()).hexdigest(),
            "text_tokens": blocks.text_tokens,
            "budget": tokens,
            "block_len": blocks.block_len,
            "n_blocks": blocks.n_blocks,
            "positions": blocks.n_blocks * blocks.block_len,
            "scored_positions": blocks.scored_positions,
            "bos": bos,
            "bos_token_id": blocks.bos_id,
            "ppl_targets": blocks.ppl_targets,
        },
        "conditions": [dict(name=c.name, **c.describe()) for c in conditions],
        "thresholds": thresholds.to_dict(),
        "batch_size": batch_size,
        "device": device,
        "dtype": model_id["dtype"],
    }
    written = write_run(out, config, summary, features) if out is not None else None
    return SweepResult(summary, features, config, written)


def _tables(runs: list[ConditionRun], th: Thresholds, scored: int) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    fp_run, cond_runs = runs[0], runs[1:]
    fp_ppl = perplexity(fp_run.nll, fp_run.n_targets)
    features = {r.name: feature_table(r.moments, th) for r in cond_runs}
    rows = []
    fp_active = int(next(iter(features.values()))["active"].sum())  # FP statistics are the same in every table
    rows.append({"condition": "fp", "method": "fp", "ppl": fp_ppl, "dppl_pct": 0.0, "n_active": fp_active,
                 "n_tokens": scored, "seconds": fp_run.seconds})
    for r in cond_runs:
        ppl = perplexity(r.nll, r.n_targets)
        desc = r.condition.describe()
        rows.append({
            "condition": r.name, "method": desc["method"], "bits": desc.get("bits"),
            "sparsity": desc.get("sparsity"), "ppl": ppl, "dppl_pct": 100.0 * (ppl / fp_ppl - 1.0),
            **summarize(features[r.name]), "n_tokens": int(r.moments.n), "seconds": r.seconds,
        })
    summary = pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS)
    summary["bits"] = summary["bits"].astype("Int64")
    return summary, features


def format_summary(summary: pd.DataFrame) -> str:
    """The printed table: Table 1's columns, one line per condition."""
    head = f"{'condition':<14}{'bits':>5}{'PPL':>10}{'dPPL %':>9}{'mean r':>8}{'med r':>8}" \
           f"{'surv %':>8}{'degr %':>8}{'dam %':>8}{'active':>8}{'undef':>6}{'tokens':>9}"
    lines = [head, "-" * len(head)]

    def f(v, spec: str) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
            return ""
        return format(int(v) if spec == "d" else float(v), spec)

    for row in summary.to_dict(orient="records"):
        lines.append(
            f"{row['condition']:<14}{f(row['bits'], 'd'):>5}{f(row['ppl'], '.3f'):>10}{f(row['dppl_pct'], '+.2f'):>9}"
            f"{f(row['mean_r'], '.3f'):>8}{f(row['median_r'], '.3f'):>8}{f(row['survived_pct'], '.2f'):>8}"
            f"{f(row['degraded_pct'], '.2f'):>8}{f(row['damaged_pct'], '.2f'):>8}{f(row['n_active'], 'd'):>8}"
            f"{f(row['undefined_n'], 'd'):>6}{f(row['n_tokens'], 'd'):>9}"
        )
    return "\n".join(lines)
