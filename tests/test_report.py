"""`qdm-engine report`: figures and a self-contained HTML page from synthetic run folders of known r.

The runs are written with the run folder's own writer, so the report reads exactly what a sweep stores.
One test opens the page in headless Chromium (skipped only when no `chromium` is installed).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qdm_engine.analysis.predictor import fit_predictor
from qdm_engine.analysis.results import load_features, write_run
from qdm_engine.analysis.taxonomy import summarize
from qdm_engine.analysis.thresholds import classify_active
from qdm_engine.cli import main
from qdm_engine.errors import QdmError
from qdm_engine.report import FIGURES, _oof_roc, make_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')

# condition -> (method, bits, sparsity, damage scale, ΔPPL %): larger scale, lower r
FULL = {
    "int8": ("rtn", 8, None, 0.04, 0.9),
    "int7": ("rtn", 7, None, 0.10, 2.4),
    "int6": ("rtn", 6, None, 0.30, 14.1),
    "int5": ("rtn", 5, None, 0.60, 66.0),
    "int4": ("rtn", 4, None, 1.10, 355.0),
    "prune-0.175": ("prune", None, 0.175, 0.28, 13.2),
}


def synthetic_run(out: Path, conditions: dict, *, seed: int = 0, n: int = 700, n_active: int = 560,
                  tags: tuple[str, ...] = (None,), ppl: bool = True, undefined: int = 3) -> Path:
    """A run folder whose per-feature r falls with a feature's low FP peak, scaled per condition.

    Fragile features are those with a small FP peak, so the predictor has something to find; the
    harshest condition also gets `undefined` features with r undefined (NaN).
    """
    rng = np.random.default_rng(seed)
    active = np.zeros(n, dtype=bool)
    active[rng.permutation(n)[:n_active]] = True
    fp_rate = np.where(active, 10 ** rng.uniform(-2.9, -0.5, n), rng.uniform(0.0, 1e-3, n))
    fp_mean = fp_rate * rng.lognormal(0.0, 0.6, n)
    fp_peak = fp_mean / fp_rate * rng.lognormal(1.5, 0.6, n)
    z = (np.log(fp_peak) - np.log(fp_peak).mean()) / np.log(fp_peak).std()
    fragility = 1.0 / (1.0 + np.exp(2.0 * z + rng.normal(0.0, 0.7, n)))
    harshest = max(conditions, key=lambda c: conditions[c][3])
    summary_rows, features = [], {}
    for tag in tags:
        key = (lambda name: f"{tag}/{name}") if tag else (lambda name: name)
        summary_rows.append({"sae": tag or "sae", "condition": key("fp"), "method": "fp",
                             "ppl": 50.0 if ppl else np.nan, "dppl_pct": 0.0 if ppl else np.nan,
                             "n_active": int(active.sum()), "n_tokens": 4096,
                             "seconds": 1.0, "explained_variance": 0.88, "cossim": 0.94, "ce_loss_score": 0.95})
        for name, (method, bits, sparsity, scale, dppl) in conditions.items():
            r = np.clip(1.0 - scale * fragility * rng.uniform(0.7, 1.3, n), -1.0, 1.0)
            if name == harshest and undefined:
                r[np.flatnonzero(active)[:undefined]] = np.nan
            r[~active & (rng.random(n) < 0.5)] = np.nan  # inactive features often have no r at all
            t = pd.DataFrame({"feature": np.arange(n, dtype=np.int64), "r": r, "fp_rate": fp_rate, "fp_mean": fp_mean,
                              "fp_peak": fp_peak, "c_rate": fp_rate * rng.uniform(0.8, 1.2, n), "active": active})
            t["cls"] = classify_active(t["r"], t["active"])
            features[key(name)] = t
            summary_rows.append({"sae": tag or "sae", "condition": key(name), "method": method, "bits": bits,
                                 "sparsity": sparsity, "ppl": 50.0 * (1 + dppl / 100) if ppl else np.nan,
                                 "dppl_pct": dppl if ppl else np.nan, **summarize(t), "n_tokens": 4096, "seconds": 1.0,
                                 "explained_variance": 0.88 - 0.2 * scale, "cossim": 0.94 - 0.1 * scale,
                                 "ce_loss_score": 0.95 - 0.3 * scale})
    summary = pd.DataFrame(summary_rows)
    summary["bits"] = summary["bits"].astype("Int64")
    config = {
        "qdm_engine_version": "0.1.0", "started": "2026-11-21T12:00:00+00:00", "wall_seconds": 12.5,
        "command": ["qdm-engine", "sweep", "--model", "tiny-model"],
        "versions": {"python": "3.11.7", "qdm-engine": "0.1.0", "torch": "2.13.0+cpu", "pandas": "3.1.1"},
        "model": {"source": "tiny-model-under-test", "class": "LlamaForCausalLM", "n_params": 40672,
                  "dtype": "float32"},
        "sae": {"source": "tiny-sae-under-test", "architecture": "standard", "d_in": 32, "d_sae": n},
        "hook": "blocks.1.hook_resid_post",
        "tokens": {"text": "text.txt", "text_sha256": "0" * 64, "scored_positions": 4096, "block_len": 64,
                   "n_blocks": 65, "bos": True},
        "conditions": [{"name": name, "method": spec[0]} for name, spec in conditions.items()],
        "thresholds": {"active": 0.001, "survived": 0.9, "damaged": 0.5},
        "device": "cpu", "dtype": "float32",
    }
    if tags != (None,):
        config["saes"] = [{"tag": t, "hook": f"blocks.{i}.hook_resid_post", "source": f"sae-{t}", "d_sae": n}
                          for i, t in enumerate(tags)]
    return write_run(out, config, summary, features)


def focus_of(run: Path) -> str:
    """The condition the report's feature-level figures show by default."""
    from qdm_engine.analysis.results import load_config, load_summary
    from qdm_engine.report import _groups, pick_focus

    group = _groups(run, load_config(run), load_summary(run))[0]
    return pick_focus(group, None)[0].short


def pngs_in(html_text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in IMG_RE.findall(html_text)]


def check_png(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])
    with Image.open(io.BytesIO(data)) as im:
        im.verify()  # a truncated or corrupt stream raises here
    return width, height


def notes(html_text: str) -> list[str]:
    return re.findall(r"<b>Not drawn.</b> ([^<]*)</p>", html_text)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    run = synthetic_run(tmp_path_factory.mktemp("report") / "run", FULL)
    page = make_report(run)
    return run, page, page.read_text(encoding="utf-8")


def test_every_figure_is_written_as_a_valid_png(full_report):
    run, page, _ = full_report
    assert page == run / "report" / "report.html"
    for key in FIGURES:
        width, height = check_png((run / "report" / f"{key}.png").read_bytes())
        assert width >= 600 and height >= 300, key


def test_page_embeds_each_figure_and_nothing_external(full_report):
    run, _, text = full_report
    embedded = pngs_in(text)
    assert len(embedded) == len(FIGURES)
    assert embedded == [(run / "report" / f"{key}.png").read_bytes() for key in FIGURES]  # in page order
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    assert re.findall(r'\b(?:src|href)="(?!data:image/png;base64,)', text) == []
    assert notes(text) == []


def test_page_shows_run_identity_and_summary_values(full_report):
    run, _, text = full_report
    for fragment in ("tiny-model-under-test", "tiny-sae-under-test", "blocks.1.hook_resid_post",
                     "4,096 scored positions", "torch 2.13.0+cpu", "survived: r &gt; 0.9",
                     "What was measured", "How to read it"):
        assert fragment in text, fragment
    summary = pd.read_csv(run / "summary.csv")
    for row in summary.iloc[1:].to_dict("records"):
        cells = [f"{row['ppl']:.3f}", f"{row['dppl_pct']:+.2f}", f"{row['mean_r']:.3f}", f"{row['median_r']:.3f}",
                 f"{row['survived_pct']:.2f}", f"{row['degraded_pct']:.2f}", f"{row['damaged_pct']:.2f}"]
        line = re.search(rf"<tr><td class=\"l\">{re.escape(row['condition'])}</td>.*?</tr>", text)
        assert line, row["condition"]
        for cell in cells:
            assert f"<td>{cell}</td>" in line.group(0), (row["condition"], cell)
    assert "<td>3</td>" in re.search(r"<tr><td class=\"l\">int4</td>.*?</tr>", text).group(0)  # undefined count


def test_predictor_roc_uses_fit_predictors_folds(full_report):
    """The ROC's out-of-fold predictions come from the same folds and recipe as `qdm-engine predict`."""
    from sklearn.metrics import roc_auc_score

    run, _, text = full_report
    focus = focus_of(run)
    assert focus == "int4"  # the most compressed condition whose survival is still mixed
    features = load_features(run, focus)
    res = fit_predictor(features, recipe="ours")
    y, proba, folds = _oof_roc(features, 0.9)
    assert y.sum() == res.n_survived and not np.isnan(proba).any()
    fold_auc = [roc_auc_score(y[f], proba[f]) for f in folds]
    np.testing.assert_allclose(fold_auc, res.fold_auc, rtol=0, atol=1e-12)
    assert f"Mean AUC over the 5 folds {res.auc_mean:.3f} ± {res.auc_std:.3f}" in text


def test_one_condition_run_notes_the_missing_figures(tmp_path):
    run = synthetic_run(tmp_path / "run", {"int6": FULL["int6"]})
    (tmp_path / "run" / "report").mkdir()
    (tmp_path / "run" / "report" / "rtn_vs_prune.png").write_bytes(b"stale")  # from an earlier report
    text = make_report(run).read_text(encoding="utf-8")
    drawn = {"taxonomy", "dissociation", "deciles", "predictor_roc", "predictor_quartiles", "failure_types",
             "reconstruction_by_bits"}  # FP and one RTN width are enough for the reconstruction figure
    assert {p.stem for p in (run / "report").glob("*.png")} == drawn
    assert len(pngs_in(text)) == len(drawn)
    assert notes(text) == [
        "Needs at least two RTN bit widths with active features; this run has 1 (int6).",
        "Needs one RTN and one pruning condition; this run has 1 RTN and 0 pruning condition(s).",
    ]


def test_run_without_rtn_or_mixed_outcomes(tmp_path):
    """Pruning only: no bit-width or RTN-vs-pruning figure; the predictor falls back and says why."""
    run = synthetic_run(tmp_path / "prune", {"prune-0.1": ("prune", None, 0.1, 0.02, 1.0),
                                              "prune-0.3": ("prune", None, 0.3, 0.3, 20.0)})
    text = make_report(run).read_text(encoding="utf-8")
    assert notes(text)[:2] == [
        "Needs at least two RTN bit widths with active features; this run has 0 (none).",
        "Needs one RTN and one pruning condition; this run has 0 RTN and 2 pruning condition(s).",
    ]
    assert "prune-0.3 is shown" in text and focus_of(run) == "prune-0.3"

    text = make_report(run, condition="prune-0.1").read_text(encoding="utf-8")  # every feature survives
    assert notes(text)[-1] == "Needs the reconstruction metrics (an SAE with a decoder) for FP and at least one RTN width."
    assert notes(text)[2:-1] == [
        f"Skipped for prune-0.1: {n} survived and 0 non-survived of {n} active features: 5-fold CV needs at least "
        "5 of each; score more tokens or pick a condition with mixed outcomes." for n in (560, 560)]
    assert not (run / "report" / "predictor_roc.png").exists()


def test_run_with_no_active_features_draws_nothing_and_says_why(tmp_path):
    run = synthetic_run(tmp_path / "quiet", {k: FULL[k] for k in ("int6", "prune-0.175")}, n_active=0, undefined=0)
    text = make_report(run).read_text(encoding="utf-8")
    # only the reconstruction figure, which needs no active feature
    assert [p.stem for p in (run / "report").glob("*.png")] == ["reconstruction_by_bits"] and len(pngs_in(text)) == 1
    assert len(notes(text)) == len(FIGURES) - 1
    assert notes(text)[0] == "No compressed condition has active features, so there is nothing to split."
    assert "no active features in the FP run" in notes(text)[3]


def test_run_without_perplexity(tmp_path):
    run = synthetic_run(tmp_path / "noppl", {k: FULL[k] for k in ("int8", "int6", "prune-0.175")}, ppl=False)
    text = make_report(run).read_text(encoding="utf-8")
    assert notes(text) == ["This run has no perplexities (it was run with --no-ppl)."]
    assert "no perplexities to match on, so int6 is used" in text


def test_several_saes_get_one_section_each(tmp_path):
    run = synthetic_run(tmp_path / "multi", {k: FULL[k] for k in ("int8", "int6", "prune-0.175")}, tags=("l1", "l2"))
    text = make_report(run).read_text(encoding="utf-8")
    for tag in ("l1", "l2"):
        assert f"Figures for SAE {tag}" in text
        assert (run / "report" / f"{tag}-rtn_vs_prune.png").is_file()
    assert len(pngs_in(text)) == 2 * len(FIGURES) and notes(text) == []


def test_matched_pruning_is_paired_with_its_target(tmp_path):
    conds = {k: FULL[k] for k in ("int8", "int6", "int4")} | {"prune-matched": ("prune-matched", None, 0.2, 0.3, 400.0)}
    run = synthetic_run(tmp_path / "matched", conds)
    config = json.loads((run / "config.json").read_text())
    config["conditions"][-1]["target"] = "int6"  # ΔPPL is closest to int4's, but the match was made to int6
    (run / "config.json").write_text(json.dumps(config))
    text = make_report(run).read_text(encoding="utf-8")
    assert "Pairing: prune-matched was matched to int6&#x27;s perplexity." in text


def test_bad_input_is_a_one_line_error(tmp_path, full_report, capsys):
    run, _, _ = full_report
    with pytest.raises(QdmError, match=r"is not a qdm-engine run folder"):
        make_report(tmp_path)
    with pytest.raises(QdmError, match=r"condition 'int3' is not in run .*; it has: int8, int7, int6, int5, int4, p"):
        make_report(run, condition="int3")
    assert main(["report", str(run), "--condition", "int3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdm-engine: error: condition 'int3'") and err.count("\n") == 1
    incomplete = tmp_path / "incomplete"
    (incomplete / "features").mkdir(parents=True)
    (incomplete / "config.json").write_text("{}")
    with pytest.raises(QdmError, match="has no readable summary.csv"):
        make_report(incomplete)


def test_cli_writes_the_report_where_asked(tmp_path, full_report, capsys):
    run, _, _ = full_report
    assert main(["report", str(run), "--condition", "int5", "--out", str(tmp_path / "r")]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page == tmp_path / "r" / "report.html"
    assert 'alt="ROC curve of the survival predictor for int5, AUC' in page.read_text(encoding="utf-8")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
# Injected into a copy of the page (the report itself has no script): after load, the title says how many
# images failed to decode, which --dump-dom then shows.
PROBE = ('<script>window.addEventListener("load", function () { var bad = 0; for (const im of document.images) '
         '{ if (!(im.complete && im.naturalWidth > 0)) bad++; } document.title = "images " + document.images.length '
         '+ " broken " + bad; });</script>')


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless chromium is not installed (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(tmp_path, full_report):
    _, page, text = full_report
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f"<title>images {len(FIGURES)} broken 0</title>" in dom.stdout
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line or "net::ERR" in line]
    assert console == [], console

    shot = tmp_path / "report.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    assert [line for line in res.stderr.splitlines() if ":CONSOLE" in line or "net::ERR" in line] == []
    assert check_png(shot.read_bytes()) == (1200, 3000)
    with Image.open(shot) as im:  # the page drew something: not one flat colour
        assert len(im.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50


# ---- what the figures say: labels, thresholds, decile numbers ---------------------------------------

@pytest.fixture
def drawn(monkeypatch):
    """make_report's matplotlib figures by key, kept as they were when rendered."""
    from qdm_engine import report

    figures = {}
    real_draw = report.Figure.draw

    def keep(self, fig):
        figures[self.key] = fig
        real_draw(self, fig)

    monkeypatch.setattr(report.Figure, "draw", keep)
    return figures


@pytest.mark.parametrize("value,decimals,label", [
    (0.0, 0, "0"), (0.33, 0, "0.3"), (0.04, 0, "<0.1"), (45.4, 0, "45"), (99.7, 0, "99.7"), (99.97, 0, ">99.9"),
    (100.0, 0, "100"), (float("nan"), 0, ""), (0.03, 1, "0.03"), (99.96, 1, "99.96"), (12.34, 1, "12.3"),
    (0.0, 1, "0"), (100.0, 1, "100"),
])
def test_percentage_labels_never_round_to_an_edge(value, decimals, label):
    from qdm_engine.report import _pct_label

    assert _pct_label(value, decimals) == label


@pytest.mark.parametrize("values,decimals", [([0, 0.5, 3.6], 1), ([97.5, 99.9, 100], 1), ([0, 45, 100], 0),
                                             ([float("nan"), 2.0], 1), ([], 0)])
def test_percentage_label_decimals_per_figure(values, decimals):
    from qdm_engine.report import _pct_decimals

    assert _pct_decimals(values) == decimals


def test_small_decile_shares_are_not_labelled_zero(tmp_path, drawn):
    """One non-survivor in a decile of 250 features is 0.4%, and its bar says so (not '0')."""
    run = synthetic_run(tmp_path / "run", {"int6": FULL["int6"]}, n=3000, n_active=2500, undefined=0)
    t = load_features(run, "int6")
    t["r"] = np.where(t["active"], 0.99, t["r"])
    rarest = t.index[t["active"]][np.argmin(t.loc[t["active"], "fp_rate"].to_numpy())]
    t.loc[rarest, "r"] = 0.1
    t["cls"] = classify_active(t["r"], t["active"])
    t.to_parquet(run / "features" / "int6.parquet", index=False)
    make_report(run)
    ax = drawn["deciles"].axes[0]
    assert [x.get_text() for x in ax.texts] == ["0.4"] + ["0"] * 9
    # deciles are numbered 1..10 (1 = rarest) here as in `qdm-engine overlap`
    assert [tick.get_text().split("\n")[0] for tick in ax.get_xticklabels()] == [str(d) for d in range(1, 11)]


def test_threshold_label_is_not_crossed_by_the_curves(tmp_path, drawn):
    """The default run's shape: mean r falls through the survived threshold between INT5 and INT4."""
    from matplotlib.path import Path as MplPath

    run = synthetic_run(tmp_path / "run", {k: FULL[k] for k in ("int8", "int7", "int6", "int5", "int4")})
    summary = pd.read_csv(run / "summary.csv")
    summary.loc[1:, "mean_r"] = [0.999, 0.997, 0.988, 0.950, 0.862]
    summary.loc[1:, "median_r"] = [1.000, 0.998, 0.994, 0.973, 0.910]
    summary.to_csv(run / "summary.csv", index=False)
    make_report(run)
    fig = drawn["correlation_by_bits"]
    ax, renderer = fig.axes[0], fig.canvas.get_renderer()
    labels = [t for t in ax.texts if "threshold" in t.get_text()]
    assert [t.get_text() for t in labels] == ["survived threshold (0.9)"]
    curves = [line for line in ax.lines if line.get_label() in ("mean r", "median r")]
    assert len(curves) == 2
    values = [t for t in ax.texts if re.fullmatch(r"\d\.\d{3}", t.get_text())]
    assert len(values) == 5
    for label in labels:
        box = label.get_window_extent(renderer)
        for curve in curves:
            path = MplPath(ax.transData.transform(np.column_stack(curve.get_data()).astype(float)))
            assert not path.intersects_bbox(box, filled=False), (label.get_text(), curve.get_label())
        assert not any(box.overlaps(v.get_window_extent(renderer)) for v in values)
        assert ax.get_window_extent(renderer).contains(box.x0, box.y0)
