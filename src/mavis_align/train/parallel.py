"""Data parallelism for value training under ``accelerate launch`` (one process per GPU or CPU slot).

Each optimizer step's examples are split over the processes (process r takes positions r, r+W,
r+2W, ... of the step's example list), each process weights its squared errors by its share of
the step, and the gradients are summed over processes (all-reduce). The summed gradient equals
the single-process gradient of the same step, so W processes follow the single-process
training curve (up to float summation order) while each computes 1/W of the forward and
backward passes. Process 0 writes every file (checkpoints, best/, final/, metrics, result.json).

Launch (any launcher that sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``: accelerate's or torchrun)::

    accelerate launch --multi_gpu --num_processes 2 -m mavis_align.cli train --trees t.h5 --objective helpful --out v
    accelerate launch --multi_gpu --num_processes 2 -m mavis_align.cli train ... --device cpu   # 2 CPU processes, gloo
    torchrun --nproc_per_node 2 -m mavis_align.cli train ... --device cpu

(``accelerate launch --cpu`` starts one process unless MPI is installed, so it is not used for CPUs.)

Without a launcher (``WORLD_SIZE`` unset or 1) every method is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch


@dataclass(frozen=True)
class DataParallel:
    """rank / world of this process; ``world == 1``: plain single-process training."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, cpu: bool | None = None) -> "DataParallel":
        """From the launcher's environment (``WORLD_SIZE``, ``RANK``...); starts the process group
        through accelerate: nccl on GPUs, gloo when ``cpu`` (default: the current placement's
        device is the CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        from accelerate import PartialState

        if cpu is None:
            from ..placement import current

            cpu = current().device.type == "cpu"
        state = PartialState(cpu=cpu)
        return cls(rank=state.process_index, world=state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> list:
        """This process's share of one step: positions rank, rank + world, ..."""
        return list(items[self.rank :: self.world])

    def sync_parameters(self, params: Iterable[torch.Tensor]) -> None:
        """Every process starts from process 0's trainable parameters."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, src=0)

    def sum_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its sum over the processes (missing grads = 0)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def sum(self, value: float) -> float:
        """A float summed over the processes (for the logged loss)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
