"""Methods by name. Each module registers one method class; `base.Method` documents the interface."""
from sparse_peft.methods.base import Method, MethodConfig, count  # noqa: F401
from sparse_peft.methods.registry import METHODS, build_method, method_config, register  # noqa: F401
from sparse_peft.methods import (adalora, adapter, bitfit, dora, full, ist, lora, pst, sora,  # noqa: F401,E402
                                 sparse_adapter)
