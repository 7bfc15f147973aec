"""A sweep's checkpoints: what the run loop has finished, saved so an interrupted sweep can continue.

The state lives in the unfinished run folder, under `RUN_DIR/.partial/` (a folder never has summary.csv
until it is complete): `state-rank<r>.pt`, one per process, rewritten atomically (a temporary file, then a
rename) with `torch.save` of plain tensors, numbers and strings, so `torch.load(weights_only=True)` reads it.
It holds the FP pass's progress (NLL sum, target count, top-k keys), every finished condition (its NLL,
merged and per-unit packed moments, top-k activations) and the condition in progress after its last
checkpointed batch (per-unit packed moments, NLL sum, top-k buffer). Each bootstrap unit's moments are
written once, inside its batch, and pooled only when the condition ends, so continuing at batch b + 1
reduces every number in the same order as an uninterrupted run: the results are bitwise the same.

Checkpoints are taken after the FP pass, after each condition and every `every` batches inside a pass
(every 'auto': the first batch end at least `AUTO_SECONDS` after the last checkpoint). SIGINT and SIGTERM
set a flag; the loop finishes its batch, checkpoints and raises `Interrupted`. Under torch.distributed the
ranks agree on stopping at checkpoint batches (the same batch index on every rank) and at pass ends.

Test-only: QDM_TEST_KILL_AT='<pass>:<batches done>' or '<pass>:end' makes the process SIGKILL itself
right after that point (after any checkpoint due there), to test recovery from kill -9; with a suffix
'=INT' or '=TERM' it sends itself SIGINT or SIGTERM there instead, as a user or a scheduler would.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import torch

from qdm_engine.atomic import current_umask

AUTO_SECONDS = 180.0
STATE_DIR = ".partial"


class Interrupted(Exception):
    """A sweep stopped on SIGINT/SIGTERM after checkpointing; `run_dir` resumes it."""

    def __init__(self, run_dir, signum: int):
        self.run_dir, self.signum = run_dir, signum
        super().__init__(f"interrupted ({signal.Signals(signum).name})")


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, rename into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _host(obj):
    """A copy of a nested structure with every tensor detached on the host."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_host(v) for v in obj]
    return obj


class RunState:
    """The run loop's checkpoints for one process (a no-op when `folder` is None)."""

    def __init__(self, folder: Path | None = None, every: int | str = "auto", rank: int = 0, world: int = 1,
                 run_dir: Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.every, self.rank, self.world, self.run_dir = every, rank, world, run_dir
        self.data: dict = {"version": 1, "fp": None, "finished": {}, "current": None}
        self.stop_signal: int | None = None
        self.last_save = time.perf_counter()
        self.saves, self.save_seconds = 0, 0.0
        self.kill_at = os.environ.get("QDM_TEST_KILL_AT")  # test-only, see the module docstring
        self.sync_every: int | None = None  # under several processes: the agreed checkpoint interval
        self.min_batches: int | None = None  # under several processes: the fewest batches any rank has
        if self.folder is not None and self.path.is_file():
            self.data = torch.load(self.path, weights_only=True)

    @property
    def on(self) -> bool:
        return self.folder is not None

    @property
    def path(self) -> Path:
        return self.folder / f"state-rank{self.rank}.pt"

    # ---- what was saved -----------------------------------------------------------------------------
    @property
    def fp(self) -> dict | None:
        return self.data["fp"]

    @property
    def finished(self) -> dict:
        return self.data["finished"]

    def current(self, name: str) -> dict | None:
        cur = self.data["current"]
        return cur if cur is not None and cur["name"] == name else None

    # ---- signals ------------------------------------------------------------------------------------
    def install_signals(self, log=None):
        """SIGINT/SIGTERM set the stop flag (a second SIGINT stops at once); returns a restore callable."""
        if not self.on:
            return lambda: None
        import threading

        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, _frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signum
            if log:
                log(f"\n{signal.Signals(signum).name}: stopping after the current batch and saving the state "
                    "(Ctrl-C again to stop at once, losing the batches since the last checkpoint)")

        for s in old:
            signal.signal(s, handler)
        return lambda: [signal.signal(s, h) for s, h in old.items()]

    # ---- checkpoints --------------------------------------------------------------------------------
    def _due(self, b: int) -> bool:
        if self.world > 1:
            every = self.sync_every
            return every is not None and (b + 1) % every == 0 and b < (self.min_batches or 0)
        if self.stop_signal is not None:
            return True
        if self.every == "auto":
            return time.perf_counter() - self.last_save >= AUTO_SECONDS
        return (b + 1) % int(self.every) == 0

    def _agree_stop(self) -> bool:
        if self.world == 1:
            return self.stop_signal is not None
        import torch.distributed as dist

        flag = torch.tensor([0 if self.stop_signal is None else self.stop_signal], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) and self.stop_signal is None:
            self.stop_signal = int(flag)
        return bool(int(flag))

    def save(self, t0: float | None = None) -> None:
        """Write the state; `t0` is when taking it began (the device reads and cache sync count too)."""
        t0 = time.perf_counter() if t0 is None else t0
        save_atomic(self.data, self.path)
        self.saves += 1
        self.save_seconds += time.perf_counter() - t0
        self.last_save = time.perf_counter()

    def tick(self, where: str, b: int, snapshot) -> None:
        """After batch b of pass `where`: checkpoint when due (`snapshot()` gives what to store as
        data['fp'] for the FP pass, else data['current']), stop when asked."""
        if not self.on:
            return
        if self._due(b):
            t0 = time.perf_counter()
            stop = self._agree_stop()
            self.data["fp" if where == "fp" else "current"] = _host(snapshot())
            self.save(t0)
            if stop:
                raise Interrupted(self.run_dir, self.stop_signal)
        self._test_kill(f"{where}:{b + 1}")

    def pass_done(self, where: str, record: dict | None) -> None:
        """After pass `where` ends: store its result (the FP state, or a finished condition) and stop if asked."""
        if not self.on:
            return
        t0 = time.perf_counter()
        if where == "fp":
            self.data["fp"] = _host(record)
        else:
            self.data["finished"][where] = _host(record)
            self.data["current"] = None
        self.save(t0)
        self._test_kill(f"{where}:end")
        if self._agree_stop():
            raise Interrupted(self.run_dir, self.stop_signal)

    def _test_kill(self, point: str) -> None:
        if self.kill_at is None or self.kill_at.split("=")[0] != point:
            return
        name = self.kill_at.partition("=")[2] or "KILL"
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
