"""Train and evaluate a residual-stream SAE with SAELens' own training code.

`train_sae` is a thin wrapper over SAELens: it builds a local `datasets.Dataset` from a text file,
caches the read-out activations to disk in batches with `CacheActivationsRunner` (so the language
model runs once over the text, not once per epoch), trains a standard ReLU SAE with
`LanguageModelSAETrainingRunner` on those cached activations, evaluates it on held-out text with
`evaluate_sae`, and writes a SAELens-format folder (`cfg.json`, `sae_weights.safetensors`) plus
`metrics.json`. SAELens wraps the HF model as `HookedProxyLM`, whose hook names are HF module paths
(`model.layers.L`); the saved cfg is rewritten to the TransformerLens name (`blocks.L.hook_resid_post`)
that qdm-engine and SAELens' pretrained SAEs use, and the HF path is kept in `metadata.hf_hook_name`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qdm_engine.atomic import apply_umask, temp_dir_beside
from qdm_engine.engine.models import HOOK_RE, StopForward, decoder_layers_path, stop_after
from qdm_engine.engine.perplexity import nll_sum
from qdm_engine.engine.tokens import read_text
from qdm_engine.errors import QdmError

# The default training and held-out texts ship with the package (prefixes of WikiText-2-raw's train and
# validation splits, CC BY-SA 3.0; see data/wikitext-2-raw/ATTRIBUTION.md): the default SAE was made from them.
_WIKITEXT = Path(__file__).resolve().parent.parent / "data" / "wikitext-2-raw"
DEFAULT_TRAIN_TEXT = _WIKITEXT / "wiki.train.raw.prefix-1MB.nonblank.txt"
DEFAULT_EVAL_TEXT = _WIKITEXT / "wiki.valid.raw.prefix-100KB.nonblank.txt"
STORE_BATCH = 8  # blocks per model batch while caching activations (the cache holds whole batches)


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[qdm-engine train-sae] {message}", file=sys.stderr, flush=True)


def parse_resid_post_hook(hook: str) -> int:
    """Layer index of a `blocks.L.hook_resid_post` name; the only read-out site training supports."""
    match = HOOK_RE.match(hook or "")
    if match is None or match.group(2) != "post":
        raise QdmError(
            f"unsupported hook {hook!r}: train-sae reads the residual stream, give blocks.L.hook_resid_post"
        )
    return int(match.group(1))


def hf_hook_name(model: torch.nn.Module, hook: str) -> str:
    """HF module path whose output is the TransformerLens `blocks.L.hook_resid_post` (hidden_states[L+1])."""
    layer = parse_resid_post_hook(hook)
    n_layers = model.config.num_hidden_layers
    if layer >= n_layers:
        raise QdmError(f"hook {hook!r} names layer {layer}, but the model has {n_layers} layers (0..{n_layers - 1})")
    return f"{decoder_layers_path(model)}.{layer}"


def read_text_lines(path: str | os.PathLike[str]) -> list[str]:
    """Non-blank lines of a UTF-8 text file, as the audit reads WikiText."""
    return read_text(path).split("\n")


def text_dataset(path: str | os.PathLike[str], lines_per_row: int = 64, lines: list[str] | None = None) -> Any:
    """A local `datasets.Dataset` with a `text` column: the file's non-blank lines, newline-joined.

    Rows of `lines_per_row` lines keep the token stream close to the audit's (lines joined by "\\n")
    while letting SAELens tokenize row by row; no separator token is put between rows. `lines`, when
    given, are the already-read lines of `path`.
    """
    from datasets import Dataset

    lines = read_text_lines(path) if lines is None else lines
    rows = ["\n".join(lines[i : i + lines_per_row]) + "\n" for i in range(0, len(lines), lines_per_row)]
    return Dataset.from_dict({"text": rows})


def resolve_model_dir(
    model: str | os.PathLike[str] | None, gguf_file: str | os.PathLike[str] | None, work: Path, progress: bool
) -> tuple[Path, dict[str, Any]]:
    """A local HF model folder for SAELens to load, and how it was obtained."""
    from qdm_engine.engine.default import DEFAULT_MODEL_ID, load_default_model, load_gguf_model

    if model is not None and gguf_file is not None:
        raise QdmError("give either a model folder or a GGUF file, not both")
    if gguf_file is not None:
        gguf = Path(gguf_file)
        _log(progress, f"dequantizing {gguf}")
        hf_model, tokenizer = load_gguf_model(gguf)
        target = work / "model"
        hf_model.save_pretrained(str(target))
        tokenizer.save_pretrained(str(target))
        return target, {"model_id": str(gguf), "source": "gguf"}
    if model is None:
        _, _, info = load_default_model(progress=progress)
        return Path(info["cache_dir"]), {"model_id": DEFAULT_MODEL_ID, "source": "default", **info}
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise QdmError(f"model folder '{model}' has no config.json; pass to --model a local HF model folder "
                       "(train-sae makes no hub downloads)")
    return path, {"model_id": str(path), "source": "folder"}


def cache_blocks(n_text_tokens: int, tokens: int, context_size: int, store_batch: int = STORE_BATCH) -> int:
    """Blocks of `context_size` positions whose activations are cached: as many as `tokens` activations
    need (whole store batches, one batch at least), and no more than the text gives.

    Training then runs for `tokens` activations, several epochs over the cache when the text is short.
    """
    text_blocks = n_text_tokens // (context_size - 1)  # BOS + (context_size - 1) text tokens per block
    wanted = -(-tokens // context_size)
    wanted = max(store_batch, -(-wanted // store_batch) * store_batch)
    n = min(text_blocks, wanted)
    return n - n % store_batch


def check_train_inputs(
    *, model, gguf_file, hook: str, width: int | None, text, eval_text, tokens: int, out, eval_tokens: int | None,
    context_size: int, batch_tokens: int, weights_dtype: str, work_dir,
) -> tuple[str, str | None]:
    """Every train-sae input that can be checked without the model, with a message naming its flag.

    Returns the training text and the held-out text (None without one), read and checked.
    """
    from qdm_engine.engine.models import check_model_source

    for flag, value in (("--tokens", tokens), ("--context-size", context_size), ("--batch-tokens", batch_tokens),
                        ("--width", width), ("--eval-tokens", eval_tokens)):
        if value is not None and value <= 0:
            raise QdmError(f"{flag} must be positive, got {value}")
    if context_size < 2:
        raise QdmError(f"--context-size must be at least 2 (BOS and one token), got {context_size}")
    if tokens < batch_tokens:
        raise QdmError(f"--tokens {tokens} is less than one training step (--batch-tokens {batch_tokens}); "
                       "raise --tokens or lower --batch-tokens")
    if weights_dtype not in ("float16", "bfloat16", "float32"):
        raise QdmError(f"--weights-dtype must be float16, bfloat16 or float32, got {weights_dtype!r}")
    parse_resid_post_hook(hook)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QdmError(f"output folder {out} is not empty; give --out a new or empty folder")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise QdmError(f"cannot write to '{parent}'; give --out in a writable folder")
    if work_dir is not None and Path(work_dir).expanduser().exists() and not Path(work_dir).expanduser().is_dir():
        raise QdmError(f"--work-dir '{work_dir}' is a file; give a folder")
    if model is not None and gguf_file is not None:
        raise QdmError("give either a model folder or a GGUF file, not both (--model or --gguf-file)")
    check_model_source(model, gguf_file)
    if model is not None and not (Path(model).expanduser() / "config.json").is_file():
        raise QdmError(f"model folder '{model}' has no config.json; pass to --model a local HF model folder "
                       "(train-sae makes no hub downloads)")
    train_str = read_text(text, flag="--text")
    eval_str = read_text(eval_text, flag="--eval-text") if eval_text is not None else None
    return train_str, eval_str


def train_sae(
    model: str | os.PathLike[str] | None = None,
    gguf_file: str | os.PathLike[str] | None = None,
    hook: str = "blocks.14.hook_resid_post",
    width: int | None = None,
    text: str | os.PathLike[str] = DEFAULT_TRAIN_TEXT,
    tokens: int = 2_097_152,
    seed: int = 0,
    out: str | os.PathLike[str] = "sae-out",
    eval_text: str | os.PathLike[str] | None = DEFAULT_EVAL_TEXT,
    eval_tokens: int | None = None,
    ce_tokens: int = 8192,
    context_size: int = 256,
    batch_tokens: int = 1024,
    lr: float = 1e-3,
    l1_coefficient: float = 4.0,
    lr_warm_up_steps: int | None = None,
    weights_dtype: str = "float16",
    work_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a standard ReLU SAE on `hook` of a causal LM with SAELens; write it to `out`.

    The text is tokenized once and cut into `context_size` blocks that start with BOS; the read-out
    activations of the blocks that `tokens` activations need (at most the whole text) are cached to
    disk (SAELens `CacheActivationsRunner`, in batches), and SAELens trains for `tokens` activation
    vectors (several epochs when the text is shorter), skipping BOS positions. Activations are scaled
    to mean squared norm d_in during training and the scale is folded back into the weights.

    Every input is checked before the model loads, and the texts' lengths before any activation is
    cached. `out` is written under a temporary name beside it and renamed when complete, so a failed
    run leaves nothing there. Returns the metrics written to `out/metrics.json`.
    """
    train_str, eval_str = check_train_inputs(
        model=model, gguf_file=gguf_file, hook=hook, width=width, text=text, eval_text=eval_text, tokens=tokens,
        out=out, eval_tokens=eval_tokens, context_size=context_size, batch_tokens=batch_tokens,
        weights_dtype=weights_dtype, work_dir=work_dir,
    )
    try:
        import datasets
        from sae_lens import (
            CacheActivationsRunner,
            CacheActivationsRunnerConfig,
            LanguageModelSAERunnerConfig,
            LanguageModelSAETrainingRunner,
            LoggingConfig,
            StandardTrainingSAEConfig,
        )
        from sae_lens.load_model import HookedProxyLM
    except ImportError as exc:
        raise QdmError(f"train-sae needs SAELens and datasets ({exc.name} is missing): "
                       "pip install 'qdm-engine[sae]' datasets") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out).expanduser()
    torch.manual_seed(seed)
    datasets.disable_progress_bars() if not progress else None
    started = time.perf_counter()
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="qdm-train-sae-")) if own_work else Path(work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    staging: Path | None = None  # the output folder under a temporary name, renamed onto `out` when complete
    try:
        model_dir, model_info = resolve_model_dir(model, gguf_file, work, progress)
        hf_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        hf_hook = hf_hook_name(hf_model, hook)
        d_in = int(hf_model.config.hidden_size)
        d_sae = int(width) if width is not None else 8 * d_in
        if d_sae <= 0:
            raise QdmError(f"width must be positive, got {width}")
        bos = tokenizer.bos_token_id
        if bos is None:
            raise QdmError("the tokenizer has no BOS token; train-sae prepends BOS to every block")

        dataset = text_dataset(text, lines=train_str.split("\n"))
        n_text_tokens = sum(len(tokenizer(row, add_special_tokens=False)["input_ids"]) for row in dataset["text"])
        store_batch = STORE_BATCH
        n_blocks = cache_blocks(n_text_tokens, tokens, context_size, store_batch)
        if n_blocks < store_batch:
            raise QdmError(f"--text {text} gives only {n_text_tokens} tokens; need at least "
                           f"{store_batch * (context_size - 1)} (or a smaller --context-size)")
        if eval_str is not None:
            n_eval = len(tokenizer(eval_str, add_special_tokens=False)["input_ids"])
            if n_eval < context_size - 1:
                raise QdmError(f"--eval-text {eval_text} gives only {n_eval} tokens, less than one block of "
                               f"{context_size}; give a longer --eval-text or a smaller --context-size")
        cache_tokens = n_blocks * context_size
        _log(progress, f"{n_text_tokens} text tokens; caching {n_blocks} blocks of {context_size} (BOS first)")

        acts_dir = work / "activations"
        stamp_path = work / "activations.json"
        stamp = {"model": str(model_dir), "hook": hf_hook, "text": str(Path(text).resolve()),
                 "context_size": context_size, "positions": cache_tokens, "seed": seed}
        t0 = time.perf_counter()
        if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp and acts_dir.is_dir():
            # A work_dir from an earlier run with the same model, hook, text and blocks: reuse its cache.
            _log(progress, f"reusing cached activations in {acts_dir}")
            reused = True
        else:
            reused = False
            _log(progress, f"caching {hook} ({hf_hook}) activations for {cache_tokens} positions")
            if acts_dir.exists():
                shutil.rmtree(acts_dir)
            stamp_path.unlink(missing_ok=True)
            cache_cfg = CacheActivationsRunnerConfig(
                dataset_path=f"local:{Path(text).name}",
                model_name=str(model_dir),
                model_class_name="AutoModelForCausalLM",
                model_batch_size=store_batch,
                hook_name=hf_hook,
                d_in=d_in,
                training_tokens=cache_tokens,
                context_size=context_size,
                new_cached_activations_path=str(acts_dir),
                shuffle=True,
                seed=seed,
                dtype="float32",
                device="cpu",
                prepend_bos=True,
                streaming=False,
                # One buffer = one model batch, so SAELens caches exactly `cache_tokens` positions
                # (it fills whole buffers, looping over the text again when a buffer is larger).
                buffer_size_gb=(store_batch * context_size + 0.5) * d_in * 4 / 1e9,
            )
            CacheActivationsRunner(cache_cfg, override_dataset=dataset).run()
            stamp_path.write_text(json.dumps(stamp) + "\n")
        cache_seconds = time.perf_counter() - t0
        if not reused:
            _log(progress, f"cached activations in {cache_seconds:.0f} s")

        n_steps = tokens // batch_tokens
        warm_up = lr_warm_up_steps if lr_warm_up_steps is not None else min(100, n_steps // 10)
        runner_cfg = LanguageModelSAERunnerConfig(
            sae=StandardTrainingSAEConfig(
                d_in=d_in,
                d_sae=d_sae,
                l1_coefficient=l1_coefficient,
                l1_warm_up_steps=max(1, n_steps // 20),
                apply_b_dec_to_input=True,
                normalize_activations="expected_average_only_in",
                dtype="float32",
                device="cpu",
            ),
            model_name=str(model_dir),
            model_class_name="AutoModelForCausalLM",
            hook_name=hf_hook,
            dataset_path=f"local:{Path(text).name}",
            streaming=False,
            is_dataset_tokenized=False,
            context_size=context_size,
            use_cached_activations=True,
            cached_activations_path=str(acts_dir),
            prepend_bos=True,
            sequence_separator_token=None,
            exclude_special_tokens=[int(bos)],
            training_tokens=n_steps * batch_tokens,
            train_batch_size_tokens=batch_tokens,
            store_batch_size_prompts=store_batch,
            n_batches_in_buffer=64,  # ~131k activations mixed: the cached blocks are in text order
            lr=lr,
            lr_scheduler_name="constant",
            lr_warm_up_steps=warm_up,
            lr_decay_steps=max(1, n_steps // 5),
            adam_beta1=0.9,
            adam_beta2=0.999,
            dead_feature_window=max(50, n_steps // 4),
            feature_sampling_window=max(100, n_steps // 2),
            n_batches_for_norm_estimate=min(100, max(4, n_steps // 10)),
            seed=seed,
            device="cpu",
            dtype="float32",
            logger=LoggingConfig(log_to_wandb=False),
            checkpoint_path=None,
            output_path=str(work / "sae_raw"),
            verbose=progress,
        )
        proxy = HookedProxyLM(hf_model, tokenizer, hook_names=[hf_hook])
        t0 = time.perf_counter()
        _log(progress, f"training {d_sae} features on {n_steps * batch_tokens} activations ({n_steps} steps)")
        # SAELens does not seed; seeding here (not only at the start) makes the SAE's initialisation and
        # batch mixing the same whether the activation cache was just made or reused.
        torch.manual_seed(seed)
        runner = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=proxy)
        sae = runner.run()
        train_seconds = time.perf_counter() - t0
        _log(progress, f"trained in {train_seconds:.0f} s")

        out.parent.mkdir(parents=True, exist_ok=True)
        staging = temp_dir_beside(out)
        sae_dir = write_sae_folder(sae, staging, hook=hook, hf_hook=hf_hook, weights_dtype=weights_dtype,
                                   extra_metadata={"model_name": model_info["model_id"], "context_size": context_size,
                                                   "prepend_bos": True, "exclude_special_tokens": [int(bos)]})
        metrics: dict[str, Any] = {
            "hook_name": hook,
            "hf_hook_name": hf_hook,
            "model": model_info["model_id"],
            "d_in": d_in,
            "d_sae": d_sae,
            "seed": seed,
            "train_text": str(text),
            "train_text_tokens": n_text_tokens,
            "cached_positions": cache_tokens,
            "training_tokens": n_steps * batch_tokens,
            "training_steps": n_steps,
            "epochs": round(n_steps * batch_tokens / cache_tokens, 3),
            "hyperparameters": {
                "architecture": "standard (ReLU)",
                "context_size": context_size,
                "train_batch_size_tokens": batch_tokens,
                "lr": lr,
                "lr_scheduler": "constant",
                "lr_warm_up_steps": warm_up,
                "lr_decay_steps": max(1, n_steps // 5),
                "adam_betas": [0.9, 0.999],
                "l1_coefficient": l1_coefficient,
                "l1_warm_up_steps": max(1, n_steps // 20),
                "normalize_activations": "expected_average_only_in (folded into the weights)",
                "apply_b_dec_to_input": True,
                "decoder_init_norm": 0.1,
                "weights_dtype": weights_dtype,
            },
            "activation_cache_reused": reused,
            "seconds": {"activation_cache": round(cache_seconds, 1), "training": round(train_seconds, 1)},
            "versions": _versions(),
        }
        del runner, proxy
        if eval_text is not None:
            from sae_lens import SAE

            shipped = SAE.load_from_disk(str(sae_dir), device="cpu")
            t0 = time.perf_counter()
            metrics["eval"] = evaluate_sae(
                shipped, hf_model, tokenizer, hook=hook, text=eval_text, context_size=context_size,
                max_tokens=eval_tokens, ce_tokens=ce_tokens, progress=progress,
            )
            metrics["eval"]["weights_roundtrip"] = weights_roundtrip_error(
                sae, shipped, hf_model, tokenizer, hook, eval_text, n_tokens=min(2048, eval_tokens or 2048))
            metrics["seconds"]["evaluation"] = round(time.perf_counter() - t0, 1)
        metrics["seconds"]["total"] = round(time.perf_counter() - started, 1)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        apply_umask(staging)  # safetensors writes its file 0600
        if out.exists():
            out.rmdir()  # empty, checked before training
        os.replace(staging, out)
        staging = None
        _log(progress, f"wrote {out}")
        return metrics
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("sae-lens", "transformers", "torch", "datasets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def write_sae_folder(
    sae: Any, out: Path, hook: str, hf_hook: str, weights_dtype: str, extra_metadata: dict[str, Any]
) -> Path:
    """Save `sae` in SAELens disk format with the TransformerLens hook name and compact weights.

    SAELens writes `cfg.json` + `sae_weights.safetensors`; here the cfg's `dtype` stays float32 (so
    `SAE.load_from_disk` upcasts and encodes in float32) while the stored tensors are `weights_dtype`.
    """
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    weights_path, cfg_path = sae.save_inference_model(str(out))
    cfg = json.loads(Path(cfg_path).read_text())
    metadata = dict(cfg.get("metadata") or {})
    metadata.update(extra_metadata)
    metadata["hook_name"] = hook
    metadata["hf_hook_name"] = hf_hook
    metadata["model_class_name"] = "AutoModelForCausalLM"
    metadata["weights_storage_dtype"] = weights_dtype
    metadata.pop("model_from_pretrained_kwargs", None)
    cfg["metadata"] = metadata
    cfg["dtype"] = "float32"
    Path(cfg_path).write_text(json.dumps(cfg, indent=2) + "\n")
    if weights_dtype != "float32":
        tensors = load_file(str(weights_path))
        target = getattr(torch, weights_dtype)
        save_file({k: v.to(target).contiguous() for k, v in tensors.items()}, str(weights_path))
    return out


@torch.no_grad()
def _blocks(tokenizer: Any, text: str | os.PathLike[str], context_size: int, max_tokens: int | None) -> torch.Tensor:
    """[n_blocks, context_size] token ids: BOS + (context_size - 1) text tokens per block."""
    ids = tokenizer("\n".join(read_text_lines(text)), add_special_tokens=False)["input_ids"]
    step = context_size - 1
    n = len(ids) // step
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // context_size))
    if n == 0:
        raise QdmError(f"text {text} is shorter than one block of {context_size} tokens")
    body = torch.tensor(ids[: n * step], dtype=torch.long).view(n, step)
    bos = torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long)
    return torch.cat([bos, body], dim=1)


class _Splice:
    """Forward hook replacing a decoder layer's output at non-BOS positions."""

    def __init__(self, fn: Any):
        self.fn = fn
        self.captured: torch.Tensor | None = None

    def __call__(self, module: Any, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        self.captured = hidden.detach()
        if self.fn is None:
            return output
        new = hidden.clone()
        new[:, 1:] = self.fn(hidden[:, 1:])
        return (new, *output[1:]) if isinstance(output, tuple) else new


@torch.no_grad()
def evaluate_sae(
    sae: Any,
    model: Any,
    tokenizer: Any,
    hook: str | None = None,
    text: str | os.PathLike[str] = DEFAULT_EVAL_TEXT,
    context_size: int = 256,
    max_tokens: int | None = None,
    ce_tokens: int = 8192,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Held-out quality of an SAE at `hook` (default: the SAE's own `cfg.metadata.hook_name`).

    Over every non-BOS position of the BOS-led blocks of `text` (up to `max_tokens`):
    L0 (mean active features per token), fraction of variance explained
    `1 - sum|x - x_hat|^2 / sum|x - mean x|^2`, and the fraction of dead features (never active).
    On the first `ce_tokens` positions: mean next-token loss clean, with the SAE reconstruction
    spliced in at the hook, and with the hook output zeroed (both at non-BOS positions only), and
    CE loss recovered `(zero - spliced) / (zero - clean)`.
    """
    hook = hook or sae.cfg.metadata.hook_name
    layer = parse_resid_post_hook(hook)
    module = model.get_submodule(hf_hook_name(model, hook))
    if sae.cfg.d_in != model.config.hidden_size:
        raise QdmError(f"SAE d_in {sae.cfg.d_in} does not match the model's hidden size {model.config.hidden_size}")
    blocks = _blocks(tokenizer, text, context_size, max_tokens)
    n_ce_blocks = max(1, min(len(blocks), math.ceil(ce_tokens / context_size)))
    d_sae = sae.cfg.d_sae
    fires = torch.zeros(d_sae, dtype=torch.long)
    l0_sum = 0.0
    n = 0
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_x2 = 0.0
    sum_err = 0.0
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    n_ce = 0

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return sae.decode(sae.encode(x.float())).to(x.dtype)

    layers_path = decoder_layers_path(model)
    start = time.perf_counter()
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size]
        want_ce = i < n_ce_blocks
        hook_fn = _Splice(None)
        handle = module.register_forward_hook(hook_fn)
        try:
            if want_ce:
                logits = model(batch).logits
            else:
                _run_to_layer(model, batch, hook)
        finally:
            handle.remove()
        x = hook_fn.captured[:, 1:].reshape(-1, sae.cfg.d_in).float()
        feats = sae.encode(x)
        x_hat = sae.decode(feats)
        active = feats > 0
        fires += active.sum(0)
        l0_sum += active.sum().item()
        n += x.shape[0]
        sum_x += x.double().sum(0)
        sum_x2 += x.double().pow(2).sum().item()
        sum_err += (x - x_hat).double().pow(2).sum().item()
        if want_ce:
            take = batch[: max(0, min(len(batch), n_ce_blocks - i))]
            logits = logits[: len(take)]
            ce["clean"] += nll_sum(logits, take)[0]
            for name, fn in (("spliced", reconstruct), ("zero", torch.zeros_like)):
                handle = module.register_forward_hook(_Splice(fn))
                try:
                    ce[name] += nll_sum(model(take).logits, take)[0]
                finally:
                    handle.remove()
            n_ce += take[:, 1:].numel()
        if progress and (i // batch_size) % 10 == 0:
            _log(progress, f"eval {min(i + batch_size, len(blocks))}/{len(blocks)} blocks, {time.perf_counter() - start:.0f} s")
    total_var = sum_x2 - (sum_x.pow(2).sum().item() / n)
    clean, spliced, zero = (ce[k] / n_ce for k in ("clean", "spliced", "zero"))
    return {
        "text": str(text),
        "hook_name": hook,
        "layer": layer,
        "hf_module": layers_path + f".{layer}",
        "positions": n,
        "context_size": context_size,
        "l0": l0_sum / n,
        "fve": 1.0 - sum_err / total_var,
        "dead_fraction": (fires == 0).float().mean().item(),
        "dead_features": int((fires == 0).sum().item()),
        "features_rarer_than_1e-3": int((fires.double() / n <= 1e-3).sum().item()),
        "ce_positions": n_ce,
        "ce_clean": clean,
        "ce_spliced": spliced,
        "ce_zero_ablation": zero,
        "ce_loss_recovered": (zero - spliced) / (zero - clean),
    }


def _run_to_layer(model: Any, batch: torch.Tensor, hook: str) -> None:
    """Run the model until the layer of `hook` has produced its output (hooks on it still fire first)."""
    with stop_after(model, [hook]):
        try:
            model(batch)
        except StopForward:
            pass


@torch.no_grad()
def weights_roundtrip_error(
    trained: Any, shipped: Any, model: Any, tokenizer: Any, hook: str, text: str | os.PathLike[str], n_tokens: int = 2048
) -> dict[str, float]:
    """How much storing the weights compactly changes `encode` on real activations.

    Returns the max absolute difference of feature activations, that maximum relative to the largest
    activation, and the fraction of (token, feature) entries whose active/inactive state flips.
    """
    module = model.get_submodule(hf_hook_name(model, hook))
    blocks = _blocks(tokenizer, text, 256, n_tokens)
    grab = _Splice(None)
    handle = module.register_forward_hook(grab)
    try:
        _run_to_layer(model, blocks, hook)
    finally:
        handle.remove()
    x = grab.captured[:, 1:].reshape(-1, shipped.cfg.d_in).float()
    a = trained.to(torch.float32).encode(x)
    b = shipped.encode(x)
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "max_abs_diff_rel_to_max_act": ((a - b).abs().max() / a.abs().max()).item(),
        "active_flip_fraction": ((a > 0) != (b > 0)).float().mean().item(),
    }
