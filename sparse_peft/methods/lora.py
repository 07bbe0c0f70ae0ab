"""LoRA (Hu et al., 2022) through `peft`; the task head is trained through peft's `modules_to_save`."""
from dataclasses import dataclass, field

from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from sparse_peft import UserError
from sparse_peft.methods.base import Method, MethodConfig
from sparse_peft.methods.registry import register
from sparse_peft.models import match_modules

SIX_MAPS = ["query", "key", "value", "attn_out", "ffn_in", "ffn_out"]


@dataclass
class LoraMethodConfig(MethodConfig):
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # Roles from model.modules, module-name suffixes, or `re:<regex>`. Default: the six linear maps per layer
    # (SoRA's targets), so that LoRA and SoRA compare like for like.
    target_modules: list = field(default_factory=lambda: list(SIX_MAPS))

    def validate(self):
        if self.lora_r < 1:
            raise UserError(f"config `method.lora_r` must be >= 1, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"config `method.lora_dropout` must be in [0, 1), got {self.lora_dropout}")


@register
class Lora(Method):
    name = "lora"
    config_cls = LoraMethodConfig
    layered, layer_types = True, (LoraLayer,)
    export_format = "peft"

    def peft_config(self, model):
        c = self.cfg
        return LoraConfig(task_type=self.peft_task_type, r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                          target_modules=match_modules(model, list(c.target_modules), dict(self.model_cfg.modules)),
                          modules_to_save=self.head_names(model) or None)

    def apply(self, model):
        heads = self.head_names(model)
        model = get_peft_model(model, self.peft_config(model))
        if not heads:  # peft adds the classifier to modules_to_save for SEQ_CLS; honour train_head=false
            for n, p in model.named_parameters():
                if "modules_to_save" in n:
                    p.requires_grad = False
        return model

    def export(self, model, out_dir):
        model.save_pretrained(str(out_dir))
