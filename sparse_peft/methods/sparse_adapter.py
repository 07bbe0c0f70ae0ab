"""SparseAdapter (He et al., Findings of EMNLP 2022): the `adapter` method, pruned at initialisation.

Before the first step (`on_train_start`, with `prune_batches` training batches) every adapter weight matrix (down
and up; not biases, not the scale) gets a score, and the lowest-scoring fraction `sparsity` of them is removed:

  rand     a standard normal draw                       mag      |w|
  snip     |g * w|, g = dL/dw summed over the batches   synflow  |w * dR/dw|, R = sum of the logits of an all-ones
  grasp    w * (H g): keeps the largest, i.e. removes            input with every parameter replaced by |w| (data-free)
           the largest GraSP score S = -w * (H g), as the
           reference does (it scores w * Hg, removes the smallest)

The reference's SynFlow feeds all-ones to each adapter alone, through the adapter's input LayerNorm, whose output for
a constant input is its bias (zero at init): every score is 0 and its `score <= threshold` rule removes every weight.
Ours scores through the whole network instead (the SynFlow paper's data-free flow), one-shot as the reference.

`mask_scope: global` ranks all adapter weights together, `local` each matrix alone; with `prune_iterations` n > 1
the scores are recomputed n times on the pruned model, keeping density^(k/n) in round k. Scores are computed in
eval mode (no dropout), so the masks depend only on the init, the batches and the seed.

`magnitude_overlap` (logged at every evaluation) is the share of the pruned weights that |w| alone would prune, against
`sparsity` for a mask unrelated to |w|: with the `bert` init's random draw, a score near |w| prunes by that draw.

`sparsity` is the fraction removed (0.4: 40% of the adapter weights are zero); the reference's `--sparsity` is the
kept fraction. Masks are buffers (W * mask in the forward: no gradient reaches a pruned weight) re-applied after
every optimizer step (so nothing, weight decay included, moves a pruned weight off zero), and method state: saved
in checkpoints and restored on resume.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparse_peft import UserError
from sparse_peft.methods.adapter import Adapter, AdapterConfig
from sparse_peft.methods.base import count
from sparse_peft.methods.registry import register
from sparse_peft.runio import save_weights

PRUNERS = ("rand", "mag", "snip", "grasp", "synflow")
SCOPES = ("global", "local")


@dataclass
class SparseAdapterConfig(AdapterConfig):
    sparsity: float = 0.4  # fraction of adapter weights REMOVED (0.4: 40% zero), in [0, 1); the reference: kept
    pruner: str = "snip"  # rand | mag | snip | grasp | synflow
    mask_scope: str = "global"  # global: one ranking over all adapters | local: per weight matrix
    prune_batches: int = 10  # training batches the scores are computed from (10 x 32 = the reference's 320)
    prune_iterations: int = 1  # 1: one-shot; n: n rounds, keeping density^(k/n) in round k

    def validate(self):
        super().validate()
        if not 0 <= self.sparsity < 1:
            raise UserError(f"config `method.sparsity` is the fraction of adapter weights removed and must be in "
                            f"[0, 1), got {self.sparsity}")
        if self.pruner not in PRUNERS:
            raise UserError(f"config `method.pruner={self.pruner}` is not one of {list(PRUNERS)}")
        if self.mask_scope not in SCOPES:
            raise UserError(f"config `method.mask_scope={self.mask_scope}` is not one of {list(SCOPES)}")
        if self.prune_batches < 1:
            raise UserError(f"config `method.prune_batches` must be >= 1, got {self.prune_batches}")
        if self.prune_iterations < 1:
            raise UserError(f"config `method.prune_iterations` must be >= 1, got {self.prune_iterations}")


# --- the pruners: scores (higher = keep) and masks, on any model whose `model(**batch).loss` is the task loss ------
def _grads(loss: torch.Tensor, weights: list[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    gs = torch.autograd.grad(loss, weights, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(gs, weights)]


def _math_attention():
    """GraSP differentiates a backward pass; the fused attention kernels have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # older torch
        return contextlib.nullcontext()


def synflow_inputs(model: nn.Module, batch: dict) -> dict:
    """An all-ones input of the batch's length: embeddings of ones for a transformer, ones for a plain model."""
    if "input_ids" in batch and hasattr(model, "get_input_embeddings"):
        length = batch["input_ids"].shape[1]
        emb = model.get_input_embeddings().weight
        return {"inputs_embeds": torch.ones(1, length, emb.shape[1], device=emb.device, dtype=emb.dtype),
                "attention_mask": torch.ones(1, length, device=emb.device, dtype=torch.long)}
    return {k: torch.ones_like(v[:1]) for k, v in batch.items() if torch.is_floating_point(v)}


def prune_scores(pruner: str, model: nn.Module, weights: dict[str, torch.Tensor], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Importance of every entry of `weights` (name -> parameter of `model`): the highest are kept."""
    names, ws = list(weights), list(weights.values())
    if pruner == "rand":
        return {n: torch.randn_like(w) for n, w in weights.items()}
    if pruner == "mag":
        return {n: w.detach().abs() for n, w in weights.items()}
    if not batches:
        raise UserError(f"method.pruner={pruner} needs training batches (method.prune_batches)")
    if pruner == "snip":  # |dL/dw * w|, the gradient summed over the batches
        g = [torch.zeros_like(w) for w in ws]
        for batch in batches:
            g = [a + b for a, b in zip(g, _grads(model(**batch).loss, ws))]
        return {n: (gi * w).detach().abs() for n, gi, w in zip(names, g, ws)}
    if pruner == "grasp":  # keep the largest w * Hg = remove the largest GraSP score -w * Hg (Wang et al., 2020)
        g = [torch.zeros_like(w) for w in ws]
        for batch in batches:
            g = [a + b for a, b in zip(g, _grads(model(**batch).loss, ws))]
        hg = [torch.zeros_like(w) for w in ws]
        with _math_attention():
            for batch in batches:
                gb = _grads(model(**batch).loss, ws, create_graph=True)
                z = sum((a.detach() * b).sum() for a, b in zip(g, gb))  # g^T grad: its gradient is H g
                hg = [a + b for a, b in zip(hg, _grads(z, ws))]
        return {n: (h * w).detach() for n, h, w in zip(names, hg, ws)}
    if pruner == "synflow":  # |w * dR/dw| with every parameter replaced by |w| (signs restored after)
        params = list(model.parameters())
        with torch.no_grad():
            signs = [torch.sign(p) for p in params]
            for p in params:
                p.abs_()
        try:
            out = model(**synflow_inputs(model, batches[0]))
            g = _grads(out.logits.sum(), ws)
            scores = {n: (gi * w).detach().abs() for n, gi, w in zip(names, g, ws)}
        finally:
            with torch.no_grad():
                for p, s in zip(params, signs):
                    p.mul_(s)
        return scores
    raise UserError(f"unknown pruner `{pruner}`; choose one of {list(PRUNERS)}")


def kept(n: int, density: float) -> int:
    return int(round(density * n))


def top_masks(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """0/1 masks keeping exactly round(density * N) entries with the highest scores, N all entries (`global`) or
    each matrix's (`local`); an entry already masked out stays out."""
    scores = {n: s.float().masked_fill(masks[n] == 0, float("-inf")) for n, s in scores.items()}
    if any(torch.isnan(s).any() for s in scores.values()):
        raise UserError("pruning scores are NaN; try another method.pruner or a smaller trainer.lr")

    def keep_top(flat: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(kept(flat.numel(), density), sorted=False).indices] = True
        return keep

    if scope == "local":
        return {n: keep_top(s.flatten()).view_as(s).to(masks[n].dtype) for n, s in scores.items()}
    keep = keep_top(torch.cat([s.flatten() for s in scores.values()]))
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start:start + s.numel()].view_as(s).to(masks[n].dtype)
        start += s.numel()
    return out


def prune(model: nn.Module, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], batches: list[dict],
          pruner: str, sparsity: float, scope: str = "global", iterations: int = 1) -> float:
    """Set `masks` (name -> 0/1 tensor, in place) and zero the pruned entries of `weights`; scores in eval mode.
    Returns the magnitude overlap: the share of the pruned weights that |w| at the same density and scope would
    prune too (1.0: the pruner decided nothing |w| did not; a mask independent of |w| gives `sparsity`)."""
    by_magnitude = top_masks({n: w.detach().abs() for n, w in weights.items()}, masks, 1 - sparsity, scope)
    was_training = model.training
    model.eval()
    try:
        for k in range(1, iterations + 1):
            new = top_masks(prune_scores(pruner, model, weights, batches), masks, (1 - sparsity) ** (k / iterations), scope)
            with torch.no_grad():
                for n, w in weights.items():
                    masks[n].copy_(new[n])
                    w.mul_(masks[n])
    finally:
        model.train(was_training)
    pruned = sum(int((m == 0).sum()) for m in masks.values())
    same = sum(int(((masks[n] == 0) & (by_magnitude[n] == 0)).sum()) for n in masks)
    return same / pruned if pruned else 1.0


# --- the method ---------------------------------------------------------------------------------------------------
@register
class SparseAdapter(Adapter):
    name = "sparse_adapter"
    config_cls = SparseAdapterConfig

    @property
    def train_start_batches(self) -> int:
        return self.cfg.prune_batches if self.cfg.sparsity > 0 else 0

    def apply(self, model):
        model = super().apply(model)
        for site in self.sites.values():
            site.adapter_down_mask = torch.ones_like(site.adapter_down.weight, requires_grad=False)
            site.adapter_up_mask = torch.ones_like(site.adapter_up.weight, requires_grad=False)
        self.pruned = False  # masks set by `on_train_start` or restored by `load_state_dict`
        self.magnitude_overlap = None
        return model

    def weights_and_masks(self) -> tuple[dict[str, nn.Parameter], dict[str, torch.Tensor]]:
        """Parameter name -> adapter weight matrix, and -> its mask buffer (read now: `.to(device)` replaces them)."""
        weights, masks = {}, {}
        for name, site in self.sites.items():
            for part in ("down", "up"):
                key = f"{name}.adapter_{part}.weight"
                weights[key] = getattr(site, f"adapter_{part}").weight
                masks[key] = getattr(site, f"adapter_{part}_mask")
        return weights, masks

    def on_train_start(self, model, batches):
        if self.cfg.sparsity > 0:
            weights, masks = self.weights_and_masks()
            c = self.cfg
            self.magnitude_overlap = prune(model, weights, masks, batches, c.pruner, c.sparsity, c.mask_scope,
                                           c.prune_iterations)
        self.pruned = True

    def log_values(self, model):
        """Is the mask data-driven? `magnitude_overlap` against `sparsity`, its value for a mask unrelated to |w|."""
        if self.magnitude_overlap is None:
            return super().log_values(model)
        return {**super().log_values(model), "magnitude_overlap": self.magnitude_overlap,
                "magnitude_overlap_chance": self.cfg.sparsity}

    def after_optimizer_step(self, model, optimizer, step, loss=None):
        # The masked forward already gives pruned weights zero gradient; this also undoes anything else that would
        # move them (weight decay on a -0.0, an optimizer that adds noise).
        if self.cfg.sparsity > 0:
            weights, masks = self.weights_and_masks()
            with torch.no_grad():
                for n, w in weights.items():
                    w.mul_(masks[n])

    def state_dict(self):
        _, masks = self.weights_and_masks()
        return {"masks": {n: m.detach().to("cpu", torch.bool) for n, m in masks.items()},
                "magnitude_overlap": self.magnitude_overlap}

    def load_state_dict(self, state):
        saved = state.get("masks") or {}
        weights, masks = self.weights_and_masks()
        if set(saved) != set(masks):
            raise ValueError(f"method {self.name}: the checkpoint's masks ({len(saved)}) do not match this model's "
                             f"adapters ({len(masks)}); was it written with another method config?")
        with torch.no_grad():
            for n, m in masks.items():
                m.copy_(saved[n].to(m.device, m.dtype))
                weights[n].mul_(m)
        self.pruned = True
        self.magnitude_overlap = state.get("magnitude_overlap")

    def current_masks(self) -> dict[str, torch.Tensor]:
        """The mask buffers once pruned or restored; before that (weights loaded from a finished run's
        model.safetensors, as `python -m sparse_peft.export` does) the non-zero pattern of the weights."""
        weights, masks = self.weights_and_masks()
        if self.pruned or self.cfg.sparsity == 0:
            return masks
        return {n: (w != 0).to(w.dtype) for n, w in weights.items()}

    def retained_params(self, model):
        """Non-zero (kept) adapter weights + every other trained parameter (biases, scales, the task head)."""
        masks = self.current_masks()
        trained = set(self.trained) - set(masks)
        return count(p for n, p in model.named_parameters() if n in trained) + sum(int(m.sum()) for m in masks.values())

    def export(self, model, out_dir: Path):
        """trainable.safetensors (masked adapter weights, biases, head), masks.safetensors (0/1, same names as the
        weights), sparse_adapter.json (placement, sizes, per-matrix density, retained parameters)."""
        super().export(model, out_dir)
        masks = {n: m.detach().to("cpu", torch.uint8, copy=True) for n, m in self.current_masks().items()}
        save_weights(masks, out_dir / "masks.safetensors")
        c = self.cfg
        attn_size, ffn_size = c.sizes()
        info = {"method": self.name, "placement": c.placement, "attn_size": attn_size, "ffn_size": ffn_size,
                "sparsity": c.sparsity, "pruner": c.pruner, "mask_scope": c.mask_scope,
                "retained_params": self.retained_params(model),
                "density": {n: float(m.float().mean()) for n, m in masks.items()}}
        (out_dir / "sparse_adapter.json").write_text(json.dumps(info, indent=2) + "\n")
