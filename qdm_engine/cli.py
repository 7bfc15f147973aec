"""The `qdm-engine` command line: parses arguments and calls the Python API.

Bad input (a missing file, a mismatched SAE, an out-of-range flag) ends with one line on stderr and
exit code 2, and no results folder that looks complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime

from qdm_engine import __version__
from qdm_engine.errors import QdmError


DEFAULT_BITS = "8..4"  # sweep's RTN widths when no --bits, --method, --match or --compressed is given


class _Help(argparse.HelpFormatter):
    """Shows a flag's default only when it has a real one (not None, False or an empty list).

    A switch (store_true/store_false) takes no value, so its stored default says nothing a user can
    type: `--no-bos` storing True by default would read "(default: True)". Its help says what it does.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs == 0:
            return text
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), matching every other error the tool reports."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{s}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


def _floats(s: str) -> list[float]:
    """A comma list of numbers, e.g. 0.1,0.25 (for a flag that takes several values)."""
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.1 or 0.1,0.25, got '{s}'") from None


def _names(s: str) -> list[str]:
    """A comma list of names (for a flag that takes several values); a path that exists is one name."""
    if os.path.exists(os.path.expanduser(s)):
        return [s]
    return [v.strip() for v in s.split(",") if v.strip()]


def _count_or_auto(s: str):
    """A positive whole number, or 'auto'."""
    return "auto" if s == "auto" else _positive_int(s)


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="audit FP vs RTN INT8..INT4 (and pruning) through a frozen SAE",
        description=(
            "Run the FP model and each compressed copy on identical tokens, encode the residual stream "
            "at the SAE's site, and report per condition: perplexity change, mean/median feature "
            "correlation and the survived/degraded/damaged split, and for FP and every condition the "
            "SAE's reconstruction metrics (explained variance, mse, cossim, L0, L1, alive features; "
            "--splice adds the spliced CE loss and KL scores). With no --model/--sae it audits the "
            "embedded default model and SAE."
        ),
        formatter_class=_Help,
    )
    g = p.add_argument_group("what to audit")
    g.add_argument("--bits", help="RTN bit widths: a range like 8..4 or a list like 8,6,4 (each 2..16); default 8..4 "
                                  "unless --method or --match is given")
    g.add_argument("--method", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="also audit a compression method, e.g. gptq:bits=4,group=128, awq, hqq:bits=4, nf4, fp8, "
                        "gguf:type=Q4_K, wanda:sparsity=0.5, sparsegpt:pattern=2:4 (repeatable; "
                        "`qdm-engine methods` lists every method and its keys)")
    g.add_argument("--compressed", action="append", default=[], metavar="[NAME=]PATH",
                   help="also audit a downloaded checkpoint of the base model against it: a .gguf file, a "
                        "compressed-tensors folder (llm-compressor output), a GPTQ, AWQ-GEMM, bitsandbytes "
                        "(NF4/FP4/INT8) or torchao folder, or a transformers folder; a path or a hub id, owner/name "
                        "or owner/name:FILE.gguf (repeatable; named after its file or folder unless NAME= is given)")
    g.add_argument("--scope", choices=["blocks", "all"], default="blocks",
                   help="what is compressed: blocks (the decoder-layer linears) or all (also the embeddings and "
                        "the output head, as deployed GGUF files do)")
    g.add_argument("--match", action="append", default=[], metavar="SPEC@CONDITION",
                   help="also audit a pruning method at the sparsity whose held-out perplexity matches a "
                        "condition's, e.g. wanda@int6 or magnitude@gptq-w4g128 (6-step bisection over 0..0.8)")
    g.add_argument("--prune", type=_floats, action="extend", default=[], metavar="S",
                   help="also audit per-tensor magnitude pruning at sparsity S (a comma list, or repeat it)")
    g.add_argument("--prune-matched", metavar="intB",
                   help="also audit magnitude pruning at the sparsity whose held-out perplexity matches RTN "
                        "intB (6-step bisection over 0..0.8 on blocks disjoint from the audit's)")
    g.add_argument("--calib-text", help="held-out text for calibration (GPTQ, AWQ, Wanda, SparseGPT) and for "
                                        "--match/--prune-matched (default: the text after the audit blocks)")
    g.add_argument("--calib-tokens", type=_positive_int, default=4096,
                   help="calibration / held-out token budget (disjoint from the audit tokens)")
    g.add_argument("--null", action="store_true", help="add the FP-vs-FP null condition (reruns the FP model)")
    g = p.add_argument_group("model and SAE")
    g.add_argument("--model", help="transformers causal LM: hub id or local folder (default: the embedded model)")
    g.add_argument("--gguf-file", help="a GGUF checkpoint (path, or a file name inside --model's hub repo)")
    g.add_argument("--sae", type=_names, action="extend",
                   help="SAELens SAE: release:sae_id or a folder with cfg.json + sae_weights.safetensors; give a "
                        "comma list or repeat it to audit several SAEs (at their own sites) from the same forward "
                        "passes")
    g.add_argument("--hook", help="read-out site, e.g. blocks.6.hook_resid_post (default: the SAE's hook_name)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow a model's own code from its repo")
    g = p.add_argument_group("tokens")
    g.add_argument("--text", help="audit text: a local UTF-8 file, a folder of .txt/.jsonl/.parquet files (read in "
                                  "sorted order, documents joined by newlines), - for standard input, or a datasets "
                                  "name path[:config[:split]] (hf:NAME forces one; streamed); tokenized as a stream "
                                  "that stops at --tokens (default: the bundled WikiText-2-raw test split)")
    g.add_argument("--text-field", default="text", help="the field of .jsonl records / column of .parquet files "
                                                        "(and of a datasets name) that holds the text")
    g.add_argument("--tokens", type=_count_or_auto, default="auto",
                   help="token budget (positions, BOS included); auto: 8192 on CPU, 131072 on CUDA")
    g.add_argument("--block-len", type=_positive_int, default=128, help="positions per block")
    g.add_argument("--no-bos", dest="bos", action="store_false",
                   help="do not prepend BOS to each block (the paper's convention); by default BOS is "
                        "prepended and its positions are left out of the statistics")
    g = p.add_argument_group("taxonomy")
    g.add_argument("--active-rate", type=float, default=1e-3, help="FP firing rate above which a feature is audited")
    g.add_argument("--survived", type=float, default=0.9, help="r above this: survived")
    g.add_argument("--damaged", type=float, default=0.5, help="r below this: damaged")
    g = p.add_argument_group("execution")
    g.add_argument("--batch-size", type=_count_or_auto, default="auto",
                   help="blocks per forward pass; auto: 8 on CPU, from free memory on CUDA (halved on out-of-memory)")
    g.add_argument("--no-ppl", dest="ppl", action="store_false",
                   help="features only: stop each forward at the deepest read-out layer (no perplexity)")
    g.add_argument("--splice", action="store_true",
                   help="also measure ce_loss_score and kl_div_score of the SAE's reconstruction spliced in at its "
                        "site (SAELens's definitions); costs two extra forwards per SAE per model (FP and each "
                        "condition): one spliced, one zero-ablated")
    g.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="model dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--out", help="results folder (default: qdm-runs/<time>); must not exist or be empty")
    g.add_argument("--report", action="store_true", help="also write RUN_DIR/report/report.html and its figures")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("long runs")
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="finish an interrupted sweep from its checkpoints, with the arguments it started with (no "
                        "others but --quiet and --report); refused if the model, SAE, tokens or code changed")
    g.add_argument("--checkpoint-every", type=_count_or_auto, default="auto", metavar="N",
                   help="also checkpoint every N batches inside a pass (auto: about every 3 minutes of work); "
                        "checkpoints are always taken after the FP pass and after each condition")
    g.add_argument("--cache", choices=["auto", "memory", "disk"], default="auto",
                   help="where the FP read-outs are kept for the conditions: auto (GPU, else host memory, else disk "
                        "when they would take over half the available memory), memory or disk")
    g.add_argument("--cache-dir", help="folder for a disk cache (default: inside the results folder)")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    from qdm_engine.audit import format_summary
    from qdm_engine.engine.state import Interrupted

    log = lambda msg: print(msg, flush=True)  # noqa: E731  (what is audited is part of the output)
    try:
        result = _sweep_or_resume(args, log)
    except Interrupted as stop:
        print(f"qdm-engine: interrupted; the finished work is saved in {stop.run_dir}. Resume with:\n"
              f"  {_resume_command(stop.run_dir)}", file=sys.stderr)
        return 128 + stop.signum
    if result is None:
        print(f"{args.resume} is complete (it has its summary.csv); nothing to resume")
        return 0
    if result.out is None:  # a non-zero rank under torchrun: rank 0 prints and writes
        return 0
    print(format_summary(result.summary))
    from qdm_engine.analysis.uncertainty import format_intervals

    if format_intervals(result.summary):
        print("\n" + format_intervals(result.summary))
    for note in result.config.get("notes", []):
        print(f"note: {note}")
    print(f"\nresults: {result.out}  ({result.config['wall_seconds']:.1f} s)")
    if args.report:  # the run folder is complete: a failed report must not cost the audit
        from qdm_engine.report import make_report

        try:
            print(f"report:  {make_report(result.out)}")
        except (QdmError, ImportError, OSError) as exc:
            print(f"qdm-engine: warning: report not written ({exc}); retry with qdm-engine report {result.out}",
                  file=sys.stderr)
    return 0


_RESUME_KEEPS = {"resume", "quiet", "report", "func", "command"}


def _sweep_or_resume(args, log):
    """`sweep --resume RUN_DIR` (which takes no other arguments) or a new sweep."""
    from qdm_engine.analysis.taxonomy import Thresholds
    from qdm_engine.audit import sweep

    if args.resume is not None:
        from qdm_engine.resume import resume_sweep

        defaults = vars(build_parser().parse_args(["sweep"]))
        extra = sorted(k for k, v in vars(args).items() if k not in _RESUME_KEEPS and v != defaults.get(k))
        if extra:
            raise QdmError("--resume takes no other arguments (the run's saved config is the source of truth); drop "
                           + ", ".join("--" + k.replace("_", "-") for k in extra))
        return resume_sweep(args.resume, progress=not args.quiet, log=log)
    out = args.out or os.path.join("qdm-runs", datetime.now().strftime("%Y%m%d-%H%M%S"))
    bits = args.bits
    if bits is None:
        bits = None if (args.method or args.match or args.compressed) else DEFAULT_BITS
    return sweep(
        model=args.model, sae=args.sae, bits=bits, prune=args.prune, prune_matched=args.prune_matched,
        methods=args.method, scope=args.scope, match=args.match, compressed=args.compressed,
        gguf_file=args.gguf_file, hook=args.hook, text=args.text, calib_text=args.calib_text,
        calib_tokens=args.calib_tokens, tokens=args.tokens, block_len=args.block_len, ppl=args.ppl,
        batch_size=args.batch_size, bos=args.bos, device=args.device, dtype=args.dtype,
        thresholds=Thresholds(active=args.active_rate, survived=args.survived, damaged=args.damaged),
        null=args.null, out=out, progress=not args.quiet, trust_remote_code=args.trust_remote_code, log=log,
        text_field=args.text_field, checkpoint_every=args.checkpoint_every, cache=args.cache, cache_dir=args.cache_dir,
        splice=args.splice,
    )


def _resume_command(run_dir) -> str:
    import shlex

    launcher = "torchrun --nproc-per-node " + os.environ["WORLD_SIZE"] + " -m qdm_engine.cli" \
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "qdm-engine"
    return f"{launcher} sweep --resume {shlex.quote(str(run_dir))}"


def _thresholds_of(run_dir) -> dict:
    from qdm_engine.analysis.results import load_config

    return load_config(run_dir).get("thresholds", {})


def _add_analyses(sub) -> None:
    p = sub.add_parser("predict", formatter_class=_Help,
                       help="which features are fragile? logistic regression on FP statistics of a run",
                       description="Predict survival of each active feature from its FP statistics only "
                                   "(rarity, log mean, log peak, log concentration): 5-fold CV ROC AUC, "
                                   "standardised coefficients, VIF and survival by quartile "
                                   "(docs/METHOD.md section 7).")
    p.add_argument("run", metavar="RUN_DIR", help="a sweep's results folder")
    p.add_argument("--condition", default="int6", help="condition whose survival is predicted")
    p.add_argument("--recipe", choices=["ours", "paper"], default="ours",
                   help="ours: scaler fitted inside each CV fold; paper: scaler fitted on all data first")
    p.set_defaults(func=_run_predict)

    p = sub.add_parser("overlap", formatter_class=_Help,
                       help="do two conditions damage the same features? Jaccard, damage correlation, deciles",
                       description="Compare two conditions of one run (docs/METHOD.md section 8): Jaccard of the "
                                   "non-survived, damaged and degraded sets, Pearson and Spearman of damage "
                                   "scores, and non-survival by FP firing-rate decile.")
    p.add_argument("run", metavar="RUN_DIR", help="a sweep's results folder")
    p.add_argument("--a", required=True, help="first condition, e.g. int6")
    p.add_argument("--b", required=True, help="second condition, e.g. prune-0.175")
    p.set_defaults(func=_run_overlap)

    p = sub.add_parser("thresholds", formatter_class=_Help,
                       help="survived/degraded/damaged %% over a grid of thresholds, from stored tables",
                       description="Recount the taxonomy for survival thresholds 0.80-0.95 x damage thresholds "
                                   "0.3-0.7 from a run's per-feature tables, without rerunning any model.")
    p.add_argument("run", metavar="RUN_DIR", help="a sweep's results folder")
    p.add_argument("--condition", type=_names, action="extend",
                   help="condition(s) to tabulate, a comma list like int4,int5 or repeated (default: all)")
    p.set_defaults(func=_run_thresholds)


def _add_ppl(sub) -> None:
    p = sub.add_parser("ppl", formatter_class=_Help,
                       help="sliding-window perplexity for FP and every condition of a run",
                       description="Reload a run's model and score its audit text with a sliding window "
                                   "(BOS at the start of each window, only new targets scored, token-weighted) "
                                   "for FP and each condition; adds ppl_sliding and dppl_sliding_pct to the "
                                   "run's summary.")
    p.add_argument("run", metavar="RUN_DIR", help="a sweep's results folder")
    p.add_argument("--window", type=_positive_int, default=2048, help="positions per window, BOS included")
    p.add_argument("--stride", type=_positive_int, default=512, help="new tokens per window")
    p.add_argument("--tokens", type=_positive_int, help="tokens of the audit text to score (default: the run's)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: the run's)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="default: the run's")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_ppl)


def _run_ppl(args) -> int:
    from qdm_engine.sliding_ppl import sliding_ppl

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    summary = sliding_ppl(args.run, args.window, args.stride, args.tokens, args.device, args.dtype,
                          progress=not args.quiet, log=log)
    cols = ["condition", "ppl", "dppl_pct", "ppl_sliding", "dppl_sliding_pct"]
    print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def _add_stability(sub) -> None:
    p = sub.add_parser("stability", formatter_class=_Help,
                       help="survival at several token budgets and on random token subsets (one model pass)",
                       description="Audit FP vs one RTN condition over the largest budget, keep each batch's "
                                   "moments, and recount the taxonomy on budget prefixes and random subsets "
                                   "of batches, as separate audits would, without rerunning the model.")
    p.add_argument("--condition", default="int6", help="RTN condition, e.g. int6")
    p.add_argument("--budgets", default="4096,8192,16384", help="token budgets (positions), comma-separated")
    p.add_argument("--subsets", type=int, default=10, help="random token subsets")
    p.add_argument("--subset-frac", type=float, default=0.5, help="fraction of the batches in each subset")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset draws")
    for flag, kw in (("--model", {}), ("--gguf-file", {}), ("--sae", {}), ("--hook", {}), ("--text", {}),
                     ("--device", {}), ("--out", {"help": "folder for config.json and summary.csv (optional)"})):
        p.add_argument(flag, **{"help": "as in sweep", **kw})
    p.add_argument("--block-len", type=_positive_int, default=128, help="positions per block")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="blocks per forward (the subset unit)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="as in sweep")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_stability)


def _run_stability(args) -> int:
    from qdm_engine.stability import format_stability, stability

    try:
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise QdmError(f"cannot read --budgets '{args.budgets}'; use numbers like 50000,100000,200000") from None
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    table = stability(model=args.model, gguf_file=args.gguf_file, sae=args.sae, hook=args.hook, text=args.text,
                      condition=args.condition, budgets=budgets, subsets=args.subsets, subset_frac=args.subset_frac,
                      seed=args.seed, out=args.out, block_len=args.block_len, batch_size=args.batch_size,
                      device=args.device, dtype=args.dtype, progress=not args.quiet, log=log)
    print(format_stability(table))
    return 0


def _run_predict(args) -> int:
    from qdm_engine.analysis.predictor import fit_predictor
    from qdm_engine.analysis.results import load_features

    th = _thresholds_of(args.run)
    res = fit_predictor(load_features(args.run, args.condition), recipe=args.recipe,
                        survival=th.get("survived", 0.9))
    print(res.to_text(args.condition))
    return 0


def _run_overlap(args) -> int:
    from qdm_engine.analysis.overlap import overlap
    from qdm_engine.analysis.results import load_features

    th = _thresholds_of(args.run)
    res = overlap(load_features(args.run, args.a), load_features(args.run, args.b), labels=(args.a, args.b),
                  survival=th.get("survived", 0.9), damage=th.get("damaged", 0.5))
    print(res.to_text())
    return 0


def _run_thresholds(args) -> int:
    from qdm_engine.analysis.results import list_conditions, load_features
    from qdm_engine.analysis.thresholds import threshold_grid_run

    names = args.condition or [c for c in list_conditions(args.run) if c != "fp-null"]
    grid = threshold_grid_run({c: load_features(args.run, c) for c in names})
    print(grid.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", formatter_class=_Help,
                       help="figures and one self-contained HTML page of a run's results",
                       description="Draw a run's results without rerunning any model: survived/degraded/damaged "
                                   "bars, correlation by bits, perplexity change against survival, RTN vs "
                                   "pruning per feature, non-survival by firing-rate decile and the survival "
                                   "predictor, into PNG files and a self-contained report.html (figures "
                                   "embedded, no network needed) under RUN_DIR/report/.")
    p.add_argument("run", metavar="RUN_DIR", help="a sweep's results folder")
    p.add_argument("--condition", help="condition of the feature-level figures and the most damaged features "
                   "(default: the most compressed condition whose outcomes are still mixed)")
    p.add_argument("--out", help="folder for the figures and report.html (default: RUN_DIR/report)")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from qdm_engine.report import make_report

    print(make_report(args.run, args.out, condition=args.condition))
    return 0


def _add_train_sae(sub) -> None:
    p = sub.add_parser("train-sae", formatter_class=_Help,
                       help="train a residual-stream SAE with SAELens (reproduces the shipped default SAE)",
                       description="Cache a model's residual-stream activations over a text file in batches, train "
                                   "a standard ReLU SAE on them with SAELens, evaluate it on held-out text (L0, "
                                   "variance explained, dead features, CE loss recovered) and write a SAELens-format "
                                   "folder (cfg.json, sae_weights.safetensors) plus metrics.json. With no --model "
                                   "and no --gguf-file it uses the default model and the default SAE's settings.")
    p.add_argument("--out", required=True, help="new or empty folder for the SAE (written under a temporary name, "
                                                "renamed when complete)")
    p.add_argument("--model", help="local HF model folder (default: the default model)")
    p.add_argument("--gguf-file", help="a GGUF file to dequantize and train on instead")
    p.add_argument("--hook", default="blocks.14.hook_resid_post", help="read-out site, blocks.L.hook_resid_post")
    p.add_argument("--width", type=_positive_int, help="number of features (default: 8 x d_model)")
    p.add_argument("--text", help="training text file (default: the first 1 MB of WikiText-2-raw's train split, "
                                  "shipped with qdm-engine)")
    p.add_argument("--eval-text", help="held-out text file (default: the first 100 KB of WikiText-2-raw's "
                                       "validation split, shipped with qdm-engine)")
    p.add_argument("--tokens", type=_positive_int, default=2_097_152, help="training activations; the activation "
                   "cache holds at most this many positions (several epochs when the text is shorter)")
    p.add_argument("--eval-tokens", type=_positive_int,
                   help="held-out positions evaluated (default: all of --eval-text)")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--context-size", type=_positive_int, default=256, help="positions per block, BOS included")
    p.add_argument("--batch-tokens", type=_positive_int, default=1024, help="activations per training step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--l1", type=float, default=4.0, help="L1 coefficient")
    p.add_argument("--weights-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="storage dtype of the saved weights (loaded and encoded in float32)")
    p.add_argument("--work-dir", help="keep the activation cache here and reuse it on a rerun (default: a temp dir)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_run_train_sae)


def _run_train_sae(args) -> int:
    from qdm_engine.engine.training import train_sae

    optional = {"text": args.text, "eval_text": args.eval_text}
    metrics = train_sae(model=args.model, gguf_file=args.gguf_file, hook=args.hook, width=args.width,
                        tokens=args.tokens, eval_tokens=args.eval_tokens, seed=args.seed, out=args.out,
                        context_size=args.context_size, batch_tokens=args.batch_tokens, lr=args.lr,
                        l1_coefficient=args.l1, weights_dtype=args.weights_dtype, work_dir=args.work_dir,
                        progress=not args.quiet,
                        **{k: v for k, v in optional.items() if v is not None})
    ev = metrics.get("eval", {})
    print(f"{args.out}: {metrics['d_sae']} features at {metrics['hook_name']}, {metrics['training_steps']} steps; "
          + (f"held-out L0 {ev['l0']:.1f}, FVE {ev['fve']:.3f}, dead {100 * ev['dead_fraction']:.1f}%, "
             f"CE loss recovered {ev['ce_loss_recovered']:.3f}" if ev else "not evaluated"))
    return 0


def _add_features(sub) -> None:
    p = sub.add_parser("features", formatter_class=_Help,
                       help="which features a condition damaged, how, and where they fire (contexts)",
                       description="Per feature of one condition, from the run folder alone: r with its 95% "
                                   "block-bootstrap interval, FP and compressed firing rates, the magnitude ratio "
                                   "(compressed over FP activation at the feature's top FP positions), a failure "
                                   "type, and its top FP contexts from the audit text with the FP and compressed "
                                   "activation side by side, the firing token in [[ ]]. Failure types, in order: "
                                   "dies (firing-rate ratio below --dies-below), new firing (above --new-above), "
                                   "rescaled (r above the run's survival threshold but magnitude outside "
                                   "[1/--rescale, --rescale]), survived (r above it), misfires (the rest).")
    p.add_argument("run", metavar="RUN_DIR", help="a sweep's results folder")
    p.add_argument("--condition", required=True, help="condition to inspect, e.g. int4")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--worst", type=_positive_int, default=20, help="the N active features of lowest r")
    pick.add_argument("--feature", type=int, nargs="+", metavar="ID", help="these features instead")
    p.add_argument("--contexts", type=int, default=5, help="top FP contexts shown per feature (0: none)")
    p.add_argument("--dies-below", type=float, default=0.2, help="firing-rate ratio below which a feature dies")
    p.add_argument("--new-above", type=float, default=2.0, help="firing-rate ratio above which it is new firing")
    p.add_argument("--rescale", type=float, default=1.3, help="magnitude ratio bound of rescaled (and 1/bound)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=_run_features)


def _run_features(args) -> int:
    from qdm_engine.analysis.features import FailureThresholds, features_payload, format_features, to_json

    if args.contexts < 0:
        raise QdmError(f"--contexts must be 0 or more, got {args.contexts}")
    ft = FailureThresholds(dies_below=args.dies_below, new_above=args.new_above, rescale=args.rescale)
    payload = features_payload(args.run, args.condition, worst=args.worst, features=args.feature,
                               n_contexts=args.contexts, ft=ft)
    print(to_json(payload) if args.json else format_features(payload))
    return 0


def _add_prune_sae(sub) -> None:
    p = sub.add_parser("prune-sae", formatter_class=_Help,
                       help="prune the FP SAE for a compressed condition (Wanda-style) and compare reconstruction",
                       description="Rebuild a run's compressed model for one condition from its config.json, read "
                                   "calibration activations at the SAE's site on held-out blocks (after the audit "
                                   "blocks), prune the FP SAE's W_enc and W_dec with a Wanda-style score (|W| times "
                                   "the norm of that matrix's input over the calibration positions; the lowest "
                                   "ratio of each output row zeroed; docs/METHOD.md section 4c, after Gupte et al. "
                                   "2025), write each pruned SAE in SAELens format under --out, and report the "
                                   "reconstruction metrics of the unpruned and each pruned SAE on the FP and the "
                                   "compressed model, on the run's audit tokens.")
    p.add_argument("run", metavar="RUN_DIR", help="a sweep's results folder")
    p.add_argument("--condition", required=True, help="the compressed condition, e.g. int4")
    p.add_argument("--ratios", type=_floats, default="0.25,0.5", help="fractions of each row to prune, in [0, 1)")
    p.add_argument("--out", required=True, help="new or empty folder for the pruned SAEs and prune_sae.csv")
    p.add_argument("--calib-tokens", type=_positive_int, default=4096, help="calibration positions (held out)")
    p.add_argument("--splice", action="store_true", help="also the spliced CE loss and KL scores (two extra "
                                                         "forwards per SAE per model)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="blocks per forward")
    p.add_argument("--device", help="cpu or cuda[:N] (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_prune_sae)


def _run_prune_sae(args) -> int:
    from qdm_engine.prune_sae import format_prune, prune_sae

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    table = prune_sae(args.run, args.condition, args.ratios, args.out, args.calib_tokens, args.splice,
                      args.batch_size, args.device, progress=not args.quiet, log=log)
    print(format_prune(table))
    print(f"\npruned SAEs and prune_sae.csv: {args.out}")
    return 0


def _add_methods(sub) -> None:
    p = sub.add_parser("methods", formatter_class=_Help,
                       help="list the compression methods that --method can name, with their keys and defaults",
                       description="Every compression method a sweep can audit: what it does, its keys with their "
                                   "defaults, the library that implements it, whether it needs calibration data, "
                                   "and whether that library is installed here.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_methods)

    p = sub.add_parser("build-ggml", formatter_class=_Help,
                       help="build llama.cpp's ggml quantizer once, for the GGUF k-quants (Q6_K..Q2_K)",
                       description="Download llama-cpp-python's source package from PyPI and build the ggml base "
                                   "library from the llama.cpp sources it bundles (cmake and a C/C++ compiler, "
                                   "about a minute), into the qdm-engine cache. The GGUF k-quant methods use it.")
    p.add_argument("--force", action="store_true", help="rebuild even if it is already built")
    p.set_defaults(func=_run_build_ggml)


def _run_methods(args) -> int:
    import json

    from qdm_engine.engine.compress.listing import method_rows, format_methods

    rows = method_rows()
    print(json.dumps(rows, indent=2) if args.json else format_methods(rows))
    return 0


def _run_build_ggml(args) -> int:
    import subprocess

    from qdm_engine.engine.compress.ggml import build_ggml

    try:
        build_ggml(force=args.force, log=lambda m: print(m, flush=True))
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        raise QdmError(f"could not build ggml: {exc}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qdm-engine",
        description="Does a compressed language model keep its SAE features? A feature-by-feature audit.",
        epilog="The method (formulas, defaults, changes from the paper) is docs/METHOD.md in the qdm-engine "
               "repository; the help cites its sections.",
    )
    parser.add_argument("--version", action="version", version=f"qdm-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_sweep(sub)
    _add_methods(sub)
    _add_analyses(sub)
    _add_report(sub)
    _add_ppl(sub)
    _add_stability(sub)
    _add_train_sae(sub)
    _add_features(sub)
    _add_prune_sae(sub)
    return parser


# Import-time warnings of libraries that transformers' quantizer registry imports whenever they are installed:
# torchao cannot load its CUDA-only extensions on a CPU machine, registers enums torch now calls deprecated, and
# bitsandbytes looks for an optional hub kernel. None concerns the audit; each would print on every run.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops")


def main(argv: list[str] | None = None) -> int:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except QdmError as exc:
        print(f"qdm-engine: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        from qdm_engine.resume import LAST_RUN, is_unfinished

        run_dir = LAST_RUN.get("run_dir")
        if run_dir is not None and is_unfinished(run_dir):
            print(f"qdm-engine: interrupted; {run_dir} keeps the work up to its last checkpoint. Resume with:\n"
                  f"  {_resume_command(run_dir)}", file=sys.stderr)
        else:
            print("qdm-engine: interrupted; no results folder was completed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
