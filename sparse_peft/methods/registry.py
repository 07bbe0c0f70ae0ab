"""Methods by name: each method module registers its class with `@register`."""
from __future__ import annotations

from sparse_peft import UserError
from sparse_peft.schema import typed

METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    METHODS[cls.name] = cls
    return cls


def method_config(node):
    name = (node or {}).get("name")
    if name not in METHODS:
        raise UserError(f"unknown method `{name}`; choose method=<name> with name in {sorted(METHODS)}")
    cfg = typed(node, METHODS[name].config_cls, "method")
    cfg.validate() if hasattr(cfg, "validate") else None
    return cfg


def build_method(cfg, model_cfg, total_steps: int = 0, task=None):
    return METHODS[cfg.name](cfg, model_cfg, total_steps, task)
