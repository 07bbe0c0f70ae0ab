"""PST (Li et al., IJCAI 2022): parameter-efficient sparsity training, and the magnitude-pruning baseline.

Each target linear map W (out x in, frozen with its bias) becomes a sparse linear:

    W' = W + beta * U V                                   merged weight (U: out x r randn, V: r x in zeros)
    S  = |W'| + alpha1 * A B + alpha2 * (R 1^T + 1 C^T)   score (A: out x r_m randn, B, R (out), C (in) zeros)
    M  = 0 on the int(out * in * sparsity) lowest scores of this matrix, 1 elsewhere
    y  = x (M * W')^T + b

The mask has a straight-through gradient: dL/dS := dL/dM = dL/d(M W') * W' (the movement-pruning estimator; A B
and R, C learn a low-rank approximation of the accumulated movement score). As in the released code (autograd
through `weight.abs()` in the score), dL/dS also reaches W' through |W'|, so U, V get
dL/dW' = dL/d(M W') * (M + |W'|): a pruned entry still pulls on U V, scaled by its magnitude. `scheduler=cubic`
drives the sparsity every step.
The export is the base architecture with M * W' in place of each W (`python -m sparse_peft.export`).

`method=magnitude` is the paper's magnitude-pruning baseline: every parameter fine-tunes, the target maps are masked
by the top-k of |W| under the same schedule; its |W| passes no gradient (classical magnitude pruning: the released
code has no baseline to follow). Facts and decisions: ../shared/METHODS.md (PST).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparse_peft import UserError
from sparse_peft.methods.base import Method, MethodConfig, count, modules_of
from sparse_peft.methods.lora import SIX_MAPS
from sparse_peft.methods.registry import register
from sparse_peft.models import match_modules


@dataclass
class MagnitudeConfig(MethodConfig):
    sparsity: float = 0.9  # target fraction of zero weights in every target matrix (the cubic scheduler's end value)
    target_modules: list = field(default_factory=lambda: list(SIX_MAPS))

    def validate(self):
        if not 0 <= self.sparsity < 1:
            raise UserError(f"config `method.sparsity` must be in [0, 1) (the fraction of zero weights), got {self.sparsity}")


@dataclass
class PstConfig(MagnitudeConfig):
    rank: int = 8  # r of U V, the weight update
    score_rank: int = 8  # r_m of A B, the learned part of the score
    alpha1: float = 1.0  # weight of A B in the score
    alpha2: float = 1.0  # weight of R 1^T + 1 C^T in the score
    beta: float = 1.0  # scale of U V in W'

    def validate(self):
        super().validate()
        for key in ("rank", "score_rank"):
            if getattr(self, key) < 1:
                raise UserError(f"config `method.{key}` must be >= 1, got {getattr(self, key)}")


class Level:
    """The current sparsity, shared by the method (which the scheduler sets) and every sparse layer."""

    def __init__(self, value: float):
        self.value = float(value)


def merged_weight(weight, U, V, beta: float) -> torch.Tensor:
    return weight if U is None else torch.add(weight, U @ V, alpha=beta)  # (out, in); alpha: one pass, not two


def score(w, A, B, R, C, alpha1: float, alpha2: float) -> torch.Tensor:
    s = w.abs()  # (out, in)
    if A is not None:
        s = torch.add(s, A @ B, alpha=alpha1).add_(R[:, None] + C[None, :], alpha=alpha2)
    return s


def masked(t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """t where the mask keeps, 0 elsewhere; a 0/1 mask in t's dtype multiplies (the training step's: on CPU a bool
    `where` takes ~4x a float product, benchmarks/pst_mask.py)."""
    if mask is None:
        return t
    return torch.where(mask, t, 0.0) if mask.dtype == torch.bool else t * mask


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a 1-D tensor, as `flat.kthvalue(k).values`. On CPU numpy's introselect
    finds the same value several times faster than torch's kthvalue, which took a quarter of a PST step
    (benchmarks/pst_mask.py)."""
    if flat.device.type == "cpu" and flat.dtype != torch.bfloat16:  # numpy has no bfloat16
        return torch.as_tensor(np.partition(flat.detach().numpy(), k - 1)[k - 1])
    return flat.kthvalue(k).values


def topk_mask(s: torch.Tensor, sparsity: float, dtype: torch.dtype = torch.bool) -> Optional[torch.Tensor]:
    """(out, in) of `dtype`: 0 (False) on exactly the int(numel * sparsity) lowest scores (of scores tied at the
    threshold, the first in index order), 1 (True) elsewhere; None when nothing is pruned."""
    n = s.numel()
    k = int(n * sparsity)
    if k == 0:
        return None
    flat = s.flatten()
    threshold = kth_smallest(flat, k)
    mask = torch.gt(flat, threshold, out=torch.empty(n, dtype=dtype, device=s.device))
    # counted exactly: a float32 sum of 0/1 is exact below 2^24 (and faster than count_nonzero on floats)
    small = mask.is_floating_point() and n <= 2 ** 24
    kept = int(mask.sum(dtype=torch.float32)) if small else int(torch.count_nonzero(mask))
    extra = n - kept - k  # ties at the threshold pruned beyond k: keep the last of them
    if extra:  # (|W| ties are common in a large matrix; a whole-matrix topk to break them took 5% of a CoLA step)
        tied = (flat == threshold).nonzero().squeeze(1)
        mask[tied[-extra:]] = 1
    return mask.view_as(s)


class SparseLinearFn(torch.autograd.Function):
    """y = x (M * W')^T + b with M computed here from the score. Saved for backward: x and the 0/1 mask in the
    weight's dtype (this step only; bool would take a quarter of the bytes, but its ops run ~4x slower on CPU); W' is
    recomputed from W, U, V rather than kept, so no copy of the weight outlives the forward."""

    @staticmethod
    def forward(ctx, x, weight, bias, U, V, A, B, R, C, sparsity, beta, alpha1, alpha2):
        w = merged_weight(weight, U, V, beta)
        mask = topk_mask(score(w, A, B, R, C, alpha1, alpha2), sparsity, w.dtype)
        ctx.save_for_backward(x, mask, weight, U, V, A, B)
        ctx.consts = (beta, alpha1, alpha2)
        return F.linear(x, masked(w, mask), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, weight, U, V, A, B = ctx.saved_tensors
        beta, alpha1, alpha2 = ctx.consts
        need = ctx.needs_input_grad
        w = merged_weight(weight, U, V, beta)
        grad_x = grad_out @ masked(w, mask) if need[0] else None
        g = grad_out.flatten(0, -2).T @ x.flatten(0, -2)  # dL/d(M W'), (out, in)
        grad_bias = grad_out.flatten(0, -2).sum(0) if need[2] else None
        gw = masked(g, mask)  # dL/dW' through the product M * W'
        grad_weight = gw if need[1] else None
        if U is not None and (need[3] or need[4]):
            gw = gw + g * w.abs()  # and through |W'| in the score (dL/dS * sign(W')), as the released code does
        grad_U = beta * (gw @ V.T) if need[3] else None  # the scalars scale the small products, not the (out, in) ones
        grad_V = beta * U.T @ gw if need[4] else None
        grad_A = grad_B = grad_R = grad_C = None
        if A is not None and any(need[5:9]):
            gs = g * w  # straight-through: dL/dS := dL/dM
            grad_A = alpha1 * (gs @ B.T) if need[5] else None
            grad_B = alpha1 * A.T @ gs if need[6] else None
            grad_R = alpha2 * gs.sum(1) if need[7] else None
            grad_C = alpha2 * gs.sum(0) if need[8] else None
        return grad_x, grad_weight, grad_bias, grad_U, grad_V, grad_A, grad_B, grad_R, grad_C, None, None, None, None


class PstLinear(nn.Module):
    """A linear map masked by the top-k of its score. Keeps the base layer's `weight` and `bias` under their own
    names (state dicts and the export match the base model); PST's parameters carry the `pst_` prefix."""

    def __init__(self, base: nn.Linear, level: Level, cfg: Optional[PstConfig] = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.level = level
        self.beta, self.alpha1, self.alpha2 = (cfg.beta, cfg.alpha1, cfg.alpha2) if cfg else (1.0, 1.0, 1.0)
        if cfg is None:  # magnitude pruning: the score is |W|
            self.pst_U = self.pst_V = self.pst_A = self.pst_B = self.pst_R = self.pst_C = None
            return
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        out, inp = self.out_features, self.in_features
        self.pst_U = nn.Parameter(torch.randn(out, cfg.rank, **kw))
        self.pst_V = nn.Parameter(torch.zeros(cfg.rank, inp, **kw))
        self.pst_A = nn.Parameter(torch.randn(out, cfg.score_rank, **kw))
        self.pst_B = nn.Parameter(torch.zeros(cfg.score_rank, inp, **kw))
        self.pst_R = nn.Parameter(torch.zeros(out, **kw))
        self.pst_C = nn.Parameter(torch.zeros(inp, **kw))

    def forward(self, x):
        return SparseLinearFn.apply(x, self.weight, self.bias, self.pst_U, self.pst_V, self.pst_A, self.pst_B,
                                    self.pst_R, self.pst_C, self.level.value, self.beta, self.alpha1, self.alpha2)

    @torch.no_grad()
    def mask(self) -> Optional[torch.Tensor]:
        w = merged_weight(self.weight, self.pst_U, self.pst_V, self.beta)
        return topk_mask(score(w, self.pst_A, self.pst_B, self.pst_R, self.pst_C, self.alpha1, self.alpha2),
                         self.level.value)

    @torch.no_grad()
    def sparse_weight(self) -> torch.Tensor:
        """M * W', exactly the weight the forward multiplies by."""
        return masked(merged_weight(self.weight, self.pst_U, self.pst_V, self.beta), self.mask())

    def to_linear(self) -> nn.Linear:
        w = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.sparse_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sparsity={self.level.value:.4f}"


def pst_modules(model: nn.Module) -> list[tuple[str, PstLinear]]:
    return modules_of(model, PstLinear)


@register
class MagnitudePruning(Method):
    """Magnitude pruning with the cubic schedule (PST's baseline): all parameters train, masks from |W|."""
    name = "magnitude"
    config_cls = MagnitudeConfig
    threshold_key = "sparsity"  # scheduler=cubic sets it every step; without a scheduler the target holds from step 0
    export_format = "model"  # a plain transformers model holding M * W'

    def __init__(self, cfg, model_cfg, total_steps: int = 0, task=None):
        super().__init__(cfg, model_cfg, total_steps, task)
        self.level = Level(cfg.sparsity)

    def layer_config(self) -> Optional[PstConfig]:
        return None

    def apply(self, model):
        for name in match_modules(model, list(self.cfg.target_modules), dict(self.model_cfg.modules)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, PstLinear(getattr(parent, child), self.level, self.layer_config()))
        self.freeze(model)
        return model

    def freeze(self, model):
        self.freeze_except(model, lambda n: True)

    def set_threshold(self, value: float) -> None:
        self.level.value = float(value)

    def state_dict(self):
        return {"sparsity": self.level.value}  # the schedule's position: a resumed run masks exactly as before

    def load_state_dict(self, state):
        self.level.value = float(state.get("sparsity", self.level.value))

    def log_values(self, model):
        return {"sparsity": self.level.value}

    def retained_params(self, model):
        """What the exported model stores beyond the frozen base: the non-zero weights of the masked target maps,
        plus every other trained parameter (PST: the task head; magnitude: everything else, biases included)."""
        layers = pst_modules(model)
        masked = {f"{n}.weight" for n, _ in layers}
        trained = set(self.trained) or {n for n, p in model.named_parameters() if p.requires_grad}
        other = count(p for n, p in model.named_parameters() if n in trained and n not in masked and ".pst_" not in n)
        return sum(int(torch.count_nonzero(m.sparse_weight())) for _, m in layers) + other

    def measured_sparsity(self, model) -> dict[str, float]:
        """Fraction of zero weights per target map, as the export stores them."""
        return {n: 1.0 - int(torch.count_nonzero(m.sparse_weight())) / m.weight.numel() for n, m in pst_modules(model)}

    def to_plain(self, model) -> nn.Module:
        """A copy of the model in its base architecture: every sparse layer becomes an nn.Linear holding M * W'."""
        plain = copy.deepcopy(model)
        for name, module in pst_modules(plain):
            parent_name, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent_name), child, module.to_linear())
        return plain

    def export(self, model, out_dir):
        """A plain `transformers` model dir (config.json + model.safetensors) that `AutoModelFor...from_pretrained`
        loads with no sparse_peft code, plus `sparsity.json` (target, scheduled and measured per map)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.to_plain(model).save_pretrained(str(out_dir))
        measured = self.measured_sparsity(model)
        (out_dir / "sparsity.json").write_text(json.dumps(
            {"target": self.cfg.sparsity, "current": self.level.value, "measured": measured}, indent=2) + "\n")


@register
class Pst(MagnitudePruning):
    name = "pst"
    config_cls = PstConfig

    def layer_config(self) -> Optional[PstConfig]:
        return self.cfg

    def freeze(self, model):
        self.freeze_except(model, lambda n: ".pst_" in n)  # W and its bias stay frozen; the head trains

    def log_values(self, model):
        return {**super().log_values(model), "magnitude_overlap": self.magnitude_overlap(model)}

    @torch.no_grad()
    def magnitude_overlap(self, model) -> Optional[float]:
        """Share of the pruned weights, over all masked maps, that |W'| alone would prune too: 1.0 means the learned
        score (A B, R, C) decided nothing and PST is magnitude pruning of W + U V, an unrelated mask scores the
        sparsity itself; None before anything is pruned."""
        same = pruned = 0
        for _, m in pst_modules(model):
            mask = m.mask()
            if mask is None:
                continue
            by_magnitude = topk_mask(merged_weight(m.weight, m.pst_U, m.pst_V, m.beta).abs(), self.level.value)
            same += int((~mask & ~by_magnitude).sum())
            pruned += int((~mask).sum())
        return same / pruned if pruned else None
