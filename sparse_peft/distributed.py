"""Data-parallel training with torch.distributed, for runs launched by `torchrun` or `accelerate launch`.

Every rank builds the same model and the same per-epoch order, trains on its share of every global batch
(`trainer.batch_size` is the global batch), and DDP averages the gradients, so the parameters stay identical on
all ranks; method hooks (proximal step, rank budgets) then act on identical values. Every rank evaluates (so
that best-checkpoint choices agree without communication); only rank 0 writes files and logs to wandb.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparse_peft import UserError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device_name: str) -> World:
    """World from the launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK); a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        gpus = torch.cuda.device_count()
        if world.local_rank >= gpus:
            raise UserError(f"process {world.local_rank} on this node but only {gpus} CUDA device(s): launch at "
                            f"most one process per GPU (torchrun --nproc_per_node {gpus}), or use trainer.device=cpu")
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return world


def broadcast(obj, world: World):
    """Rank 0's value of `obj` on every rank (e.g. the output dir, which Hydra times per process)."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(order: list[int], batch_size: int, world: World) -> list[int]:
    """This rank's part of every global batch (batch[rank::size]), in order. A final batch with fewer examples
    than ranks is topped up from the start of the order, so every rank has the same number of batches."""
    if world.size == 1:
        return order
    if batch_size % world.size:
        raise UserError(f"trainer.batch_size={batch_size} (the global batch) must be divisible by the "
                        f"{world.size} processes")
    mine = []
    for i in range(0, len(order), batch_size):
        batch = order[i:i + batch_size]
        batch += order[:max(0, world.size - len(batch))]
        mine += batch[world.rank::world.size]
    return mine


def finish(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
