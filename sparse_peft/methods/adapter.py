"""Bottleneck adapters (Houlsby et al., 2019) in the placements SparseAdapter (He et al., 2022) compares:
down (d -> b), activation, dropout, up (b -> d), times a fixed or learnable scale, added to what it adapts;
optionally a trained LayerNorm on the adapter's input (`layernorm: in`, the SparseAdapter scripts' adapter) or on its
output (`out`), inside the adapter branch (the residual adds the un-normalised input).

  houlsby   (default) after every `target_modules` map (attention output and FFN output projections), inside
            the residual branch: h = W x; y = h + s * up(act(down(h)))
  parallel  beside the FFN: y = W_out(..) + s * up(act(down(x))), x the FFN's input (the `ffn_in` map's input)
  pfeiffer  FFN only, after the FFN block's output LayerNorm: h = LN(..); y = h + s * up(act(down(h)))

Weights may carry masks (`adapter_down_mask`, `adapter_up_mask` buffers, set by `sparse_adapter`): the forward then
uses W * mask, so pruned weights get no gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparse_peft import UserError
from sparse_peft.methods.base import Method, MethodConfig, layer_of, no_decay
from sparse_peft.methods.registry import register
from sparse_peft.models import match_modules

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "swish": nn.SiLU}
PLACEMENTS = ("houlsby", "parallel", "pfeiffer")
LAYERNORMS = ("none", "in", "out")


@dataclass
class AdapterConfig(MethodConfig):
    adapter_size: int = 64  # bottleneck width (the SparseAdapter scripts use 64)
    attn_size: Optional[int] = None  # bottleneck of the sites of the `attn_out` role; null: adapter_size
    ffn_size: Optional[int] = None  # bottleneck of every other site (FFN); null: adapter_size
    placement: str = "houlsby"  # houlsby | parallel (beside the FFN) | pfeiffer (FFN only, after its LayerNorm)
    non_linearity: str = "relu"
    init: str = "bert"  # bert: N(0, 0.02), zero biases | lora: down kaiming, up zeros (exact identity at start)
    scaling: float = 1.0
    learnable_scale: bool = False  # a trained scalar per site (initialised to `scaling`, no weight decay)
    adapter_dropout: float = 0.0
    layernorm: str = "none"  # none | in: a trained LayerNorm on the adapter's input | out: on its output
    # houlsby sites; parallel and pfeiffer use the model's `ffn_in`/`ffn_out` roles
    target_modules: list = field(default_factory=lambda: ["attn_out", "ffn_out"])

    def sizes(self) -> tuple[int, int]:
        return (self.attn_size or self.adapter_size, self.ffn_size or self.adapter_size)

    def validate(self):
        for key, value in (("adapter_size", self.adapter_size), ("attn_size", self.attn_size), ("ffn_size", self.ffn_size)):
            if value is not None and value < 1:
                raise UserError(f"config `method.{key}` (bottleneck width) must be >= 1, got {value}")
        if self.placement not in PLACEMENTS:
            raise UserError(f"config `method.placement={self.placement}` is not one of {list(PLACEMENTS)}")
        if self.non_linearity not in ACTIVATIONS:
            raise UserError(f"config `method.non_linearity={self.non_linearity}` is not one of {sorted(ACTIVATIONS)}")
        if self.init not in ("bert", "lora"):
            raise UserError(f"config `method.init={self.init}` is not one of bert, lora")
        if self.layernorm not in LAYERNORMS:
            raise UserError(f"config `method.layernorm={self.layernorm}` is not one of {list(LAYERNORMS)}")
        if not 0 <= self.adapter_dropout < 1:
            raise UserError(f"config `method.adapter_dropout` must be in [0, 1), got {self.adapter_dropout}")


def masked(weight: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return weight if mask is None else weight * mask


class AdapterLinear(nn.Module):
    """Wraps a frozen module (a linear map; a LayerNorm for pfeiffer) and adds the adapter to its output; with
    `parallel`, the adapter reads the input a forward pre-hook on the FFN's first map leaves in `parallel_input`.
    Parameters carry the `adapter_` prefix so that name filters find them."""

    def __init__(self, base_layer: nn.Module, dim: int, size: int, cfg: AdapterConfig, parallel: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.adapter_down = nn.Linear(dim, size)  # (b, d)
        self.adapter_up = nn.Linear(size, dim)  # (d, b)
        self.adapter_act = ACTIVATIONS[cfg.non_linearity]()
        self.adapter_dropout = nn.Dropout(cfg.adapter_dropout)
        self.adapter_norm = nn.LayerNorm(dim) if cfg.layernorm != "none" else None
        self.norm_input = cfg.layernorm == "in"
        # `scaling` stays a plain float (IST's `scale_layer` multiplies it); a learnable scale multiplies it
        self.scaling = 1.0 if cfg.learnable_scale else cfg.scaling
        self.adapter_scale = nn.Parameter(torch.tensor(float(cfg.scaling))) if cfg.learnable_scale else None
        self.register_buffer("adapter_down_mask", None, persistent=False)  # method state (sparse_adapter), not weights
        self.register_buffer("adapter_up_mask", None, persistent=False)
        self.parallel = parallel
        self.parallel_input: Optional[torch.Tensor] = None
        if cfg.init == "bert":
            for lin in (self.adapter_down, self.adapter_up):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        else:
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)
        self.to(base_layer.weight.device, base_layer.weight.dtype)

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm_input:
            h = self.adapter_norm(h)
        z = F.linear(h, masked(self.adapter_down.weight, self.adapter_down_mask), self.adapter_down.bias)  # (.., b)
        z = self.adapter_dropout(self.adapter_act(z))
        z = F.linear(z, masked(self.adapter_up.weight, self.adapter_up_mask), self.adapter_up.bias)  # (.., d)
        if self.adapter_norm is not None and not self.norm_input:
            z = self.adapter_norm(z)
        return (self.scaling if self.adapter_scale is None else self.scaling * self.adapter_scale) * z

    def forward(self, *args, **kwargs):
        h = self.base_layer(*args, **kwargs)
        if self.parallel:
            x, self.parallel_input = self.parallel_input, None  # dropped at once: no activation outlives the step
            return h + self.adapter(x)
        return h + self.adapter(h)


def _wrap(model: nn.Module, name: str, layer: AdapterLinear) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)


@register
class Adapter(Method):
    name = "adapter"
    config_cls = AdapterConfig
    layered, layer_types = True, (AdapterLinear,)

    def apply(self, model):
        self.sites: dict[str, AdapterLinear] = {}  # module name -> adapter (names as in `model.named_modules()`)
        c, roles = self.cfg, dict(self.model_cfg.modules)
        attn_size, ffn_size = c.sizes()
        if c.placement == "houlsby":
            attn = set(match_modules(model, ["attn_out"], roles)) if "attn_out" in roles else set()
            for name in match_modules(model, list(c.target_modules), roles):
                base = model.get_submodule(name)
                self.sites[name] = AdapterLinear(base, base.out_features, attn_size if name in attn else ffn_size, c)
        else:
            ffn_in = {}  # block -> the FFN's first map, whose input the parallel adapter reads
            if c.placement == "parallel":
                ffn_in = {layer_of(n + "."): n for n in match_modules(model, ["ffn_in"], roles)}
            for name in match_modules(model, ["ffn_out"], roles):
                layer = layer_of(name + ".")
                if c.placement == "parallel":
                    if layer is None or layer not in ffn_in:
                        raise UserError(f"placement=parallel: no `ffn_in` map in the block of {name}")
                    base = model.get_submodule(name)
                    site = AdapterLinear(base, base.out_features, ffn_size, c, parallel=True)
                    model.get_submodule(ffn_in[layer]).register_forward_pre_hook(
                        lambda mod, args, site=site: setattr(site, "parallel_input", args[0]))
                    self.sites[name] = site
                else:  # pfeiffer: the LayerNorm beside the FFN output map (BERT/DeBERTa: `output.LayerNorm`)
                    parent = name.rpartition(".")[0]
                    norms = [f"{parent}.{n}" for n, m in model.get_submodule(parent).named_children()
                             if isinstance(m, nn.LayerNorm)]
                    if not norms:
                        raise UserError(f"placement=pfeiffer: no LayerNorm beside {name}")
                    base = model.get_submodule(norms[0])
                    self.sites[norms[0]] = AdapterLinear(base, base.normalized_shape[0], ffn_size, c)
        for name, site in self.sites.items():
            _wrap(model, name, site)
        self.freeze_except(model, lambda n: ".adapter_" in n)
        return model

    def param_groups(self, model, lr, weight_decay, skip=lambda name: False):
        """Adapter parameters by their own name (a pfeiffer adapter lives inside `LayerNorm`, which the name-based
        convention would exempt): the weight matrices decay; biases, the adapter's LayerNorm and a learnable scale
        do not."""
        def decays(n):
            return n.endswith((".adapter_down.weight", ".adapter_up.weight")) if ".adapter_" in n else not no_decay(n)

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not skip(n)]
        return [{"params": [p for n, p in named if decays(n)], "lr": lr, "weight_decay": weight_decay},
                {"params": [p for n, p in named if not decays(n)], "lr": lr, "weight_decay": 0.0}]
