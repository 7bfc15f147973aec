"""Resumable sweeps: the saved call and fingerprint of an unfinished run folder, and `resume_sweep`.

At the start of the model loop a sweep with a results folder writes `RUN_DIR/.partial/sweep.json`: the
sweep's arguments with every 'auto' resolved (token budget, batch size, device; the text as an absolute
path) and a fingerprint of what it audits: the model (architecture and a sample of every parameter), each
SAE (identity and a sample of its weights), the token ids, the code that computes the numbers
(qdm-engine's version and a hash of its engine and kernels sources) and the number of processes.
`qdm-engine sweep --resume RUN_DIR` calls the sweep again with those arguments (they are the source of
truth: no others are taken) and refuses, naming what differs, when the fingerprint does not match.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from qdm_engine import __version__
from qdm_engine.atomic import replace_file
from qdm_engine.engine.state import STATE_DIR, RunState
from qdm_engine.errors import QdmError

LAST_RUN: dict = {}  # the run folder of the sweep in progress, for the CLI's message on a hard Ctrl-C
_NOT_SAVED = ("out", "progress", "log", "keep_batches", "resume_from")


def state_dir(run_dir) -> Path:
    return Path(run_dir) / STATE_DIR


def is_unfinished(run_dir) -> bool:
    return (state_dir(run_dir) / "sweep.json").is_file()


def _sample_sha(tensors) -> str:
    """sha256 of the names, shapes, dtypes and up to 4096 evenly spaced values of each tensor (cheap on a
    model of billions of parameters, and any retrained or re-quantized tensor changes its samples)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach()
        flat = t.reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def code_sha() -> str:
    """sha256 of the sources that compute a sweep's numbers (qdm_engine/engine, qdm_engine/kernels)."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for p in sorted([*(root / "engine").rglob("*.py"), *(root / "kernels").rglob("*.py")]):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def fingerprint(lm, model_id: dict, saes, hooks, ids_sha: str, n_blocks: int, world: int) -> dict:
    # how it was named and how long it took to load are not what it is (a resumed run names local paths
    # absolutely); the weights sample is
    ident = {k: v for k, v in model_id.items() if k not in ("load", "source", "load_seconds")}
    return {
        "model": {**ident, "weights_sample_sha256": _sample_sha(lm.named_parameters())},
        "sae": [{"hook": h, "source": s.identity.get("source"), "architecture": s.architecture, "d_sae": s.d_sae,
                 "weights_sample_sha256": _sample_sha([(n, getattr(s, n)) for n in ("W_enc", "b_enc", "b_dec",
                                                                                    "threshold")
                                                      if getattr(s, n, None) is not None])}
                for s, h in zip(saes, hooks)],
        "tokens": {"ids_sha256": ids_sha, "n_blocks": n_blocks},
        "code": {"qdm_engine_version": __version__, "engine_sha256": code_sha()},
        "processes": world,
    }


_WHAT = {"model": "the model", "sae": "the SAE", "tokens": "the tokens (the audit text changed)",
         "code": "the code version", "processes": "the number of processes (resume with the same world size)"}


def check_fingerprint(run_dir, saved: dict, now: dict) -> None:
    for key, what in _WHAT.items():
        if saved.get(key) != now.get(key):
            a, b = _first_difference(saved.get(key), now.get(key))
            raise QdmError(f"cannot resume '{run_dir}': {what} differs from the run's ({a}, now {b}); "
                           "start a new sweep with a new --out")


def _first_difference(a, b, where: str = "") -> tuple[str, str]:
    """'saved <path>: <value>' and '<value>' at the first place two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    short = lambda v: (lambda s: s if len(s) <= 24 else s[:16] + "…")(json.dumps(v))  # noqa: E731
    return f"saved {where + ' ' if where else ''}{short(a)}", short(b)


_PATHS = ("model", "sae", "gguf_file", "calib_text", "cache_dir", "compressed")


def _absolute(key: str, v):
    """Local paths made absolute, so a resume from another directory reads the same files."""
    import os

    if isinstance(v, (list, tuple)):
        return [_absolute(key, x) for x in v]
    if not isinstance(v, (str, Path)) or key not in _PATHS:
        return v
    name, eq, path = str(v).rpartition("=") if key == "compressed" and "=" in str(v) else ("", "", str(v))
    full = os.path.expanduser(path)
    return f"{name}{eq}{os.path.abspath(full)}" if os.path.exists(full) else v


def _jsonable(v):
    if is_dataclass(v):
        return asdict(v)
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def begin(run_dir, call: dict, fp: dict, shard, every, resuming: bool) -> RunState:
    """Create (or, resuming, check) the unfinished run folder's state; the loop's RunState for this rank."""
    run_dir = Path(run_dir)
    folder = state_dir(run_dir)
    if resuming:
        saved = json.loads((folder / "sweep.json").read_text())
        check_fingerprint(run_dir, saved["fingerprint"], fp)
    elif shard.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        args = {k: _absolute(k, _jsonable(v)) for k, v in call.items() if k not in _NOT_SAVED}
        replace_file(folder / "sweep.json", json.dumps({"kwargs": args, "fingerprint": fp}, indent=2, default=str)
                     + "\n")
    if shard.world > 1:
        import torch.distributed as dist

        dist.barrier()  # the folder exists before any rank writes into it
    LAST_RUN["run_dir"] = run_dir
    return RunState(folder, every, shard.rank, shard.world, run_dir)


def cache_folder(run_dir, cache_dir) -> Path:
    """Where a disk FP cache lives: the state folder, or a folder of --cache-dir named after the run."""
    if cache_dir is None:
        return state_dir(run_dir)
    key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"qdm-fp-cache-{Path(run_dir).name}-{key}"


def finish(run_dir, cache_dir) -> None:
    """After the complete folder is in place: the cache kept under --cache-dir goes too."""
    LAST_RUN.clear()
    if cache_dir is not None:
        shutil.rmtree(cache_folder(run_dir, cache_dir), ignore_errors=True)


def save_tokens(run_dir, ids: torch.Tensor) -> None:
    """Standard input cannot be read again: its audit ids are kept with the state."""
    from qdm_engine.engine.state import save_atomic

    save_atomic({"ids": ids}, state_dir(run_dir) / "tokens.pt")


def load_tokens(run_dir) -> torch.Tensor:
    return torch.load(state_dir(run_dir) / "tokens.pt", weights_only=True)["ids"]


def resume_sweep(run_dir, progress: bool = True, log=print):
    """Finish the unfinished sweep in `run_dir` with the arguments it started with; None if it is complete."""
    from qdm_engine.analysis.taxonomy import Thresholds
    from qdm_engine.audit import sweep

    run_dir = Path(run_dir).expanduser()
    if (run_dir / "summary.csv").is_file():
        return None
    if not is_unfinished(run_dir):
        raise QdmError(f"'{run_dir}' is not an unfinished sweep (no {STATE_DIR}/sweep.json); pass the --out of an "
                       "interrupted sweep to --resume")
    LAST_RUN["run_dir"] = run_dir  # a hard Ctrl-C while it loads still points at the resume command
    kwargs = json.loads((state_dir(run_dir) / "sweep.json").read_text())["kwargs"]
    kwargs["thresholds"] = Thresholds(**kwargs["thresholds"])
    return sweep(**kwargs, out=run_dir, progress=progress, log=log, resume_from=run_dir)
