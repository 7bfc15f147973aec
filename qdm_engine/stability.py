"""`qdm-engine stability`: how much do the survival figures move with the token budget and token subset?

One sweep of FP and one condition over the largest budget keeps each batch's per-feature moments;
budgets are prefixes of those batches and subsets are random draws of them, each merged and classified
as a separate audit would be (docs/METHOD.md section 9). No model is rerun per budget or subset.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from qdm_engine.analysis.results import check_out_dir, write_run
from qdm_engine.analysis.taxonomy import Thresholds, summarize
from qdm_engine.errors import QdmError
from qdm_engine.kernels.moments import FeatureMoments


def stability(model=None, sae=None, condition: str = "int6", budgets=(4096, 8192, 16384), subsets: int = 10,
              subset_frac: float = 0.5, seed: int = 0, thresholds: Thresholds = Thresholds(), out=None,
              log=print, **sweep_kwargs) -> pd.DataFrame:
    """Survival of `condition` (e.g. 'int6') at each token budget and on `subsets` random halves of the tokens."""
    from qdm_engine.audit import feature_table, sweep

    if not str(condition).startswith("int") or not str(condition)[3:].isdigit():
        raise QdmError(f"--condition must be an RTN condition like int6, got '{condition}'")
    budgets = sorted(int(b) for b in budgets)
    if not budgets or budgets[0] < 1:
        raise QdmError("--budgets needs positive token counts, e.g. 50000,100000,200000")
    if not 0 < subset_frac < 1 or subsets < 0:
        raise QdmError(f"need 0 < --subset-frac < 1 and --subsets >= 0, got {subset_frac} and {subsets}")
    if out is not None:
        out = check_out_dir(out)
    res = sweep(model=model, sae=sae, bits=[int(condition[3:])], tokens=budgets[-1], thresholds=thresholds,
                keep_batches=True, log=log, **sweep_kwargs)
    run = res.runs[1]
    parts = run.batch_moments[0]
    tok_cfg, bs = res.config["tokens"], res.config["batch_size"]
    sizes = [min(bs, tok_cfg["n_blocks"] - lo) for lo in range(0, tok_cfg["n_blocks"], bs)]
    positions = np.cumsum([0] + sizes) * tok_cfg["block_len"]  # positions before each batch, and in all
    rows = []
    for budget in budgets:
        k = int(np.searchsorted(positions, budget, side="right") - 1)  # whole batches within the budget
        if k < 1:
            raise QdmError(f"budget {budget} is smaller than one batch ({positions[1]} positions); lower --batch-size")
        m = FeatureMoments.merge_all(parts[:k])
        rows.append({"kind": "budget", "index": budget, "positions": int(positions[k]), "scored": int(m.n),
                     **summarize(feature_table(m, thresholds))})
    rng = np.random.default_rng(seed)
    take = max(1, round(subset_frac * len(parts)))
    for i in range(subsets):
        pick = np.sort(rng.choice(len(parts), size=take, replace=False))
        m = FeatureMoments.merge_all([parts[j] for j in pick])
        rows.append({"kind": "subset", "index": i, "positions": int(sum(positions[j + 1] - positions[j] for j in pick)),
                     "scored": int(m.n), **summarize(feature_table(m, thresholds))})
    table = pd.DataFrame(rows)
    table.insert(0, "condition", condition)
    if out is not None:
        config = {**res.config, "stability": {"condition": condition, "budgets": budgets, "subsets": subsets,
                                              "subset_frac": subset_frac, "seed": seed, "batches": len(parts)}}
        write_run(out, config, table, {})
    return table


def format_stability(table: pd.DataFrame) -> str:
    lines = [table.to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    for kind in ("budget", "subset"):
        part = table[table["kind"] == kind]
        if len(part) > 1:
            spread = part["survived_pct"].max() - part["survived_pct"].min()
            lines.append(f"{kind}s: survived {part['survived_pct'].min():.2f}-{part['survived_pct'].max():.2f}% "
                         f"(spread {spread:.2f} pp, std {part['survived_pct'].std(ddof=1):.2f} pp)")
    return "\n".join(lines)
