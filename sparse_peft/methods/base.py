"""The small interface every method implements, and the registry.

The training loop calls, in order: `apply` (once), `param_groups` (once), `regularization_loss` (every
forward), `after_optimizer_step` (every step), `retained_params` and `ranks` (at every evaluation);
`python -m sparse_peft.export` calls `export`. Only `apply` is required; the defaults below fit a method whose
trainable parameters are all it keeps. A method with a sparsity threshold that a scheduler may raise in stages
(SoRA's xi) also defines `set_threshold`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from sparse_peft import UserError
from sparse_peft.config import typed
from sparse_peft.models import head_module_names
from sparse_peft.runio import save_weights, trainable_state

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    METHODS[cls.name] = cls
    return cls


@dataclass
class MethodConfig:
    name: str = ""
    train_head: bool = True  # the task head (classifier, pooler) is trained for every method


def method_config(node) -> MethodConfig:
    name = (node or {}).get("name")
    if name not in METHODS:
        raise UserError(f"unknown method `{name}`; choose method=<name> with name in {sorted(METHODS)}")
    cfg = typed(node, METHODS[name].config_cls, "method")
    cfg.validate() if hasattr(cfg, "validate") else None
    return cfg


def build_method(cfg: MethodConfig, model_cfg, total_steps: int = 0) -> "Method":
    return METHODS[cfg.name](cfg, model_cfg, total_steps)


def count(params) -> int:
    return sum(p.numel() for p in params)


def no_decay(name: str) -> bool:
    # Biases and LayerNorm weights get no weight decay (BERT convention).
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or "norm.weight" in name


class Method:
    name: str = ""
    config_cls: type = MethodConfig

    def __init__(self, cfg, model_cfg, total_steps: int = 0):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.total_steps = total_steps  # optimizer steps of the whole run (AdaLoRA's budget schedule needs it)

    # --- required -------------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Inject the method and set `requires_grad`; return the model to train."""
        raise NotImplementedError

    # --- optional hooks -------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float, weight_decay: float, skip=lambda name: False) -> list[dict]:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not skip(n)]
        return [
            {"params": [p for n, p in named if not no_decay(n)], "lr": lr, "weight_decay": weight_decay},
            {"params": [p for n, p in named if no_decay(n)], "lr": lr, "weight_decay": 0.0},
        ]

    def regularization_loss(self, model: nn.Module) -> Optional[torch.Tensor]:
        return None

    def after_optimizer_step(self, model: nn.Module, optimizer, step: int) -> None:
        """Called after `optimizer.step()`, before the LR scheduler steps and before gradients are cleared."""

    def ranks(self, model: nn.Module) -> Optional[dict[str, int]]:
        """Per-module rank for adaptive-rank methods (logged with every evaluation); None otherwise."""
        return None

    def retained_params(self, model: nn.Module) -> int:
        """Parameters the adapted model needs after training, beyond the frozen base."""
        return count(p for p in model.parameters() if p.requires_grad)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_weights(trainable_state(model), out_dir / "trainable.safetensors")

    # --- shared helpers -------------------------------------------------------------------------------
    def ranked_retained(self, model: nn.Module, ranks: dict[str, int]) -> int:
        """Adaptive-rank methods (SoRA, AdaLoRA): each kept rank of module n costs d_in + d_out (its row of A and
        column of B, the gate / singular value folded into B), plus the trained parameters outside `.lora_`."""
        lora = sum(ranks[n] * (m.in_features + m.out_features) for n, m in model.named_modules() if n in ranks)
        head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n)
        return lora + head

    def head_names(self, model: nn.Module) -> list[str]:
        return head_module_names(model, list(self.model_cfg.head_modules)) if self.cfg.train_head else []

    def freeze_except(self, model: nn.Module, keep) -> None:
        """requires_grad only for parameters whose name `keep(name)` accepts, plus the task head."""
        heads = self.head_names(model)
        for n, p in model.named_parameters():
            p.requires_grad = bool(keep(n)) or any(n.startswith(h + ".") for h in heads)
