"""The FP read-out cache of a sweep: the FP pass's scored read-outs, kept per batch for every condition.

`memory`: on the GPU when it takes under half the free memory, else in (pinned) host memory, as before.
`disk`: one file per site and process, `fp-cache-rank<r>-site<i>.bin`, rows in the run loop's order, written
and read with positioned I/O one batch at a time (not memory-mapped: a mapping's touched pages count in the
process's resident set, while pread/pwrite keep it at one batch and leave caching to the OS page cache).
The bytes on disk are the read-outs' own, so a disk cache gives bitwise the results of a memory cache.
`auto` picks disk when the cache would take more than half of the host's available memory (and does
not fit the GPU). In the run folder the disk cache survives an interruption: a resumed sweep reuses the
batches it had checkpointed instead of rerunning the FP model over them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

MODES = ("auto", "memory", "disk")


def host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose(mode: str, need_bytes: int, device: str) -> str:
    """'gpu', 'host' or 'disk' for a cache of `need_bytes` (mode auto, memory or disk)."""
    on_cuda = str(device).startswith("cuda")
    if mode == "disk":
        return "disk"
    if on_cuda:
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if need_bytes < free // 2:
            return "gpu"
    if mode == "memory" or need_bytes < host_available_bytes() // 2:
        return "host"
    return "disk"


class FPCache:
    """Per batch b, the FP read-outs {site: [rows_b, d]} (put once in the FP pass, got in every condition)."""

    def __init__(self, where: str, sites: list[str], batch_rows: list[int], width: int, dtype: torch.dtype,
                 device: str, folder: Path | None = None, rank: int = 0, keep: bool = False):
        self.where, self.sites, self.device, self.dtype = where, list(sites), device, dtype
        self.on_cuda = str(device).startswith("cuda")
        self.batch_rows, self.width = list(batch_rows), width
        self.row0 = np.cumsum([0] + self.batch_rows).tolist()
        self.row_bytes = width * torch.empty((), dtype=dtype).element_size()
        self.mem: list[dict[str, torch.Tensor] | None] = [None] * len(batch_rows)
        self.files, self.fds, self.valid, self.buffers = [], [], 0, []
        if where == "disk":
            folder = Path(folder) if folder is not None else None
            if folder is None:
                import tempfile

                folder = Path(tempfile.mkdtemp(prefix="qdm-fp-cache-"))
                keep = False
            self.made = not folder.exists() or not any(folder.iterdir())
            folder.mkdir(parents=True, exist_ok=True)
            self.files = [folder / f"fp-cache-rank{rank}-site{i}.bin" for i in range(len(self.sites))]
            self.keep, self.folder = keep, folder
            size = self.row0[-1] * self.row_bytes
            for f in self.files:
                fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o666)
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)
                self.fds.append(fd)

    @property
    def bytes(self) -> int:
        return self.row0[-1] * self.row_bytes * len(self.sites)

    def describe(self) -> str:
        size = f"{self.bytes / 2**20:.1f} MiB"
        if self.where == "disk":
            return f"FP read-out cache on disk ({size} in {self.files[0].parent})"
        return f"FP read-out cache in {'GPU' if self.where == 'gpu' else 'host'} memory ({size})"

    def put(self, b: int, xs: dict[str, torch.Tensor]) -> None:
        if self.where == "gpu":
            self.mem[b] = xs
        elif self.where == "host":
            self.mem[b] = {h: self._to_host(x) for h, x in xs.items()}
        else:
            for fd, h in zip(self.fds, self.sites):  # written from the tensor's own memory, no copy on a CPU
                data = xs[h].detach().to("cpu").contiguous().view(torch.uint8).numpy()
                done = os.pwrite(fd, data, self.row0[b] * self.row_bytes)
                if done != data.nbytes:
                    raise OSError(f"short write to the FP cache {self.files[0].parent} ({done} of {data.nbytes} "
                                  "bytes): is the disk full? Pass --cache-dir on a larger disk")

    def _to_host(self, x: torch.Tensor) -> torch.Tensor:
        if not self.on_cuda:
            return x.to("cpu")
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return host.copy_(x, non_blocking=True)  # the side stream reads it only after the FP pass's queue

    def get(self, b: int) -> dict[str, torch.Tensor]:
        """Batch b's FP read-outs on the run device."""
        if self.where == "gpu":
            return self.mem[b]
        if self.where == "host":
            return {h: x.to(self.device, non_blocking=True) for h, x in self.mem[b].items()}
        rows, out = self.batch_rows[b], {}
        if not self.buffers:  # one read buffer per site, reused batch after batch: a fresh multi-MB buffer per
            # batch is what lets the C heap grow (glibc raises its mmap threshold after the first free)
            self.buffers = [torch.empty(max(self.batch_rows) * self.row_bytes, dtype=torch.uint8) for _ in self.fds]
        for fd, h, buf in zip(self.fds, self.sites, self.buffers):
            view = buf[: rows * self.row_bytes]
            got = os.preadv(fd, [view.numpy()], self.row0[b] * self.row_bytes)
            if got != view.numel():
                raise OSError(f"the FP cache {self.files[0].parent} is shorter than expected ({got} of {view.numel()} "
                              "bytes); was it changed while the sweep ran?")
            x = view.view(self.dtype).view(rows, self.width)
            # on a GPU a blocking copy: the buffer is read again for the next batch
            out[h] = x.to(self.device) if self.on_cuda else x
        return out

    def sync(self) -> bool:
        """Make the batches written so far durable; whether a resumed run may reuse them (only a disk
        cache kept in the run folder survives the process)."""
        if self.where != "disk" or not self.keep:
            return False
        for fd in self.fds:
            os.fdatasync(fd)
        return True

    def has(self, b: int) -> bool:
        return self.where == "disk" and b < self.valid

    def close(self, remove: bool = True) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds, self.buffers = [], []
        if remove and self.where == "disk":
            for f in self.files:
                f.unlink(missing_ok=True)
            if not self.keep and self.made:  # a folder it made (or found empty) goes too
                try:
                    self.folder.rmdir()
                except OSError:
                    pass
        self.mem = [None] * len(self.batch_rows)
