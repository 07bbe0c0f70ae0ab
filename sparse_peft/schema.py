"""Config nodes merged into typed dataclass schemas: a typo'd key or a wrong type fails at start, in one line."""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparse_peft import UserError


def typed(node: Any, schema: type, where: str):
    """Merge a config node into its schema and return the dataclass instance; one clear error otherwise.
    A schema may list allowed values per key in a class attribute `CHOICES = {key: (values...)}`."""
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node or {}))
    except OmegaConfBaseException as e:
        key = f"{where}.{e.full_key}" if getattr(e, "full_key", None) else where
        msg = str(e).splitlines()[0]
        raise UserError(f"config `{key}`: {msg}; fix the key or value in configs/ or on the command line") from None
    for key, allowed in getattr(schema, "CHOICES", {}).items():
        if getattr(obj, key) not in allowed:
            raise UserError(f"config `{where}.{key}={getattr(obj, key)}` is not one of {list(allowed)}")
    return obj


def check_positive(where: str, **values: float) -> None:
    for key, value in values.items():
        if value is None or value <= 0:
            raise UserError(f"config `{where}.{key}` must be > 0, got {value}")
