"""BitFit (Ben Zaken et al., 2022): only bias terms (all of them, LayerNorm biases included) and the head."""
from sparse_peft.methods.base import Method
from sparse_peft.methods.registry import register


@register
class BitFit(Method):
    name = "bitfit"

    def apply(self, model):
        self.freeze_except(model, lambda n: n.endswith(".bias"))
        return model
