"""The one small interface every method implements. Only `apply` is required; every hook has a default.

The loop (`sparse_peft/loop.py`) calls them in this order:

    inject(model)                     once: `apply` + the names of the parameters the method trains
    param_groups(model, lr, wd)       once: the optimizer's groups
    on_train_start(model, batches)    once, on a fresh run (not on resume: `load_state_dict` restores instead),
                                      with `train_start_batches` training batches (e.g. pruning at initialisation)
    draw_batch = <callable>           set once before training: `draw_batch(key, size)` -> `size` training
                                      examples as a batch on the model's device (e.g. IST's importance update)
    every step:
      set_threshold(value)            when a scheduler drives the key named by `threshold_key`
      on_step_begin(model, step)      e.g. choosing which layers train this step
      regularization_loss(model)      added to the task loss (every micro-batch)
      after_optimizer_step(model, optimizer, step, loss)
                                      after `optimizer.step()`, before the LR scheduler and `zero_grad`
    every evaluation: retained_params(model), ranks(model), log_values(model) -> curve.jsonl
    every checkpoint: state_dict() / load_state_dict(state): method state that is not a trainable
                                      parameter (masks, importance scores, thresholds, allocator averages)
    `python -m sparse_peft.export`: export(model, out_dir)

A method that wraps another (IST: `method.base: lora`) reaches the inner method's per-layer parameters with
`layer_params(model)` and its per-layer output scaling with `scale_layer(model, layer, factor)`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from peft import TaskType
from torch import nn

from sparse_peft.models import head_module_names
from sparse_peft.runio import save_weights


@dataclass
class MethodConfig:
    name: str = ""
    train_head: bool = True  # the task head (classifier, pooler) is trained for every method
    label: Optional[str] = None  # a variant's name in results and presets (lora_r4, sora_gates_only); null: `name`


def modules_of(model: nn.Module, types) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of the given class(es): a method's injected layers."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, types)]


def count(params) -> int:
    return sum(p.numel() for p in params)


def no_decay(name: str) -> bool:
    # Biases and LayerNorm weights get no weight decay (BERT convention).
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or "norm.weight" in name


# `encoder.layer.3.` (BERT, DeBERTa) or `layers.3.` (LLaMA-style decoders): the block a parameter belongs to.
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block)\.(\d+)\.")


def layer_of(name: str) -> Optional[int]:
    m = LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


class Method:
    name: str = ""
    config_cls: type = MethodConfig
    threshold_key: Optional[str] = None  # the config key a scheduler may drive through `set_threshold`
    # module attribute holding the output scaling of the method's injected modules (`scale_layer`)
    scaling_attr: str = "scaling"

    def __init__(self, cfg, model_cfg, total_steps: int = 0, task=None):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.total_steps = total_steps  # optimizer steps of the whole run (AdaLoRA's budget schedule needs it)
        self.task = task  # sparse_peft.tasks.Task or None (peft's task type comes from it)
        self.trained: list[str] = []  # names of the parameters the method trains, fixed by `inject`

    # --- required -------------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Inject the method and set `requires_grad`; return the model to train."""
        raise NotImplementedError

    def inject(self, model: nn.Module) -> nn.Module:
        """`apply`, then record which parameters train: checkpoints and saved weights hold exactly these, whatever
        `requires_grad` says at save time (IST toggles it every step)."""
        model = self.apply(model)
        self.trained = [n for n, p in model.named_parameters() if p.requires_grad]
        return model

    # --- optional hooks -------------------------------------------------------------------------------
    train_start_batches: int = 0  # training batches handed to `on_train_start`

    # Set by the loop before the first step: `draw_batch(key, size)` returns `size` training examples (labels included,
    # on the model's device) drawn with a generator seeded from (trainer.seed, key): the same key gives the same batch,
    # also in a resumed run, and the run's RNG stream is untouched. None outside the loop.
    draw_batch: Optional[Callable[[int, int], dict]] = None

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float, skip=lambda name: False) -> list[dict]:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not skip(n)]
        return [
            {"params": [p for n, p in named if not no_decay(n)], "lr": lr, "weight_decay": weight_decay},
            {"params": [p for n, p in named if no_decay(n)], "lr": lr, "weight_decay": 0.0},
        ]

    def on_train_start(self, model: nn.Module, batches: list[dict]) -> None:
        """Data-driven set-up before the first step of a fresh run (batches on the model's device, labels
        included)."""

    def on_step_begin(self, model: nn.Module, step: int) -> None:
        """Before the step's forward passes."""

    def regularization_loss(self, model: nn.Module) -> Optional[torch.Tensor]:
        return None

    def after_optimizer_step(self, model: nn.Module, optimizer, step: int, loss: Optional[float] = None) -> None:
        """After `optimizer.step()`, before the LR scheduler steps and before gradients are cleared."""

    def set_threshold(self, value: float) -> None:
        """A scheduler's current value of `threshold_key` (SoRA's xi per stage, PST's sparsity per step)."""
        raise NotImplementedError(f"method {self.name} has no threshold a scheduler can drive")

    def state_dict(self) -> dict:
        """Method state that is not a trainable parameter; tensors, numbers, strings and lists only (checkpoints
        load it with `torch.load(weights_only=True)`)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"method {self.name} keeps no state but the checkpoint holds {sorted(state)}")

    def log_values(self, model: nn.Module) -> dict:
        """Extra values for every evaluation record of curve.jsonl (JSON types)."""
        return {}

    def ranks(self, model: nn.Module) -> Optional[dict[str, int]]:
        """Per-module rank for adaptive-rank methods (logged with every evaluation); None otherwise."""
        return None

    def retained_params(self, model: nn.Module) -> int:
        """Parameters the adapted model needs after training, beyond the frozen base."""
        names = set(self.trained) or {n for n, p in model.named_parameters() if p.requires_grad}
        return count(p for n, p in model.named_parameters() if n in names)

    export_format: str = "trainable"  # what `export` writes: trainable (safetensors) | peft (an adapter peft loads)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_weights(self.trained_state(model), out_dir / "trainable.safetensors")

    # --- for methods that wrap a method ---------------------------------------------------------------
    layered: bool = False  # its parameters live inside the blocks, beside frozen weights (IST can wrap it)

    def layer_params(self, model: nn.Module) -> dict[int, list[tuple[str, nn.Parameter]]]:
        """The method's trained parameters grouped by the transformer block they sit in (the task head, outside
        every block, is not among them)."""
        trained = set(self.trained)
        groups: dict[int, list] = {}
        for n, p in model.named_parameters():
            if n in trained and layer_of(n) is not None:
                groups.setdefault(layer_of(n), []).append((n, p))
        return dict(sorted(groups.items()))

    layer_types: tuple = ()  # the module classes the method injects (they carry `scaling_attr`)

    def layer_modules(self, model: nn.Module) -> dict[int, list[nn.Module]]:
        """The injected modules grouped by block."""
        groups: dict[int, list] = {}
        for n, m in model.named_modules():
            if isinstance(m, self.layer_types) and layer_of(n + ".") is not None:
                groups.setdefault(layer_of(n + "."), []).append(m)
        return dict(sorted(groups.items()))

    def scale_layer(self, model: nn.Module, layer: int, factor: float) -> None:
        """Set the output scaling of the method's modules in block `layer` to `factor` times their own (IST's
        suppression); factor 1 restores it exactly."""
        if not hasattr(self, "_own_scaling"):
            self._own_scaling = {}
        for m in self.layer_modules(model).get(layer, []):
            s = self._own_scaling.setdefault(id(m), getattr(m, self.scaling_attr))
            if isinstance(s, dict):  # peft layers: {adapter name: scaling}
                setattr(m, self.scaling_attr, {k: v * factor for k, v in s.items()})
            else:
                setattr(m, self.scaling_attr, s * factor)

    # --- shared helpers -------------------------------------------------------------------------------
    @property
    def peft_task_type(self) -> TaskType:
        return self.task.peft_task_type if self.task is not None else TaskType.SEQ_CLS

    def trained_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        names = set(self.trained)
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if n in names}

    def ranked_retained(self, model: nn.Module, ranks: dict[str, int]) -> int:
        """Adaptive-rank methods (SoRA, AdaLoRA): each kept rank of module n costs d_in + d_out (its row of A and
        column of B, the gate / singular value folded into B), plus the trained parameters outside `.lora_`."""
        lora = sum(ranks[n] * (m.in_features + m.out_features) for n, m in model.named_modules() if n in ranks)
        head = sum(p.numel() for n, p in model.named_parameters() if n in set(self.trained) and ".lora_" not in n)
        return lora + head

    def head_names(self, model: nn.Module) -> list[str]:
        return head_module_names(model, list(self.model_cfg.head_modules)) if self.cfg.train_head else []

    def freeze_except(self, model: nn.Module, keep) -> None:
        """requires_grad only for parameters whose name `keep(name)` accepts, plus the task head."""
        heads = self.head_names(model)
        for n, p in model.named_parameters():
            p.requires_grad = bool(keep(n)) or any(n.startswith(h + ".") for h in heads)
