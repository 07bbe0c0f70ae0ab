"""A method that wraps a layer method (`method.base: lora`, the inner method's own keys in `method.inner`).

Every hook goes to the inner method unless the wrapper overrides it; the wrapper reaches the inner method's
per-layer parameters (`layer_params`) and per-layer output scaling (`scale_layer`). IST/RST are wrappers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sparse_peft import UserError
from sparse_peft.methods.base import Method, MethodConfig
from sparse_peft.methods.registry import METHODS, method_config


@dataclass
class WrapperConfig(MethodConfig):
    base: str = "lora"  # the layer method inside (lora, dora, adapter, sora)
    inner: dict = field(default_factory=dict)  # the inner method's own keys, e.g. {lora_r: 32, lora_alpha: 64}

    def inner_config(self):
        cls = METHODS.get(self.base)
        if cls is None or not cls.layered:
            layered = sorted(n for n, m in METHODS.items() if m.layered)
            what = "is not a method" if cls is None else "has no per-layer parameters"
            raise UserError(f"config `method.base={self.base}` {what}; choose one of {layered}")
        return method_config({"name": self.base, "train_head": self.train_head, **self.inner})

    def validate(self):
        self.inner_config()


class Wrapper(Method):
    config_cls = WrapperConfig

    def __init__(self, cfg, model_cfg, total_steps: int = 0, task=None):
        super().__init__(cfg, model_cfg, total_steps, task)
        inner_cfg = cfg.inner_config()
        self.inner = METHODS[inner_cfg.name](inner_cfg, model_cfg, total_steps, task)

    def apply(self, model):
        return self.inner.inject(model)

    def param_groups(self, model, lr, weight_decay):
        return self.inner.param_groups(model, lr, weight_decay)

    def on_train_start(self, model, batches):
        self.inner.on_train_start(model, batches)

    def on_step_begin(self, model, step):
        self.inner.on_step_begin(model, step)

    def regularization_loss(self, model):
        return self.inner.regularization_loss(model)

    def after_optimizer_step(self, model, optimizer, step, loss=None):
        self.inner.after_optimizer_step(model, optimizer, step, loss)

    def state_dict(self):
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state.get("inner", {}))

    def log_values(self, model):
        return self.inner.log_values(model)

    def ranks(self, model):
        return self.inner.ranks(model)

    def retained_params(self, model):
        return self.inner.retained_params(model)

    def export(self, model, out_dir):
        self.inner.export(model, out_dir)

    def layer_params(self, model):
        return self.inner.layer_params(model)

    def layer_modules(self, model):
        return self.inner.layer_modules(model)

    def scale_layer(self, model, layer, factor):
        self.inner.scale_layer(model, layer, factor)

    @property
    def export_format(self) -> str:
        return self.inner.export_format

    @property
    def train_start_batches(self) -> int:
        return self.inner.train_start_batches
