"""DoRA (Liu et al., ICML 2024) through `peft`: LoRA whose merged weight is split into a trained per-output-channel
magnitude and a direction (`LoraConfig(use_dora=True)`); same targets and counts as LoRA plus one magnitude vector
(d_out) per target module."""
from peft import LoraConfig

from sparse_peft.methods.lora import Lora, LoraMethodConfig
from sparse_peft.methods.registry import register


@register
class Dora(Lora):
    name = "dora"
    config_cls = LoraMethodConfig

    def peft_config(self, model) -> LoraConfig:
        config = super().peft_config(model)
        config.use_dora = True
        return config
