"""Full fine-tuning: every parameter trains."""
from sparse_peft.methods.base import Method
from sparse_peft.methods.registry import register


@register
class Full(Method):
    name = "full"

    def apply(self, model):
        self.freeze_except(model, lambda n: True)
        return model
