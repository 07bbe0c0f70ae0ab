"""IST (Yao et al., Findings of EMNLP 2024) and RST: each step, train the inner method's parameters of a sampled
subset of the blocks only. Facts and decisions: ../shared/METHODS.md (IST / RST).

Wraps a layer method (`method.base: lora | dora | adapter | sora`, anything with per-layer parameters and an output
scaling). L = the blocks that hold the inner method's parameters (`encoder.layer.N`, `model.layers.N`, ...).

Every step (`on_step_begin`) `n_update` blocks are drawn; only their inner parameters keep `requires_grad`. A frozen
parameter's `.grad` stays None (the loop zeroes with `set_to_none=True`), so AdamW neither decays nor moves it that
step. The task head always trains. IST draws by multinomial(sigmoid(-score)) without replacement; RST uniformly.

IST's importance update, every `update_interval` steps (step > 0), without gradients, on one training batch of
`importance_batch_size` examples (`draw_batch`, the same batch for the same step on a resumed run): for rounds
k = 1..rl_steps draw a set S_k of `n_suppress` blocks by multinomial(sigmoid(score)) (the sets distinct while there
are enough of them), scale their inner outputs by `response_suppression`, loss_k in eval mode, restore the scaling;
r_k = exp(-loss_k) - mean_j exp(-loss_j); with p = sigmoid(score) before the update,
score_i += rl_lr * r_k * p_i (1 - p_i) for each i in S_k. A higher score = a less important block (trained less).

Memory: below the lowest active block no parameter needs a gradient (the embeddings and the base weights are frozen),
so autograd records nothing there: no saved activations and no backward below it (tests/test_ist.py checks that the
hidden states entering that block do not require grad). Frozen inner parameters hold no gradient buffers.
A frozen block above the lowest active one still keeps its activations (backward passes through it to reach the
active blocks below). `recompute_frozen: true` checkpoints those blocks only (transformers' per-block gradient
checkpointing, switched each step): they keep just their input and are re-run in backward, with the same dropout
draws, so the gradients are unchanged; less memory, one extra forward of those blocks per step. Not in the paper.

Sampling uses its own generator, seeded from the run's seed (`torch.initial_seed()` when the method is applied, which
`set_seed(trainer.seed)` fixed), so the run's RNG stream is untouched; the generator state and the scores are in
`state_dict()`, so a resumed run draws the same blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from sparse_peft import UserError
from sparse_peft.methods.base import layer_of
from sparse_peft.methods.registry import register
from sparse_peft.methods.wrapper import Wrapper, WrapperConfig

# The paper's defaults as fractions of L (null in the config): ceil, so that a small model still trains a block.
UPDATE_FRACTION, SUPPRESS_FRACTION = 0.25, 0.5
MAX_DRAWS = 1000  # tries for distinct suppression sets before a repeat is accepted (near-deterministic scores)


@dataclass
class RstConfig(WrapperConfig):
    n_update: Optional[int] = None  # blocks trained per step; null = ceil(25% of L)
    recompute_frozen: bool = False  # re-run the frozen blocks above the lowest active one in backward (less memory)

    def validate(self):
        super().validate()
        if self.n_update is not None and self.n_update < 1:
            raise UserError(f"config `method.n_update` must be >= 1 (or null = 25% of the layers), got {self.n_update}")


@dataclass
class IstConfig(RstConfig):
    update_interval: int = 10  # steps between importance updates (each costs rl_steps no-grad forwards)
    n_suppress: Optional[int] = None  # blocks suppressed per round; null = ceil(50% of L)
    rl_steps: int = 3  # rounds (forwards) per importance update
    response_suppression: float = 0.25  # factor on the suppressed blocks' inner output
    rl_lr: float = 10.0  # step size of the score update
    importance_batch_size: int = 16  # training examples per importance update

    def validate(self):
        super().validate()
        for key in ("update_interval", "rl_steps", "importance_batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"config `method.{key}` must be >= 1, got {getattr(self, key)}")
        if self.n_suppress is not None and self.n_suppress < 1:
            raise UserError(f"config `method.n_suppress` must be >= 1 (or null = 50% of the layers), got {self.n_suppress}")
        for key in ("response_suppression", "rl_lr"):
            if getattr(self, key) < 0:
                raise UserError(f"config `method.{key}` must be >= 0, got {getattr(self, key)}")


def importance_update(scores: torch.Tensor, sets: list[list[int]], losses: list[float], rl_lr: float) -> torch.Tensor:
    """The new scores after one importance update: r_k = exp(-loss_k) - mean(exp(-loss)); p = sigmoid(scores);
    score_i += rl_lr * r_k * p_i (1 - p_i) for every i in sets[k] (positions in `scores`)."""
    reward = torch.exp(-torch.tensor(losses, dtype=scores.dtype))
    reward = reward - reward.mean()
    p = torch.sigmoid(scores)
    new = scores.clone()
    for r, s in zip(reward, sets):
        idx = torch.tensor(s, dtype=torch.long)
        new[idx] += rl_lr * r * p[idx] * (1 - p[idx])
    return new


def checkpointable_blocks(model: nn.Module, layers: list[int]) -> dict[int, GradientCheckpointingLayer]:
    """The transformer blocks `layers` (by index), set up for transformers' per-block checkpointing (off until
    `gradient_checkpointing` is set on a block)."""
    # a block's own name ends in its index ("model.layers.3"); its submodules' names carry the index mid-name
    blocks = {layer_of(n + "."): m for n, m in model.named_modules()
              if layer_of(n + ".") in layers and layer_of(n) is None and isinstance(m, GradientCheckpointingLayer)}
    if sorted(blocks) != sorted(layers):
        raise UserError(f"`method.recompute_frozen=true` needs transformers blocks that support gradient checkpointing "
                        f"(GradientCheckpointingLayer); {type(model).__name__} has none in layers "
                        f"{sorted(set(layers) - set(blocks))}: set it to false")
    for block in blocks.values():
        block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)  # keeps the dropout draws
    return blocks


class LayerSampling(Wrapper):
    """What IST and RST share: counting the blocks, the per-step freezing, the generator, state and logging."""

    def __init__(self, cfg, model_cfg, total_steps: int = 0, task=None):
        super().__init__(cfg, model_cfg, total_steps, task)
        self.layers: list[int] = []  # block indices that hold inner parameters
        self.active: list[int] = []  # this step's trained blocks
        self.generator = torch.Generator()
        self.blocks: dict[int, GradientCheckpointingLayer] = {}  # checkpointed when frozen (`recompute_frozen`)

    def count_of(self, key: str, fraction: float, n_layers: int) -> int:
        value = getattr(self.cfg, key)
        n = max(1, math.ceil(fraction * n_layers)) if value is None else value
        if not 1 <= n <= n_layers:
            raise UserError(f"config `method.{key}={value}` must be in [1, {n_layers}]: the model has {n_layers} "
                            f"layers with `method.base={self.cfg.base}` parameters")
        return n

    def apply(self, model):
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            # DDP expects a gradient for every parameter it registered; the frozen layers change every step
            raise UserError(f"method={self.name} trains different layers every step: multi-process (DDP) runs are not "
                            f"supported; run it in one process")
        model = super().apply(model)
        self.layers = list(self.inner.layer_params(model))
        if not self.layers:
            raise UserError(f"`method.base={self.cfg.base}` put no parameters inside the model's layers "
                            f"(`layers.N` / `layer.N` blocks); check its target_modules")
        self.n_update = self.count_of("n_update", UPDATE_FRACTION, len(self.layers))
        if self.cfg.recompute_frozen and not getattr(self.model_cfg, "gradient_checkpointing", False):
            self.blocks = checkpointable_blocks(model, self.layers)
        self.generator.manual_seed(torch.initial_seed())  # the run's seed: set_seed(trainer.seed) ran before
        return model

    def sample(self) -> list[int]:
        """Positions (in `self.layers`) of the blocks to train this step."""
        raise NotImplementedError

    def on_step_begin(self, model, step):
        self.inner.on_step_begin(model, step)
        active = set(self.layers[i] for i in self.sample())
        self.active = sorted(active)
        for layer, params in self.inner.layer_params(model).items():
            for _, p in params:
                p.requires_grad_(layer in active)
        for layer, block in self.blocks.items():  # empty unless `recompute_frozen`
            block.gradient_checkpointing = layer > self.active[0] and layer not in active

    def state_dict(self):
        return {**super().state_dict(), "generator": self.generator.get_state(), "active": list(self.active)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
        self.active = list(state["active"])

    def log_values(self, model):
        return {**super().log_values(model), "ist_active": list(self.active)}


@register
class Rst(LayerSampling):
    """RST: `n_update` blocks drawn uniformly each step, no importance scores."""

    name = "rst"
    config_cls = RstConfig

    def sample(self):
        return torch.randperm(len(self.layers), generator=self.generator)[: self.n_update].tolist()


@register
class Ist(LayerSampling):
    """IST: blocks drawn by learned importance; the scores are updated every `update_interval` steps."""

    name = "ist"
    config_cls = IstConfig

    def __init__(self, cfg, model_cfg, total_steps: int = 0, task=None):
        super().__init__(cfg, model_cfg, total_steps, task)
        self.scores = torch.zeros(0)

    def apply(self, model):
        model = super().apply(model)
        self.n_suppress = self.count_of("n_suppress", SUPPRESS_FRACTION, len(self.layers))
        modules = self.inner.layer_modules(model)
        missing = [layer for layer in self.layers if not modules.get(layer)]
        if missing:
            raise UserError(f"`method.base={self.cfg.base}` has no per-layer output scaling in layers {missing}: "
                            f"IST's importance update needs one (use method=rst, or a base with a scaling)")
        self.scores = torch.zeros(len(self.layers))
        return model

    def sample(self):
        return torch.multinomial(torch.sigmoid(-self.scores), self.n_update, replacement=False,
                                 generator=self.generator).tolist()

    def on_step_begin(self, model, step):
        if step > 0 and step % self.cfg.update_interval == 0:
            self.update_importance(model, step)
        super().on_step_begin(model, step)

    def suppression_sets(self) -> list[list[int]]:
        """`rl_steps` sets of `n_suppress` positions drawn by multinomial(sigmoid(score)), distinct while the
        C(L, n_suppress) possible sets allow it (and within MAX_DRAWS tries)."""
        weights, sets, tries = torch.sigmoid(self.scores), [], 0
        possible = math.comb(len(self.layers), self.n_suppress)
        while len(sets) < self.cfg.rl_steps:
            s = sorted(torch.multinomial(weights, self.n_suppress, replacement=False, generator=self.generator).tolist())
            tries += 1
            if s not in sets or len({tuple(x) for x in sets}) >= possible or tries > MAX_DRAWS:
                sets.append(s)
        return sets

    @torch.no_grad()
    def update_importance(self, model: nn.Module, step: int) -> None:
        if self.draw_batch is None:
            raise RuntimeError("IST's importance update needs training batches: set `method.draw_batch` "
                               "(sparse_peft.loop.fit does)")
        batch = self.draw_batch(step, self.cfg.importance_batch_size)
        sets, losses, training = self.suppression_sets(), [], model.training
        model.eval()
        try:
            for s in sets:
                for i in s:
                    self.scale_layer(model, self.layers[i], self.cfg.response_suppression)
                try:
                    losses.append(float(model(**batch).loss))
                finally:
                    for i in s:
                        self.scale_layer(model, self.layers[i], 1.0)
        finally:
            model.train(training)
        self.scores = importance_update(self.scores, sets, losses, self.cfg.rl_lr)

    def state_dict(self):
        return {**super().state_dict(), "scores": self.scores.clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.scores = state["scores"].clone()

    def log_values(self, model):
        return {**super().log_values(model), "ist_scores": [float(s) for s in self.scores]}
