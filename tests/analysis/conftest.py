"""Fixtures for the analysis tests: the paper's published results in the engine's per-feature schema.

The paper-results folder sits beside the repository (../shared/data/paper-results). Its per-feature CSV
holds the Pythia-70M RTN INT6 and matched-pruning correlations and FP statistics of the 5,688 active
features; `paper_features` maps one side of it onto the columns `qdm_engine` writes.

Those are the paper authors' published tables, not ours to redistribute, so they are not in the
repository: the tests that check qdm-engine against them skip, saying so, where the folder is absent.
Every other analysis test runs on synthetic tables and needs nothing outside the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qdm_engine.analysis.thresholds import classify_active

PAPER_RESULTS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "paper-results"
PAPER_PER_FEATURE = PAPER_RESULTS / "per_feature" / "phase5b_pythia_rtn_int6_vs_pruning_per_feature_overlap.csv"


def paper_features(table: pd.DataFrame, side: str) -> pd.DataFrame:
    """One side ('rtn' or 'prune') of the paper's per-feature CSV in the engine's schema.

    The CSV lists active features only and has no compressed firing rate, so c_rate is NaN.
    """
    out = pd.DataFrame(
        {
            "feature": table["feature_id"].astype(np.int64),
            "r": table[f"corr_{side}"].astype(np.float64),
            "fp_rate": table[f"firing_rate_{side}"].astype(np.float64),
            "fp_mean": table[f"mean_activation_{side}"].astype(np.float64),
            "fp_peak": table[f"max_activation_{side}"].astype(np.float64),
            "c_rate": np.nan,
            "active": table[f"active_{side}"].astype(bool),
        }
    )
    out["cls"] = classify_active(out["r"], out["active"])
    return out


@pytest.fixture(scope="session")
def paper_dir() -> Path:
    if not PAPER_PER_FEATURE.is_file():
        pytest.skip(f"checks against the paper's published per-feature tables, which are not redistributed with "
                    f"qdm-engine; they run when {PAPER_RESULTS} exists")
    return PAPER_RESULTS


@pytest.fixture(scope="session")
def paper_table(paper_dir) -> pd.DataFrame:
    return pd.read_csv(PAPER_PER_FEATURE)


@pytest.fixture(scope="session")
def paper_rtn(paper_table) -> pd.DataFrame:
    return paper_features(paper_table, "rtn")


@pytest.fixture(scope="session")
def paper_prune(paper_table) -> pd.DataFrame:
    return paper_features(paper_table, "prune")


@pytest.fixture(scope="session")
def paper_predictor_summary(paper_dir) -> dict:
    return json.loads((paper_dir / "tables" / "phase5_summary.json").read_text())["pythia"]


def synthetic_features(
    rng: np.random.Generator,
    r: np.ndarray,
    active: np.ndarray | None = None,
    fp_rate: np.ndarray | None = None,
) -> pd.DataFrame:
    """A per-feature table in the engine's schema with the given correlations and plausible FP statistics."""
    n = len(r)
    r = np.asarray(r, dtype=np.float64)
    if active is None:
        active = np.ones(n, dtype=bool)
    if fp_rate is None:
        fp_rate = np.where(active, 10 ** rng.uniform(-2.9, -0.5, n), rng.uniform(0.0, 1e-3, n))
    fp_mean = fp_rate * rng.lognormal(0.0, 0.7, n)
    fp_peak = fp_mean / fp_rate * rng.lognormal(1.5, 0.5, n)
    features = pd.DataFrame(
        {
            "feature": rng.permutation(n * 3)[:n].astype(np.int64),
            "r": r,
            "fp_rate": fp_rate,
            "fp_mean": fp_mean,
            "fp_peak": fp_peak,
            "c_rate": fp_rate * rng.uniform(0.8, 1.2, n),
            "active": np.asarray(active, dtype=bool),
        }
    )
    features["cls"] = classify_active(features["r"], features["active"])
    return features


@pytest.fixture
def make_features():
    """The `synthetic_features` factory (fixtures cannot be imported from a conftest by name)."""
    return synthetic_features
