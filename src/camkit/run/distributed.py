"""``camkit run`` on several processes with ``torch.distributed``: torchrun, or Slurm's srun.

    torchrun --nproc-per-node 2 -m camkit run photos/ --out store/            # one machine, 2 processes
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m camkit run photos/ --out /shared/store/     # two machines, 8 GPUs each
    srun --ntasks 16 --gpus-per-task 1 python -m camkit run ...              # Slurm (MASTER_ADDR/PORT set)

``python -m camkit`` is the ``camkit`` command (:mod:`camkit.__main__`). Each process reads ``RANK`` and
``WORLD_SIZE`` (torchrun), or ``SLURM_PROCID`` and ``SLURM_NTASKS`` (srun; then ``MASTER_ADDR`` and
``MASTER_PORT`` must be set, e.g. to the first node of the job). The process group uses ``gloo`` on CPU and
``nccl`` on CUDA; ``--device cuda`` means ``cuda:<LOCAL_RANK>``.

Rank 0 creates (or checks) the store; then the shards not yet done are dealt round-robin, shard ``k`` of the
pending list to rank ``k % WORLD_SIZE``: disjoint, no padding and no duplicates (unlike ``DistributedSampler``,
which pads). Each rank writes its own shards; after a barrier rank 0 merges the table. The store must be on a
file system every rank sees (the same folder on one machine; a shared file system across machines).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from camkit.errors import CamkitError

__all__ = ["Session", "env_rank", "session"]


def env_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or Slurm's environment; (0, 1, 0) when alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return 0, 1, 0


@dataclass
class Session:
    """This process's place in the run: rank, world size and device; collective helpers (no-ops alone)."""

    rank: int
    world: int
    device: str

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            tdist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if self.world == 1:
            return value
        box = [value if self.rank == 0 else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def total(self, value: int) -> int:
        """The sum of ``value`` over the ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        tdist.all_reduce(t)
        return int(t.item())


@contextmanager
def session(device: str = "cpu") -> Iterator[Session]:
    """Join the process group when started by torchrun / srun (left again on exit), else a session of one."""
    rank, world, local = env_rank()
    if world == 1:
        yield Session(0, 1, device)
        return
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if "MASTER_ADDR" not in os.environ:
        raise CamkitError(
            f"{world} processes but no MASTER_ADDR: under Slurm set MASTER_ADDR and MASTER_PORT (the first node "
            "of the job and a free port), or start the run with torchrun"
        )
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("MASTER_PORT", "29500")
    tdist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        yield Session(rank, world, device)
    finally:
        tdist.destroy_process_group()
