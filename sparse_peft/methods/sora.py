"""SoRA (Ding et al., EMNLP 2023): LoRA with a gate per rank, made sparse by a proximal (soft-threshold) step.

h = W0 x + s * B((A dropout(x)) * g), s = lora_alpha / lora_r. The gates have their own optimiser group; after each
AdamW step g <- sign(g) * max(|g| - xi, 0). A rank whose gate is zero can be dropped: the result is a plain LoRA
with a per-module rank, exported as a peft adapter (`python -m sparse_peft.export`). Facts and decisions:
../shared/METHODS.md (SoRA).
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from sparse_peft import UserError
from sparse_peft.methods.base import Method, modules_of
from sparse_peft.methods.registry import register
from sparse_peft.methods.lora import LoraMethodConfig
from sparse_peft.models import match_modules

GATES_GROUP = "sora_gates"


@dataclass
class SoraConfig(LoraMethodConfig):
    sparse_lambda: float = 1e-3  # weight of the L1 term mean|g| in the loss (eta_t in the reference README)
    sparse_lambda_2: float = 3e-4  # xi: the proximal threshold after each gate step
    sparse_lr: Optional[float] = None  # lr of the gate group; null = trainer.lr
    threshold_scaling: str = "none"  # none: threshold xi (the reference) | lr: lr_t * xi (textbook proximal step)
    mode: str = "proximal"  # proximal: exact soft-threshold | reference: the reference's dead zone (xi < |g| < 2xi -> 0)

    def validate(self):
        super().validate()
        for key in ("sparse_lambda", "sparse_lambda_2"):
            if getattr(self, key) < 0:
                raise UserError(f"config `method.{key}` must be >= 0, got {getattr(self, key)}")
        if self.sparse_lr is not None and self.sparse_lr <= 0:
            raise UserError(f"config `method.sparse_lr` must be > 0 (or null = trainer.lr), got {self.sparse_lr}")
        if self.threshold_scaling not in ("none", "lr"):
            raise UserError(f"config `method.threshold_scaling={self.threshold_scaling}` is not one of none, lr")
        if self.mode not in ("proximal", "reference"):
            raise UserError(f"config `method.mode={self.mode}` is not one of proximal, reference")


def soft_threshold(g: torch.Tensor, xi: float, mode: str = "proximal") -> torch.Tensor:
    """The proximal operator of xi * |g|. `reference` applies the reference's three in-place masks in order, so a
    value with xi < |g| < 2 xi is first shrunk below xi and then zeroed, and |g| == xi is kept."""
    if mode == "proximal":
        return torch.sign(g) * torch.clamp(g.abs() - xi, min=0)
    g = g.clone()
    g[g > xi] -= xi
    g[g < -xi] += xi
    g[g.abs() < xi] = 0
    return g


class SoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, device=w.device, dtype=w.dtype))
        self.lora_gate = nn.Parameter(torch.randn(r, device=w.device, dtype=w.dtype))  # standard normal, not ones
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r

    def forward(self, x):
        # B((A x) * g) == (B diag(g)) (A x): gating B's columns is the compact LoRA's own arithmetic, so dropping
        # zero-gate ranks (compact) leaves the output unchanged up to float summation order.
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B * self.lora_gate)
        return self.base_layer(x) + delta * self.scaling

    def compact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') of the plain LoRA that keeps the ranks with g != 0: A' = A[idx], B' = B[:, idx] * g[idx]."""
        idx = self.lora_gate.detach().nonzero().flatten()
        return self.lora_A.detach()[idx].clone(), (self.lora_B.detach() * self.lora_gate.detach())[:, idx].clone()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def rank(self) -> int:
        return int(torch.count_nonzero(self.lora_gate.detach()))


def sora_modules(model: nn.Module) -> list[tuple[str, SoraLinear]]:
    return modules_of(model, SoraLinear)


@register
class Sora(Method):
    name = "sora"
    config_cls = SoraConfig
    threshold_key = "sparse_lambda_2"  # xi: a sparsifying scheduler raises it in stages
    layered, layer_types = True, (SoraLinear,)
    export_format = "peft"

    def __init__(self, cfg, model_cfg, total_steps: int = 0, task=None):
        super().__init__(cfg, model_cfg, total_steps, task)
        self.xi = cfg.sparse_lambda_2

    def apply(self, model):
        c = self.cfg
        for name in match_modules(model, list(c.target_modules), dict(self.model_cfg.modules)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, SoraLinear(getattr(parent, child), c.lora_r, c.lora_alpha, c.lora_dropout))
        self.freeze_except(model, lambda n: ".lora_" in n)
        self.initial_gates = {n: m.lora_gate.detach().abs().cpu().clone() for n, m in sora_modules(model)}
        self.last_gates = {n: g.clone() for n, g in self.initial_gates.items()}
        return model

    def param_groups(self, model, lr, weight_decay):
        gates = [p for n, p in model.named_parameters() if n.endswith(".lora_gate")]
        groups = super().param_groups(model, lr, weight_decay, skip=lambda n: n.endswith(".lora_gate"))
        # The reference's gate optimiser: AdamW(betas 0.9/0.999, eps 1e-6, no weight decay).
        return groups + [{"params": gates, "lr": self.cfg.sparse_lr or lr, "weight_decay": 0.0, "eps": 1e-6,
                          "betas": (0.9, 0.999), "name": GATES_GROUP}]

    def regularization_loss(self, model):
        if self.cfg.sparse_lambda == 0:
            return None
        gates = [m.lora_gate for _, m in sora_modules(model)]
        return self.cfg.sparse_lambda * sum(g.abs().sum() for g in gates) / sum(g.numel() for g in gates)

    def set_threshold(self, xi: float) -> None:
        self.xi = xi

    def state_dict(self):
        return {"xi": self.xi, "initial_gates": self.initial_gates, "last_gates": self.last_gates}

    def load_state_dict(self, state):
        self.xi = state.get("xi", self.xi)
        self.initial_gates = state.get("initial_gates", self.initial_gates)
        self.last_gates = state.get("last_gates", self.last_gates)

    @torch.no_grad()
    def log_values(self, model):
        """Is the sparsity data-driven? `gate_overlap`: the share of surviving ranks that were, in their module,
        among the largest initial |g| (k survivors vs the top k at initialisation); `gate_overlap_chance`: the
        same share if survivors were drawn at random (k / r per module); `gates_grown`: gates whose |g| grew since
        the previous evaluation. An overlap near 1 with no gate growing means pruning by the initial draw."""
        kept = overlap = chance = grown = 0
        for name, m in sora_modules(model):
            g = m.lora_gate.detach().abs().cpu()
            idx = set(g.nonzero().flatten().tolist())
            k, r = len(idx), g.numel()
            top = set(torch.topk(self.initial_gates[name], k).indices.tolist()) if k else set()
            kept, overlap, chance = kept + k, overlap + len(idx & top), chance + k * k / r
            grown += int((g > self.last_gates[name]).sum())
            self.last_gates[name] = g.clone()
        return {"gate_overlap": overlap / kept if kept else None, "gate_overlap_chance": chance / kept if kept else None,
                "gates_grown": grown}

    @torch.no_grad()
    def after_optimizer_step(self, model, optimizer, step, loss=None):
        group = next(g for g in optimizer.param_groups if g.get("name") == GATES_GROUP)
        xi = self.xi * group["lr"] if self.cfg.threshold_scaling == "lr" else self.xi
        if xi > 0:
            for g in group["params"]:
                if g.requires_grad:  # a gate frozen this step (IST trains some layers only) is not stepped
                    g.copy_(soft_threshold(g, xi, self.cfg.mode))

    def ranks(self, model):
        return {n: m.rank for n, m in sora_modules(model)}

    def retained_params(self, model):
        """Exact: every kept rank costs d_in + d_out (its row of A and column of B, the gate folded into B), plus
        the trained task head. Gates themselves are not counted: compaction folds them into B."""
        return self.ranked_retained(model, self.ranks(model))

    def to_peft(self, model):
        """A peft LoRA model holding the compact adapter (per-module ranks) and the trained task head."""
        model = copy.deepcopy(model)
        compact = {}
        for name, module in sora_modules(model):
            compact[name] = module.compact()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base_layer)
        kept = {n: ab for n, ab in compact.items() if ab[0].shape[0] > 0}  # peft cannot hold rank 0
        if not kept:
            raise UserError("every SoRA gate is zero: there is no adapter to export (only the task head); "
                            "lower method.sparse_lambda_2 or the scheduler's max_lambda")
        s = self.cfg.lora_alpha / self.cfg.lora_r
        config = LoraConfig(
            task_type=self.peft_task_type, r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, target_modules=sorted(kept),
            rank_pattern={re.escape(n): a.shape[0] for n, (a, _) in kept.items()},
            alpha_pattern={re.escape(n): s * a.shape[0] for n, (a, _) in kept.items()},  # keeps alpha/r == s
            modules_to_save=self.head_names(model) or None)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, (a, b) in kept.items():
                layer = peft_model.base_model.model.get_submodule(name)
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
        return peft_model

    def export(self, model, out_dir):
        self.to_peft(model).save_pretrained(str(out_dir))
