"""Methods by name. Each module registers one method class; see `base.Method` for the interface."""
from sparse_peft.methods.base import METHODS, Method, build_method, method_config, register  # noqa: F401
from sparse_peft.methods import adalora, adapter, bitfit, full, lora, sora  # noqa: F401,E402  (registration)
