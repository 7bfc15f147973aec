"""Scale-out over processes with torch.distributed (NCCL on GPUs, gloo on CPU).

Under `torchrun --nproc-per-node N -m qdm_engine.cli sweep ...` every rank loads the model and SAE,
audits every N-th token block, and the per-feature float64 moments are gathered and merged in rank
order, so every rank ends with the same statistics as one process (up to float64 rounding of the
merge order). Rank 0 prints and writes the results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qdm_engine.kernels.moments import FeatureMoments


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def merge(self, m: FeatureMoments) -> FeatureMoments:
        """The moments of all ranks' positions, merged in rank order (identical on every rank)."""
        if self.world == 1:
            return m
        packed = m.pack()
        parts = [torch.empty_like(packed) for _ in range(self.world)]
        dist.all_gather(parts, packed)
        return FeatureMoments.merge_all(FeatureMoments.unpack(p) for p in parts)

    def sum(self, *values: float) -> tuple[float, ...]:
        """Sums of float64 scalars over ranks."""
        if self.world == 1:
            return values
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return tuple(float(v) for v in t.cpu())


def init_from_env(device: str | None) -> tuple[Shard, str | None]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns the shard and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Shard(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    return Shard(rank, world), device
