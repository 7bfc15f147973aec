"""`sweep()`: the audit end to end, the public Python API that the CLI calls.

Loads the model, SAE and tokens, runs FP plus each compression condition on identical tokens
(engine.runner), turns the per-feature moments into tables and the taxonomy (analysis), and writes
the run folder (analysis.results).
"""

from __future__ import annotations

import dataclasses
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
from qdm_engine.engine.compress import (
    FP, SCOPES, CalibrationTokens, find_targets, parse_bits, parse_method, spec_of,
)
from qdm_engine.engine.compress.rtn import RTN
from qdm_engine.engine.compress.sparsity import MagnitudePrune
from qdm_engine.engine.models import (
    check_model_source, decoder_layers, hf_progress_bars, load_model, model_identity, parse_dtype, parse_hook,
)
from qdm_engine.engine.perplexity import perplexity
from qdm_engine.engine.recon import RECON_METRICS
from qdm_engine.engine.runner import ConditionRun, auto_batch_size, run_conditions
from qdm_engine.engine.sae import load_sae
from qdm_engine.engine.sites import site_width
from qdm_engine.engine.splice import SPLICE_METRICS
from qdm_engine.engine.tokens import TokenBlocks, make_blocks, read_text
from qdm_engine.errors import QdmError
from qdm_engine.kernels.moments import FeatureMoments

SUMMARY_COLUMNS = [
    "sae", "condition", "method", "bits", "sparsity", "ppl", "dppl_pct", "mean_r", "median_r",
    "survived_pct", "degraded_pct", "damaged_pct", "n_active", "undefined_n", "n_tokens", "seconds",
    "compress_seconds",
]
# The FP SAE's reconstruction metrics on each model's read-outs, and (sweep --splice) its spliced-loss
# metrics; SAELens's run_evals definitions (engine/recon.py, engine/splice.py).
SUMMARY_COLUMNS += list(RECON_METRICS) + list(SPLICE_METRICS)


@dataclass
class SweepResult:
    summary: pd.DataFrame  # one row per condition, FP first
    features: dict[str, pd.DataFrame]  # condition name -> per-feature table
    config: dict = field(default_factory=dict)
    out: Path | None = None
    runs: list = field(default_factory=list)  # the raw ConditionRuns, kept when sweep(keep_batches=True)
    topk: pd.DataFrame | None = None  # per feature its top-k FP positions and every condition's activation there


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


def _conditions(bits, prune, null: bool, prune_matched: str | None = None, methods=(), scope: str = "blocks",
                match=(), checkpoints=()) -> list:
    """The conditions of a sweep from its flags, all checked before any model loads."""
    if scope not in SCOPES:
        raise QdmError(f"unknown --scope '{scope}'; choose blocks or all")
    conds: list = [RTN(b) for b in (parse_bits(bits) if isinstance(bits, str) else list(bits or []))]
    conds += [MagnitudePrune(float(s)) for s in (prune or [])]
    conds += [parse_method(m) for m in (methods or [])]
    if scope == "all":
        conds = [_with_scope(c) for c in conds]
    conds += list(checkpoints)
    if null:
        conds.insert(0, FP())
    if prune_matched:
        _bits_of(prune_matched)
    for m in match or []:
        parse_match(m)
    if not conds and not prune_matched and not match and not checkpoints:
        raise QdmError("nothing to audit: give --bits, --method, --compressed, --prune, --match or --prune-matched")
    names = [c.name for c in conds]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise QdmError(f"condition {', '.join(twice)} is listed twice; drop the repeated --bits/--method "
                       "(or name a checkpoint with --compressed NAME=PATH)")
    return conds


def _with_scope(cond):
    """`--scope all`: embeddings and head too, for the methods that quantize a tensor on its own."""
    if isinstance(cond, FP):
        return cond
    if "scope" not in {f.name for f in dataclasses.fields(cond)}:
        raise QdmError(f"--scope all is not available for {cond.name} ({cond.method} compresses the decoder-layer "
                       "linears only); use --scope blocks, or give that method on its own in another sweep")
    return dataclasses.replace(cond, scope="all")


def parse_match(spec: str) -> tuple[str, str]:
    """'wanda@int6' -> ('wanda', 'int6'): a method with a sparsity key, matched to a condition's perplexity."""
    from qdm_engine.engine.matched import matchable

    method, at, target = str(spec).partition("@")
    if not at or not method.strip() or not target.strip():
        raise QdmError(f"--match '{spec}': expected SPEC@CONDITION, e.g. wanda@int6 or magnitude@int6")
    matchable(method.strip())
    return method.strip(), target.strip()


def _default_components():
    try:
        from qdm_engine.engine import default
    except ImportError as exc:
        raise QdmError("the embedded default model is not available in this install; pass --model and --sae") from exc
    return default


def load_lm(model, gguf_file, dtype, device, trust_remote_code=False, progress=True):
    """(model, tokenizer, identity): the embedded default when neither `model` nor `gguf_file` is given.

    The identity carries `load`, the arguments that load the same model again (used by `qdm-engine ppl`).
    """
    if model is None and gguf_file is None:
        default = _default_components()
        with hf_progress_bars(False):
            lm, tok, info = default.load_default_model(dtype=dtype, progress=progress)
        lm = lm.to(device).requires_grad_(False)
        ident = {"source": default.DEFAULT_MODEL_ID, **model_identity(lm), **info}
    else:
        lm, tok, ident = load_model(model, gguf_file, dtype, device, trust_remote_code)
    ident = {**ident, "load": {"model": model, "gguf_file": gguf_file, "trust_remote_code": trust_remote_code}}
    return lm, tok, ident


def _tag(sae_w, taken: set[str]) -> str:
    """A short unique name for an SAE: its folder name or sae_id, made safe for a path."""
    ident = sae_w.identity
    base = str(ident.get("sae_id") or Path(str(ident.get("source", "sae"))).name)
    base = "".join(c if c.isalnum() or c in "._-" else "-" for c in base).strip("-.") or "sae"
    tag, i = base, 2
    while tag in taken:
        tag, i = f"{base}-{i}", i + 1
    taken.add(tag)
    return tag


def sweep(
    model: str | None = None,
    sae: str | list[str] | None = None,
    bits="8..4",
    prune=(),
    *,
    prune_matched: str | None = None,
    methods=(),
    scope: str = "blocks",
    match=(),
    compressed=(),
    gguf_file: str | None = None,
    hook: str | None = None,
    text: str | None = None,
    calib_text: str | None = None,
    calib_tokens: int = 4096,
    tokens: int | str | None = "auto",
    block_len: int = 128,
    batch_size: int | str = "auto",
    bos: bool = True,
    ppl: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    thresholds: Thresholds = Thresholds(),
    null: bool = False,
    out: str | Path | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    keep_batches: bool = False,
    topk: int = 16,
    boot_units: int = 64,
    splice: bool = False,
    recon: bool = True,
    log=print,
    text_field: str = "text",
    checkpoint_every: int | str = "auto",
    cache: str = "auto",
    cache_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
) -> SweepResult:
    """Audit FP vs each condition (RTN `bits`, pruning `prune`) on identical tokens through frozen SAEs.

    `sae` may be a list: every SAE is read at its own site from the same forward passes, and its
    conditions are named `<sae-tag>/<condition>`. `prune_matched='int6'` adds magnitude pruning at the
    sparsity whose held-out perplexity matches RTN INT6 (bisection, docs/METHOD.md section 3). `ppl=False`
    stops each forward at the deepest read-out (features only). Under torchrun the blocks are sharded
    over ranks. Returns the summary and per-feature tables; with `out`, rank 0 also writes the run folder.
    `topk` (0: off) FP positions per feature are kept with every condition's activations there, and r gets
    block-bootstrap intervals over about `boot_units` runs of blocks (0: off). Every model also gets each
    SAE's reconstruction metrics (`recon=False`: not measured, for timing them); `splice` adds the
    spliced-loss metrics (two more forwards per SAE).
    `text` may also be a folder of .txt/.jsonl/.parquet files (records' `text_field`) or '-' (stdin), streamed
    up to the budget (engine.corpus). With `out` the loop checkpoints into the unfinished folder (after the FP
    pass, each condition and every `checkpoint_every` batches; engine.state); `resume_from` continues one
    (resume.resume_sweep). `cache` (auto, memory, disk) and `cache_dir` place the FP read-out cache.
    """
    call = dict(locals())  # the arguments, saved with a resumable run (resume.begin)
    from qdm_engine import resume as resumable
    from qdm_engine.engine import corpus
    from qdm_engine.engine.distributed import init_from_env
    from qdm_engine.engine.fpcache import MODES
    from qdm_engine.engine.matched import match_method, match_pruning

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    methods = [methods] if isinstance(methods, str) else list(methods or [])
    match = [match] if isinstance(match, str) else list(match or [])
    from qdm_engine.engine.checkpoints import Checkpoint, make_checkpoint

    compressed = [compressed] if isinstance(compressed, (str, Path)) else list(compressed or [])
    checkpoints = [make_checkpoint(str(c), trust_remote_code) for c in compressed]  # paths checked, files hashed
    conditions = _conditions(bits, prune, null, prune_matched, methods, scope, match, checkpoints)
    matches = [(m, t, _match_target(t, conditions)) for m, t in map(parse_match, match)]
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise QdmError(f"--batch-size must be a positive number or auto, got {batch_size}")
    if splice and not ppl:
        raise QdmError("--splice needs the logits of every forward: drop --no-ppl")
    if (prune_matched or matches) and not ppl:
        raise QdmError(f"{'--prune-matched' if prune_matched else '--match'} needs perplexities: drop --no-ppl")
    if cache not in MODES:
        raise QdmError(f"unknown --cache '{cache}'; choose auto, memory or disk")
    if checkpoint_every != "auto" and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise QdmError(f"--checkpoint-every must be a positive number of batches or auto, got {checkpoint_every}")
    shard, device = init_from_env(device)
    if out is not None and shard.is_main and resume_from is None:
        out = check_out_dir(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QdmError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    torch_dtype = parse_dtype(dtype, device)
    sae_specs = [sae] if isinstance(sae, (str, Path)) else list(sae or [])
    if hook is not None and len(sae_specs) > 1:
        raise QdmError("--hook applies to a single SAE; with several --sae each is read at its own hook_name")
    log = log if shard.is_main else (lambda _m: None)
    progress = progress and shard.is_main

    uses_default = (model is None and gguf_file is None) or not sae_specs or text is None
    default = _default_components() if uses_default else None
    if text is None:
        text = str(default.DEFAULT_TEXT)
    text = call["text"] = corpus.describe(str(text))  # an absolute path: a resumed run reads the same text
    from_stdin = text == corpus.STDIN
    if resume_from is not None and from_stdin:
        text_str = ""  # standard input was read once; its ids are in the state
    else:  # fail fast on a bad text, before any model loads
        text_str = corpus.head(text, 20000, text_field)
        if not text_str:
            raise QdmError(f"text '{text}' is empty (no non-blank lines); pass --text a file with text in it")
    calib_str = read_text(calib_text, flag="--calib-text") if calib_text is not None else None
    check_model_source(model, gguf_file)
    saes = [load_sae(s, device=device) for s in (sae_specs or [default.DEFAULT_SAE_DIR])]  # before the model

    lm, tok, model_id = load_lm(model, gguf_file, torch_dtype, device, trust_remote_code, progress)
    hooks = [hook or s.hook_name for s in saes]
    n_layers = len(decoder_layers(lm))
    for s, h in zip(saes, hooks):
        parse_hook(h, n_layers)
        width = site_width(lm, decoder_layers(lm), h)
        if s.d_in != width:
            what = "d_model" if width == model_id["d_model"] else f"width at {h}"
            raise QdmError(
                f"SAE d_in {s.d_in} does not match the model's {what} {width}; "
                "pass an SAE trained on this model"
            )
    if any(not isinstance(c, FP) for c in conditions) or prune_matched or matches:
        find_targets(lm)  # compression needs the decoder-layer linears: fail before any forward pass
    for c in conditions + [t for _m, _n, t in matches]:
        if isinstance(c, Checkpoint):
            c.check(lm, tok, text_str or tok.decode(resumable.load_tokens(out)[0, 1:].tolist()))  # tokenizer on the audit text, depth, width, parameter shapes
        else:
            c.check(lm)  # group sizes, block sizes and patterns against this model's widths
    if tokens == "auto":  # a few minutes for an INT8..INT4 sweep of a ~100M model on 2 CPU cores
        tokens = 8192 if device == "cpu" else 131072
    if resume_from is not None and from_stdin:
        ids = resumable.load_tokens(out)
        mask = torch.ones(ids.shape, dtype=torch.bool)
        bos_id = tok.bos_token_id if bos else None
        if bos_id is not None:
            mask[:, 0] = False
        blocks = TokenBlocks(ids, mask, bos_id, int(ids.numel()))
    else:
        blocks = corpus.stream_blocks(tok, text, block_len, tokens, bos, field=text_field)
    if batch_size == "auto":
        batch_size = auto_batch_size(lm, block_len, device)
    ids_sha = corpus.ids_sha256(blocks.ids)
    state = None
    if out is not None and not keep_batches:  # checkpoints, and the fingerprint a resume must match
        call.update(tokens=tokens, batch_size=batch_size, device=device)
        fp = resumable.fingerprint(lm, model_id, saes, hooks, ids_sha, blocks.n_blocks, shard.world)
        state = resumable.begin(out, call, fp, shard, checkpoint_every, resuming=resume_from is not None)
        if from_stdin and resume_from is None and shard.is_main:
            resumable.save_tokens(out, blocks.ids)
        if resume_from is not None:
            log(f"resuming {out}: {len(state.finished)} of {len(conditions)} conditions and "
                f"{'all' if state.fp and state.fp['finished'] else (state.fp or {}).get('done', 0)} FP batches "
                "were checkpointed")
    taken: set[str] = set()
    tags = [_tag(s, taken) for s in saes]
    for s, h, t in zip(saes, hooks, tags):
        log(f"auditing {model_id['source']} at {h} with SAE {t} ({s.architecture}, {s.d_sae} features)")
    log(f"{blocks.n_blocks * blocks.block_len} tokens ({blocks.scored_positions} scored) in {blocks.n_blocks} "
        f"blocks of {blocks.block_len}, {len(conditions) + bool(prune_matched) + len(matches)} conditions, "
        f"device {device}, "
        f"{model_id['dtype']}" + (f", {shard.world} processes" if shard.world > 1 else ""))

    calib, calib_ids = None, None
    needs_calib = any(getattr(c, "calibration", False) for c in conditions)
    if prune_matched or matches or needs_calib:
        calib_budget = max(block_len, calib_tokens)
        calib = (make_blocks(tok, calib_str, block_len, calib_budget, bos) if calib_str is not None
                 else _held_out_blocks(tok, text, block_len, calib_budget, bos, blocks.n_blocks, text_field))
        calib_ids = CalibrationTokens(calib.ids.clone(), hashlib.sha256(calib.ids.numpy().tobytes()).hexdigest(),
                                      str(calib_text or text))
        conditions = [dataclasses.replace(c, calib=calib_ids) if getattr(c, "calibration", False) else c
                      for c in conditions]
    if prune_matched:
        conditions.append(match_pruning(lm, RTN(_bits_of(prune_matched)), calib, batch_size, device, log=log))
    for spec, _name, target in matches:
        target = next((c for c in conditions if c.name == target.name), target)  # calibrated when it needs it
        conditions.append(match_method(lm, spec, target, calib, calib_ids, batch_size, device, log=log))

    restore = state.install_signals(log) if state is not None else (lambda: None)
    try:
        runs = run_conditions(lm, saes, hooks, blocks, conditions, batch_size, device, progress, ppl, shard,
                              keep_batches, topk=topk, units=boot_units, splice=splice, recon=recon, state=state, cache=cache, log=log,
                              cache_dir=resumable.cache_folder(out, cache_dir) if state is not None else cache_dir,
                              release_base=True)  # lm is not used afterwards
    finally:
        restore()
    summary, features = _tables(runs, tags, thresholds, blocks.scored_positions, ppl)
    extra = _uncertainty_and_topk(runs, tags, summary, features, thresholds, blocks, tok, boot_units > 0)
    config = {
        "qdm_engine_version": __version__,
        "started": started,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "command": sys.argv,
        "versions": _versions(),
        "model": model_id,
        "sae": saes[0].identity,
        "hook": hooks[0],
        "saes": [{"tag": t, "hook": h, **s.identity} for s, h, t in zip(saes, hooks, tags)],
        "tokens": {
            "text": str(text),
            "text_field": text_field if corpus.kind(text) != "file" or text.endswith((".jsonl", ".parquet")) else None,
            "text_sha256": _text_sha256(text, text_field),
            "ids_sha256": ids_sha,  # the token ids audited (the blocks, BOS included), as little-endian int64
            "text_tokens": blocks.text_tokens,
            "budget": tokens,
            "block_len": blocks.block_len,
            "n_blocks": blocks.n_blocks,
            "positions": blocks.n_blocks * blocks.block_len,
            "scored_positions": blocks.scored_positions,
            "bos": bos,
            "bos_token_id": blocks.bos_id,
            "ppl_targets": blocks.ppl_targets if ppl else 0,
            "calibration": None if calib is None else {
                "text": str(calib_text or text), "blocks": calib.n_blocks, "tokens": calib_ids.n_tokens,
                "sha256": calib_ids.sha256,
                "disjoint": "separate text" if calib_text else f"the {calib.n_blocks} blocks after the audit blocks"},
        },
        "conditions": [dict(name=c.name, spec=spec_of(c), **c.describe()) for c in conditions],
        "thresholds": thresholds.to_dict(),
        "perplexity": ppl,
        "splice": splice,
        "batch_size": batch_size,
        "fp_cache": cache,
        "fp_cache_place": runs[0].fp_cache,  # gpu, host or disk (what auto chose)
        "checkpoint_every": checkpoint_every,
        "resumed": resume_from is not None,
        "checkpoints": None if state is None else {"saves": state.saves, "seconds": round(state.save_seconds, 3)},
        "device": device,
        "processes": shard.world,
        "dtype": model_id["dtype"],
        "notes": [summary.attrs["note"]] if summary.attrs.get("note") else [],
    }
    if state is not None and shard.world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank's last checkpoint is written before the state folder goes
    written = write_run(out, config, summary, features, extra, partial_ok=state is not None) \
        if out is not None and shard.is_main else None
    if state is not None and shard.is_main:
        resumable.finish(out, cache_dir)
    return SweepResult(summary, features, config, written, runs if keep_batches else [], extra.get("topk"))


def _uncertainty_and_topk(runs, tags, summary, features, th, blocks, tok, boot=True) -> dict[str, pd.DataFrame]:
    """Bootstrap intervals into the tables (in place, with a warning for features firing too rarely), and
    the run folder's topk and tokens tables (none under several processes)."""
    from qdm_engine.analysis.uncertainty import add_intervals, few_fires_warning
    from qdm_engine.engine.topk import token_table, topk_table

    multi = len(tags) > 1
    units = {(f"{t}/{r.name}" if multi else r.name): r.unit_moments[i].numpy()
             for r in runs[1:] if r.unit_moments for i, t in enumerate(tags)}
    add_intervals(summary, features, {k: v for k, v in units.items() if boot}, th)
    if features:
        name, table = max(features.items(), key=lambda kv: np.nan_to_num(  # the widest intervals
            (kv[1]["r_hi"] - kv[1]["r_lo"])[kv[1]["active"]].median(), nan=-1.0))
        warning = few_fires_warning(table, blocks.scored_positions, blocks.n_blocks * blocks.block_len, where=name)
        if warning:
            summary.attrs["note"] = warning  # printed under the table by the CLI, kept in config.json
    if not runs[0].topk:
        return {}
    return {"topk": topk_table(runs, tags), "tokens": token_table(blocks, tok)}


def _match_target(name: str, conditions: list):
    """The condition a `--match` is matched to: one of the sweep's by name, or intB (RTN B bits)."""
    for c in conditions:
        if c.name == name:
            return c
    if name.startswith("int") and name[3:].isdigit():
        return RTN(int(name[3:]))
    raise QdmError(f"--match ...@{name}: no condition named {name} in this sweep; use intB or one of "
                   f"{', '.join(c.name for c in conditions) or 'the --bits/--method conditions'}")


def _bits_of(name: str) -> int:
    if not str(name).startswith("int") or not str(name)[3:].isdigit():
        raise QdmError(f"--prune-matched takes an RTN condition like int6, got '{name}'")
    return int(str(name)[3:])


def _text_sha256(text: str, field: str) -> str | None:
    """sha256 of a text file's joined non-blank lines (as ever); None for a folder, stdin or a dataset,
    whose audited tokens are fingerprinted by ids_sha256 alone (they may be far larger than what is read)."""
    from qdm_engine.engine import corpus

    if corpus.kind(text) != "file":
        return None
    h, first = hashlib.sha256(), True
    for line in corpus.lines(text, field):
        h.update((line if first else "\n" + line).encode())
        first = False
    return h.hexdigest()


def _held_out_blocks(tok, text, block_len, budget, bos, audit_blocks, field="text"):
    from qdm_engine.engine.corpus import stream_blocks

    try:
        return stream_blocks(tok, text, block_len, budget, bos, skip_blocks=audit_blocks, field=field)
    except QdmError as exc:
        raise QdmError(f"no held-out text left after the audit tokens for --prune-matched ({exc}); "
                       "pass --calib-text FILE or lower --tokens") from exc


def _tables(runs: list[ConditionRun], tags: list[str], th: Thresholds, scored: int,
            ppl: bool = True) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    fp_run, cond_runs = runs[0], runs[1:]
    fp_ppl = perplexity(fp_run.nll, fp_run.n_targets) if ppl else float("nan")
    multi = len(tags) > 1
    rows, features = [], {}
    for i, tag in enumerate(tags):
        key = (lambda name: f"{tag}/{name}") if multi else (lambda name: name)
        tables = {r.name: feature_table(r.moments[i], th) for r in cond_runs}
        features.update({key(name): df for name, df in tables.items()})
        fp_active = int(next(iter(tables.values()))["active"].sum())  # FP statistics are the same in every table
        rows.append({"sae": tag, "condition": key("fp"), "method": "fp", "ppl": fp_ppl, "dppl_pct": 0.0 if ppl else None,
                     "n_active": fp_active, "n_tokens": scored, "seconds": fp_run.seconds, **_sae_metrics(fp_run, i)})
        for r in cond_runs:
            c_ppl = perplexity(r.nll, r.n_targets) if ppl else float("nan")
            desc = r.condition.describe()
            rows.append({
                "sae": tag, "condition": key(r.name), "method": desc["method"], "bits": desc.get("bits"),
                "sparsity": desc.get("sparsity"), "ppl": c_ppl, "dppl_pct": 100.0 * (c_ppl / fp_ppl - 1.0),
                **summarize(tables[r.name]), "n_tokens": int(r.moments[i].n), "seconds": r.seconds,
                "compress_seconds": r.compress_seconds, **_sae_metrics(r, i),
            })
    summary = pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS)
    for col in ("bits", "undefined_n"):  # whole numbers with gaps (the FP row): nullable ints, not floats
        summary[col] = summary[col].astype("Int64")
    return summary, features


def _sae_metrics(run: ConditionRun, i: int) -> dict:
    """SAE i's reconstruction (and spliced-loss) metrics on the model of `run`."""
    out = dict(run.recon[i]) if i < len(run.recon) else {}
    out.update(run.splice[i] if i < len(run.splice) else {})
    return out


def format_summary(summary: pd.DataFrame) -> str:
    """The printed table: Table 1's columns, one line per condition."""
    w = max(14, 2 + int(summary["condition"].str.len().max()))
    # The SAE's explained variance and (with --splice) CE loss score on each model: shown when measured.
    extra = [(c, h) for c, h in (("explained_variance", "expl var"), ("ce_loss_score", "CE score"))
             if c in summary.columns and summary[c].notna().any()]
    head = f"{'condition':<{w}}{'bits':>5}{'PPL':>10}{'dPPL %':>9}{'mean r':>8}{'med r':>8}" \
           f"{'surv %':>8}{'degr %':>8}{'dam %':>8}{'active':>8}{'undef':>6}{'tokens':>9}" \
           + "".join(f"{h:>10}" for _c, h in extra)
    lines = [head, "-" * len(head)]

    def f(v, spec: str) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
            return ""
        return format(int(v) if spec == "d" else float(v), spec)

    for row in summary.to_dict(orient="records"):
        lines.append(
            f"{row['condition']:<{w}}{f(row['bits'], 'd'):>5}{f(row['ppl'], '.3f'):>10}{f(row['dppl_pct'], '+.2f'):>9}"
            f"{f(row['mean_r'], '.3f'):>8}{f(row['median_r'], '.3f'):>8}{f(row['survived_pct'], '.2f'):>8}"
            f"{f(row['degraded_pct'], '.2f'):>8}{f(row['damaged_pct'], '.2f'):>8}{f(row['n_active'], 'd'):>8}"
            f"{f(row['undefined_n'], 'd'):>6}{f(row['n_tokens'], 'd'):>9}"
            + "".join(f"{f(row[c], '.4f'):>10}" for c, _h in extra)
        )
    return "\n".join(lines)
