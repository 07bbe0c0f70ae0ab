"""Where a run computes, and the facts about it that results record."""
from __future__ import annotations

import resource

import torch

from sparse_peft import UserError
from sparse_peft.distributed import World


def pick_device(name: str, world: World = World()) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name, world.local_rank) if name == "cuda" else torch.device(name)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def environment(device: torch.device) -> dict:
    """Where the numbers came from: results from different hardware or library versions are not bit-comparable."""
    import peft
    import transformers
    return {"device": device_name(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)
