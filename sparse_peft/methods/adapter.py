"""Houlsby adapter (Houlsby et al., 2019): a bottleneck after the attention output and the FFN output
projections, inside the residual branch: y = W x + s * up(act(down(W x)))."""
import math
from dataclasses import dataclass, field

from torch import nn

from sparse_peft import UserError
from sparse_peft.methods.base import Method, MethodConfig
from sparse_peft.methods.registry import register
from sparse_peft.models import match_modules

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "swish": nn.SiLU}


@dataclass
class AdapterConfig(MethodConfig):
    adapter_size: int = 64  # bottleneck width (the SparseAdapter scripts use 64)
    non_linearity: str = "relu"
    init: str = "bert"  # bert: N(0, 0.02), zero biases | lora: down kaiming, up zeros (exact identity at start)
    scaling: float = 1.0
    adapter_dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["attn_out", "ffn_out"])

    def validate(self):
        if self.adapter_size < 1:
            raise UserError(f"config `method.adapter_size` must be >= 1, got {self.adapter_size}")
        if self.non_linearity not in ACTIVATIONS:
            raise UserError(f"config `method.non_linearity={self.non_linearity}` is not one of {sorted(ACTIVATIONS)}")
        if self.init not in ("bert", "lora"):
            raise UserError(f"config `method.init={self.init}` is not one of bert, lora")


class AdapterLinear(nn.Module):
    """Wraps a frozen linear map; parameters carry the `adapter_` prefix so that name filters find them."""

    def __init__(self, base_layer: nn.Linear, cfg: AdapterConfig):
        super().__init__()
        self.base_layer = base_layer
        d = base_layer.out_features
        self.adapter_down = nn.Linear(d, cfg.adapter_size)
        self.adapter_up = nn.Linear(cfg.adapter_size, d)
        self.adapter_act = ACTIVATIONS[cfg.non_linearity]()
        self.adapter_dropout = nn.Dropout(cfg.adapter_dropout)
        self.scaling = cfg.scaling
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

    def forward(self, x):
        h = self.base_layer(x)
        return h + self.scaling * self.adapter_up(self.adapter_dropout(self.adapter_act(self.adapter_down(h))))


@register
class Adapter(Method):
    name = "adapter"
    config_cls = AdapterConfig
    layered, layer_types = True, (AdapterLinear,)

    def apply(self, model):
        for name in match_modules(model, list(self.cfg.target_modules), dict(self.model_cfg.modules)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, AdapterLinear(getattr(parent, child), self.cfg))
        self.freeze_except(model, lambda n: ".adapter_" in n)
        return model
