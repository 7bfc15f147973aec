"""The run folder: how a sweep is stored and read back, so analyses never rerun a model.

Layout: `config.json` (every setting, versions, model/SAE/token identity), `summary.csv` and
`summary.json` (one row per condition), `features/<condition>.parquet` (one row per SAE feature:
feature, r, r_lo, r_hi, fp_rate, fp_mean, fp_peak, c_rate, active, cls), `topk.parquet` (per feature its
top-k FP positions and each condition's activation there) and `tokens.parquet` (the audit blocks' tokens).
A folder is written under a temporary name and renamed into place only when complete, so an interrupted
or failed run never leaves a folder that looks finished, and an existing folder is never overwritten.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pandas as pd

from qdm_engine.atomic import temp_dir_beside
from qdm_engine.errors import QdmError

FEATURE_COLUMNS = ("feature", "r", "r_lo", "r_hi", "fp_rate", "fp_mean", "fp_peak", "c_rate", "active", "cls")


def check_out_dir(out: str | Path) -> Path:
    """Refuse a destination that already holds files (nothing written before is ever lost)."""
    out = Path(out).expanduser()
    if (out / ".partial" / "sweep.json").is_file():
        raise QdmError(f"output folder '{out}' holds an unfinished sweep; finish it with qdm-engine sweep --resume "
                       f"{out}, or choose a new --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QdmError(f"output folder '{out}' already exists and is not empty; choose a new --out")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise QdmError(f"cannot write to '{parent}'; choose an --out in a writable folder")
    return out


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_run(out: str | Path, config: dict, summary: pd.DataFrame, features: dict[str, pd.DataFrame],
              extra: dict[str, pd.DataFrame] | None = None, partial_ok: bool = False) -> Path:
    """Write a complete run folder atomically (temp folder beside it, then rename).

    `extra` tables land beside the summary as `<name>.parquet` (topk, tokens). With `partial_ok` the folder
    may hold the sweep's own checkpoints (`.partial/`, engine.state) and nothing else: they are moved into
    the new folder just before the rename and deleted after it."""
    out = Path(out).expanduser()
    partial = out / ".partial"
    if not (partial_ok and partial.is_dir() and [p.name for p in out.iterdir()] == [".partial"]):
        out = check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)  # mode from the umask, as any folder the user makes
    try:
        (tmp / "config.json").write_text(json.dumps(_json_safe(config), indent=2, default=str) + "\n")
        summary.to_csv(tmp / "summary.csv", index=False)
        records = _json_safe(summary.astype(object).where(summary.notna(), None).to_dict(orient="records"))
        (tmp / "summary.json").write_text(json.dumps(records, indent=2) + "\n")
        (tmp / "features").mkdir()
        for name, df in features.items():  # 'tag/int6' (several SAEs) lands in features/tag/int6.parquet
            path = tmp / "features" / f"{name}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            df.to_parquet(path, index=False)
        for name, df in (extra or {}).items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        if partial_ok and partial.is_dir():  # the checkpoints go with the folder they belong to
            os.replace(partial, tmp / ".partial")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        if (tmp / ".partial").is_dir() and not partial.exists():
            os.replace(tmp / ".partial", partial)  # the folder is still resumable
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out / ".partial", ignore_errors=True)
    return out


def _run_dir(run_dir: str | Path) -> Path:
    p = Path(run_dir).expanduser()
    if not (p / "config.json").is_file() or not (p / "features").is_dir():
        raise QdmError(f"'{run_dir}' is not a qdm-engine run folder (no config.json / features/); pass the --out of a sweep")
    return p


def load_config(run_dir: str | Path) -> dict:
    return json.loads((_run_dir(run_dir) / "config.json").read_text())


# Whole-number summary columns that have gaps (the FP row has no bits): without a nullable integer dtype
# a CSV reader makes them float, and a rewritten summary would turn bits 8 into 8.0.
COUNT_COLUMNS = ("bits", "n_active", "undefined_n", "n_tokens")


def load_summary(run_dir: str | Path) -> pd.DataFrame:
    """summary.csv as the sweep wrote it: count columns as nullable integers (Int64)."""
    return pd.read_csv(_run_dir(run_dir) / "summary.csv", dtype={c: "Int64" for c in COUNT_COLUMNS})


def list_conditions(run_dir: str | Path) -> list[str]:
    """Condition names of a run; with several SAEs they read '<sae-tag>/<condition>'."""
    root = _run_dir(run_dir) / "features"
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.parquet"))


def load_features(run_dir: str | Path, condition: str) -> pd.DataFrame:
    """One condition's per-feature table; a QdmError listing the conditions if it is not there."""
    path = _run_dir(run_dir) / "features" / f"{condition}.parquet"
    if not path.is_file():
        raise QdmError(f"condition '{condition}' is not in run '{run_dir}'; it has: {', '.join(list_conditions(run_dir))}")
    return pd.read_parquet(path)
