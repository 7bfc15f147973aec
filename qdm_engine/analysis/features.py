"""`qdm-engine features`: which features a condition damaged, how, and where they fire.

Per feature of one condition, from the run folder alone (no model is loaded):
  * r with its 95% block-bootstrap interval (r_lo, r_hi), the FP and compressed firing rates;
  * the firing-rate ratio c_rate / fp_rate (over all scored positions);
  * the magnitude ratio: at the feature's top-k FP positions (topk.parquet, where the FP feature fires
    hardest), the summed compressed activation over the summed FP activation;
  * a failure type, decided in this order (thresholds in `FailureThresholds`, CLI flags in brackets):
      dies         the firing-rate ratio is below `dies_below` (0.2) [--dies-below]: it mostly stops firing
      new firing   the firing-rate ratio is above `new_above` (2.0) [--new-above]: it fires in many new places
      rescaled     r > the run's survival threshold but the magnitude ratio is outside
                   [1 / `rescale`, `rescale`] (1.3) [--rescale]: same places, another size (r cannot see it)
      survived     r > the survival threshold and the magnitude is kept
      misfires     otherwise: it keeps firing about as often, but r says in the wrong places or amounts
    Inactive features (FP rate at or below the run's active threshold) get no type.
  * its top FP contexts from the audit text (tokens.parquet): the tokens around each top-k position with
    the FP and the compressed activation side by side and the firing token marked;
  * a Neuronpedia link when the SAE is a SAELens release with a Neuronpedia id.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qdm_engine.analysis.results import load_config, load_features
from qdm_engine.errors import QdmError

FAILURE_TYPES = ("survived", "rescaled", "misfires", "dies", "new firing")


@dataclass(frozen=True)
class FailureThresholds:
    dies_below: float = 0.2  # compressed / FP firing rate below this: dies
    new_above: float = 2.0  # above this: new firing
    rescale: float = 1.3  # magnitude ratio outside [1 / rescale, rescale] with r above survival: rescaled

    def __post_init__(self):
        if not 0 <= self.dies_below < 1:
            raise QdmError(f"--dies-below must be in [0, 1), got {self.dies_below}")
        if not self.new_above > 1:
            raise QdmError(f"--new-above must be above 1, got {self.new_above}")
        if not self.rescale > 1:
            raise QdmError(f"--rescale must be above 1, got {self.rescale}")

    def to_dict(self) -> dict:
        return asdict(self)


def magnitude_ratio(topk: pd.DataFrame, condition: str, n_features: int) -> np.ndarray:
    """Per feature: sum of the compressed activations over sum of the FP ones at its top-k FP positions
    (NaN for a feature without entries)."""
    out = np.full(n_features, np.nan)
    if topk is None or topk.empty or condition not in topk:
        return out
    g = topk.groupby("feature")[["fp_act", condition]].sum()
    out[g.index.to_numpy()] = (g[condition] / g["fp_act"]).to_numpy()
    return out


def failure_types(features: pd.DataFrame, mag: np.ndarray, survived: float,
                  ft: FailureThresholds = FailureThresholds()) -> np.ndarray:
    """Failure type per feature (one of FAILURE_TYPES; None for inactive features)."""
    r = features["r"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = features["c_rate"].to_numpy(dtype=float) / features["fp_rate"].to_numpy(dtype=float)
    mag = np.asarray(mag, dtype=float)
    kept = r > survived  # NaN compares False
    off = (mag < 1.0 / ft.rescale) | (mag > ft.rescale)
    out = np.where(kept & off, "rescaled", np.where(kept, "survived", "misfires")).astype(object)
    out[rate > ft.new_above] = "new firing"
    out[rate < ft.dies_below] = "dies"
    out[~features["active"].to_numpy(dtype=bool)] = None
    return out


def _split(condition: str) -> tuple[str | None, str]:
    return tuple(condition.split("/", 1)) if "/" in condition else (None, condition)


def _load_optional(run_dir: Path, name: str) -> pd.DataFrame | None:
    path = Path(run_dir) / f"{name}.parquet"
    return pd.read_parquet(path) if path.is_file() else None


def neuronpedia_id(sae_identity: dict) -> str | None:
    """The SAE's Neuronpedia id: recorded in its identity, or looked up in SAELens's release directory."""
    if sae_identity.get("neuronpedia_id"):
        return str(sae_identity["neuronpedia_id"])
    release, sae_id = sae_identity.get("release"), sae_identity.get("sae_id")
    if not release or not sae_id:
        return None
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        info = get_pretrained_saes_directory().get(release)
    except Exception:  # SAELens absent or its directory unreadable: no link, nothing else lost
        return None
    return (info.neuronpedia_id or {}).get(sae_id) if info is not None else None


def feature_report(run_dir, condition: str, worst: int | None = 20, features: list[int] | None = None,
                   ft: FailureThresholds = FailureThresholds()) -> pd.DataFrame:
    """The per-feature table of `condition` with rate ratio, magnitude ratio and failure type, restricted to
    the `worst` active features (lowest r; undefined first) or to the listed `features`."""
    config = load_config(run_dir)
    table = load_features(run_dir, condition).copy()
    survived = float(config.get("thresholds", {}).get("survived", 0.9))
    tag, plain = _split(condition)
    topk = _load_optional(Path(run_dir), "topk")
    if topk is not None and tag is not None:
        topk = topk[topk["sae"] == tag]
    table["mag_ratio"] = magnitude_ratio(topk, plain, len(table))
    with np.errstate(divide="ignore", invalid="ignore"):
        table["rate_ratio"] = table["c_rate"] / table["fp_rate"]
    table["type"] = failure_types(table, table["mag_ratio"].to_numpy(), survived, ft)
    if features:
        bad = [f for f in features if not 0 <= f < len(table)]
        if bad:
            raise QdmError(f"--feature {bad[0]} is not a feature of this SAE (0..{len(table) - 1})")
        return table.set_index("feature").loc[list(features)].reset_index()
    act = table[table["active"]]
    order = act.assign(_nan=act["r"].notna()).sort_values(["_nan", "r"], kind="stable")
    return order.drop(columns="_nan").head(worst if worst is not None else len(order)).reset_index(drop=True)


def contexts(run_dir, condition: str, feature_ids, n: int = 5, before: int = 10, after: int = 4) -> dict[int, list[dict]]:
    """Per feature, its top `n` FP positions: block, pos, fp_act, the condition's activation there, and the
    tokens around (`before` / `after` of them, within the block, BOS dropped) with the firing one marked."""
    run_dir = Path(run_dir)
    topk, tokens = _load_optional(run_dir, "topk"), _load_optional(run_dir, "tokens")
    if topk is None or tokens is None:
        return {}
    tag, plain = _split(condition)
    if tag is not None:
        topk = topk[topk["sae"] == tag]
    bos = load_config(run_dir).get("tokens", {}).get("bos", False)
    block_len = int(tokens["pos"].max()) + 1
    text = tokens["text"].to_numpy()
    out = {}
    for f in feature_ids:
        rows = topk[(topk["feature"] == int(f)) & (topk["rank"] < n)].sort_values("rank")
        items = []
        for e in rows.to_dict(orient="records"):
            b, p = int(e["block"]), int(e["pos"])
            lo, hi = max(int(bos), p - before), min(block_len, p + after + 1)
            toks = [{"text": text[b * block_len + q], "fires": q == p} for q in range(lo, hi)]
            items.append({"block": b, "pos": p, "fp_act": float(e["fp_act"]),
                          "c_act": float(e[plain]) if plain in e else float("nan"), "tokens": toks})
        out[int(f)] = items
    return out


def _show(s: str) -> str:
    return s.replace("\n", "\u21b5").replace("\t", " ")


def context_line(ctx: dict) -> str:
    """Tokens around a position as one line, the firing token in [[ ]]."""
    return "".join(f"[[{_show(t['text'])}]]" if t["fires"] else _show(t["text"]) for t in ctx["tokens"])


def features_payload(run_dir, condition: str, worst: int | None = 20, features: list[int] | None = None,
                     n_contexts: int = 5, ft: FailureThresholds = FailureThresholds()) -> dict:
    """Everything `qdm-engine features` shows, as plain data (what --json prints)."""
    config = load_config(run_dir)
    table = feature_report(run_dir, condition, worst, features, ft)
    tag, _ = _split(condition)
    sae = next((s for s in config.get("saes", []) if s.get("tag") == tag), None) if tag else config.get("sae", {})
    npid = neuronpedia_id(sae or {})
    ctx = contexts(run_dir, condition, table["feature"].tolist(), n_contexts)

    def num(v):
        return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else float(v)

    rows = []
    for rec in table.to_dict(orient="records"):
        f = int(rec["feature"])
        rows.append({
            "feature": f, "r": num(rec["r"]), "r_lo": num(rec.get("r_lo")), "r_hi": num(rec.get("r_hi")),
            "fp_rate": num(rec["fp_rate"]), "c_rate": num(rec["c_rate"]), "rate_ratio": num(rec["rate_ratio"]),
            "mag_ratio": num(rec["mag_ratio"]), "type": rec["type"], "cls": rec["cls"],
            "neuronpedia": f"https://neuronpedia.org/{npid}/{f}" if npid else None,
            "contexts": [{**c, "context": context_line(c)} for c in ctx.get(f, [])],
        })
    return {"run": str(run_dir), "condition": condition, "thresholds": ft.to_dict(),
            "survived_threshold": config.get("thresholds", {}).get("survived"), "features": rows}


def type_counts(run_dir, condition: str, ft: FailureThresholds = FailureThresholds()) -> dict[str, int]:
    """Active features of `condition` per failure type."""
    table = feature_report(run_dir, condition, worst=None, ft=ft)
    counts = table["type"].value_counts()
    return {t: int(counts.get(t, 0)) for t in FAILURE_TYPES}


def format_features(payload: dict) -> str:
    """The printed form: one header line per feature, then its contexts."""
    def f(v, spec):
        return "nan" if v is None else format(v, spec)

    cond = payload["condition"].split("/")[-1]
    lines = [f"{payload['condition']}: {len(payload['features'])} features (r [95% interval], firing rates FP -> "
             f"compressed, magnitude = compressed / FP activation at the top FP positions)"]
    for row in payload["features"]:
        lines.append("")
        r = "r undefined" if row["r"] is None else \
            f"r {f(row['r'], '.3f')} [{f(row['r_lo'], '.3f')}, {f(row['r_hi'], '.3f')}]"
        lines.append(f"feature {row['feature']}  {row['type'] or 'inactive'}  {r}  firing {100 * (row['fp_rate'] or 0):.2f}% -> "
                     f"{100 * (row['c_rate'] or 0):.2f}% (x{f(row['rate_ratio'], '.2f')})  magnitude x{f(row['mag_ratio'], '.2f')}")
        if row["neuronpedia"]:
            lines.append(f"  {row['neuronpedia']}")
        for c in row["contexts"]:
            lines.append(f"  fp {c['fp_act']:7.3f}  {cond} {c['c_act']:7.3f}  | {c['context']}")
    return "\n".join(lines)


def to_json(payload: dict) -> str:
    return json.dumps(payload, indent=2)
