"""AdaLoRA (Zhang et al., ICLR 2023) through `peft`: SVD-form LoRA (P diag(E) Q) whose rank budget is cut from
`init_r` to an average of `target_r` per module by importance, in a cubic schedule between `tinit` and
`total_step - tfinal`. The training loop calls peft's `update_and_allocate` after every optimizer step."""
import math
from dataclasses import dataclass

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraLayer

from sparse_peft import UserError
from sparse_peft.methods.registry import register
from sparse_peft.methods.lora import Lora, LoraMethodConfig
from sparse_peft.models import match_modules


@dataclass
class AdaLoraMethodConfig(LoraMethodConfig):
    init_r: int = 12  # initial rank of every module (the paper's GLUE setting: 12 -> average 8)
    target_r: int = 8  # average final rank
    tinit_ratio: float = 0.1  # fraction of steps before pruning starts
    tfinal_ratio: float = 0.2  # fraction of steps at the end with the final ranks fixed
    delta_t: int = 10  # steps between two budget allocations
    beta1: float = 0.85  # EMA of importance
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.1

    def validate(self):
        super().validate()
        if not 1 <= self.target_r <= self.init_r:
            raise UserError(f"config `method.target_r` must be in [1, init_r={self.init_r}], got {self.target_r}")
        if not (0 <= self.tinit_ratio and 0 <= self.tfinal_ratio and self.tinit_ratio + self.tfinal_ratio < 1):
            raise UserError("config `method.tinit_ratio` and `method.tfinal_ratio` must be >= 0 and sum to < 1")


@register
class AdaLora(Lora):
    name = "adalora"
    config_cls = AdaLoraMethodConfig

    def peft_config(self, model):
        c, total = self.cfg, max(self.total_steps, 1)
        tinit, tfinal = math.floor(c.tinit_ratio * total), math.floor(c.tfinal_ratio * total)
        if tinit >= total - tfinal:
            raise UserError(f"AdaLoRA needs a pruning phase: {total} steps leave none between tinit={tinit} and "
                            f"tfinal={tfinal}; train longer or lower method.tinit_ratio / method.tfinal_ratio")
        return AdaLoraConfig(
            task_type=self.peft_task_type, init_r=c.init_r, target_r=c.target_r, lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout, tinit=tinit, tfinal=tfinal, deltaT=c.delta_t, beta1=c.beta1, beta2=c.beta2,
            orth_reg_weight=c.orth_reg_weight, total_step=total,
            target_modules=match_modules(model, list(c.target_modules), dict(self.model_cfg.modules)),
            modules_to_save=self.head_names(model) or None)

    def apply(self, model):
        self.model = super().apply(model)
        return self.model

    @torch.no_grad()
    def after_optimizer_step(self, model, optimizer, step, loss=None):
        model.base_model.update_and_allocate(step)  # needs the gradients: called before zero_grad

    def state_dict(self):
        """The rank allocator's importance averages and the rank pattern fixed at `total_step - tfinal`: without
        them a resumed run allocates other ranks, and after tfinal peft's masking finds no pattern."""
        alloc, config = self.model.base_model.rankallocator, self.model.peft_config["default"]
        return {"ipt": dict(alloc.ipt), "exp_avg_ipt": dict(alloc.exp_avg_ipt), "exp_avg_unc": dict(alloc.exp_avg_unc),
                "rank_pattern": {k: [bool(x) for x in v] for k, v in (config.rank_pattern or {}).items()}}

    def load_state_dict(self, state):
        alloc, config = self.model.base_model.rankallocator, self.model.peft_config["default"]
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = dict(state["ipt"]), dict(state["exp_avg_ipt"]), dict(state["exp_avg_unc"])
        config.rank_pattern = dict(state["rank_pattern"]) or None

    def ranks(self, model):
        return {n: int(torch.count_nonzero(m.lora_E["default"])) for n, m in model.named_modules()
                if isinstance(m, AdaLoraLayer) and "default" in m.lora_E}

    def retained_params(self, model):
        """As SoRA: each kept rank costs d_in + d_out (E folds into B), plus the trained task head."""
        return self.ranked_retained(model, self.ranks(model))
