"""IST / RST: only the sampled layers train, the importance update's formula, reproducible and uniform sampling,
exact resume, the memory that frozen layers save, and clear errors for bad input. Encoders (tiny BERT,
`encoder.layer.N`) and decoders (a random tiny LLaMA from `LlamaConfig`, `model.layers.N`)."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from conftest import make_cfg
from sparse_peft import UserError
from sparse_peft.config import load_run_config
from sparse_peft.methods import method_config
from sparse_peft.methods.ist import checkpointable_blocks, importance_update
from sparse_peft.methods.registry import build_method
from sparse_peft.models import build_model, load_tokenizer
from sparse_peft.tasks import build_task
from test_lifecycle import STEPS, resume_matches

LLAMA = SimpleNamespace(name="llama_test", head_modules=["score"],
                        modules={"query": "q_proj", "key": "k_proj", "value": "v_proj", "attn_out": "o_proj",
                                 "ffn_in": "up_proj", "ffn_out": "down_proj"})


def build(arch: str, method: str, base: str = "lora", layers: int = 4, seed: int = 0, **keys):
    """(model with the method injected, method): a random tiny BERT or LLaMA classifier with `layers` blocks."""
    if arch == "bert":
        run = load_run_config(make_cfg(["model=tiny_bert", f"model.config.num_hidden_layers={layers}",
                                        "logger.wandb.mode=disabled"]))
        model_cfg = run.model
        torch.manual_seed(seed)
        model = build_model(model_cfg, build_task(run.task, run.data), load_tokenizer(model_cfg))
    else:
        model_cfg = LLAMA
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=2))
    cfg = method_config({"name": method, "base": base, **keys})
    meth = build_method(cfg, model_cfg)
    return meth.inject(model), meth


def batch(n: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(n) % 2}


def is_head(name: str) -> bool:
    return "classifier" in name or "pooler" in name or "score" in name


@pytest.mark.parametrize("arch, method, base", [("bert", "ist", "lora"), ("bert", "ist", "adapter"),
                                                ("bert", "ist", "sora"), ("bert", "rst", "lora"),
                                                ("llama", "ist", "lora"), ("llama", "ist", "adapter"),
                                                ("llama", "ist", "dora"), ("bert", "rst", "dora")])
def test_only_the_sampled_layers_change(arch, method, base):
    model, meth = build(arch, method, base, **({"update_interval": 2} if method == "ist" else {}))
    meth.draw_batch = lambda key, size: batch(size, seed=100 + key)
    layers = meth.layer_params(model)
    assert sorted(layers) == [0, 1, 2, 3] and meth.n_update == 1
    # weight decay: an AdamW step on a parameter that is not frozen would change it even with a zero gradient
    opt = torch.optim.AdamW(meth.param_groups(model, 1e-2, 0.1))
    model.train()
    seen = set()
    for step in range(6):
        meth.on_step_begin(model, step)
        assert len(meth.active) == 1
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = model(**batch(seed=step)).loss
        reg = meth.regularization_loss(model)
        (loss + reg if reg is not None else loss).backward()
        for layer, params in layers.items():  # frozen layers hold no gradient buffers
            assert all((p.grad is None) == (layer not in meth.active) for _, p in params)
        opt.step()
        meth.after_optimizer_step(model, opt, step, loss.item())
        opt.zero_grad(set_to_none=True)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        active = {n for layer in meth.active for n, _ in layers[layer]}
        assert changed - active == {n for n in changed if is_head(n)} != set(), "only active layers and the head"
        assert active <= changed, "every parameter of an active layer moves (weight decay at least)"
        seen |= set(meth.active)
    assert len(seen) > 1


def test_importance_update_equals_the_formula_by_hand():
    scores = torch.tensor([0.0, 1.0, -1.0, 0.5])
    sets, losses, lr = [[0, 1], [2, 3], [0, 2]], [1.0, 2.0, 0.5], 10.0
    r = [math.exp(-x) for x in losses]
    r = [x - sum(r) / 3 for x in r]
    p = [1 / (1 + math.exp(-s)) for s in scores.tolist()]
    want = scores.tolist()
    for rk, s in zip(r, sets):
        for i in s:
            want[i] += lr * rk * p[i] * (1 - p[i])
    assert torch.allclose(importance_update(scores, sets, losses, lr), torch.tensor(want), atol=1e-6)
    # the worst round (highest loss: layers 2, 3 suppressed hurt most) makes those layers more important
    new = importance_update(torch.zeros(4), [[0, 1], [2, 3]], [1.0, 2.0], lr)
    assert new[0] == new[1] > 0 > new[2] == new[3]


@pytest.mark.parametrize("arch, base", [("bert", "lora"), ("bert", "sora"), ("llama", "adapter")])
def test_the_importance_loop_suppresses_forwards_and_restores(arch, base):
    model, meth = build(arch, "ist", base, layers=6, update_interval=1)
    assert (meth.n_update, meth.n_suppress) == (2, 3)
    with torch.no_grad():  # as if trained: LoRA's B starts at zero, and a zero adapter has nothing to suppress
        for params in meth.layer_params(model).values():
            for _, p in params:
                p.add_(0.2 * torch.randn_like(p))
    b = batch(8)
    meth.draw_batch = lambda key, size: b
    meth.scores = torch.tensor([0.5, -0.5, 1.0, 0.0, -1.0, 0.2])
    model.train()
    with torch.no_grad():
        model.eval()
        out = model(**b).logits
        model.train()
    state = meth.generator.get_state()
    sets = meth.suppression_sets()
    assert len(sets) == 3 and len({tuple(s) for s in sets}) == 3 and all(len(s) == 3 for s in sets)
    losses = []
    model.eval()
    with torch.no_grad():
        for s in sets:
            for i in s:
                meth.scale_layer(model, meth.layers[i], 0.25)
            losses.append(float(model(**b).loss))
            for i in s:
                meth.scale_layer(model, meth.layers[i], 1.0)
    model.train()
    meth.generator.set_state(state)
    want = importance_update(meth.scores, sets, losses, 10.0)
    meth.on_step_begin(model, 1)  # step 1, interval 1: the importance update, then the sampling
    assert torch.allclose(meth.scores, want) and not torch.equal(want, torch.tensor([0.5, -0.5, 1.0, 0.0, -1.0, 0.2]))
    assert model.training
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(**b).logits, out), "the scaling is restored exactly"
    assert len(set(losses)) == 3, "each round's suppression changed the loss"


def draws(meth, steps: int = 30) -> list[list[int]]:
    return [meth.sample() for _ in range(steps)]


def test_sampling_is_reproducible_with_a_fixed_seed():
    runs = [draws(build("bert", "ist", seed=s)[1]) for s in (0, 0, 1)]
    assert runs[0] == runs[1] != runs[2]
    _, meth = build("bert", "ist", layers=8, n_update=3)
    meth.scores = torch.tensor([4.0, 4.0, 4.0, 4.0, -4.0, -4.0, -4.0, -4.0])  # high score = less important
    counts = torch.bincount(torch.tensor(draws(meth, 500)).flatten(), minlength=8)
    assert counts[4:].sum() > 10 * counts[:4].sum()


def test_rst_samples_layers_uniformly():
    _, meth = build("bert", "rst", layers=8, n_update=2)
    n = 4000
    picks = draws(meth, n)
    assert all(len(set(p)) == 2 for p in picks)
    counts = torch.bincount(torch.tensor(picks).flatten(), minlength=8).double()
    expected = 2 * n / 8
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 24.3, (counts, chi2)  # chi-square, 7 dof: p = 0.001
    pairs = torch.zeros(8, 8)
    for a, b in picks:
        pairs[min(a, b), max(a, b)] += 1
    pair_counts = pairs[torch.triu(torch.ones(8, 8), 1).bool()]
    chi2 = ((pair_counts - n / 28) ** 2 / (n / 28)).sum()
    assert chi2 < 55.5, chi2  # 27 dof: p = 0.001


def block_inputs(model):
    """{block index: whether the hidden states entering it required grad} for the next forward."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        m = re.fullmatch(r".*\.(?:layer|layers)\.(\d+)", name)
        if m:
            def hook(mod, args, kwargs, i=int(m.group(1))):
                h = args[0] if args else kwargs["hidden_states"]
                seen[i] = h.requires_grad
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def saved_bytes(model, b) -> int:
    """Bytes of the (non-parameter) tensors autograd keeps for the backward of one forward."""
    params = {p.data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**b).loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_nothing_below_the_lowest_active_layer_is_recorded(arch):
    model, meth = build(arch, "ist", layers=6, n_update=2)
    model.train()
    b = batch(8)
    sizes = {}
    for active in ([4, 5], [0, 1], [0, 1, 2, 3, 4, 5]):
        for layer, params in meth.layer_params(model).items():
            for _, p in params:
                p.requires_grad_(layer in active)
        seen, handles = block_inputs(model)
        sizes[tuple(active)] = saved_bytes(model, b)
        for h in handles:
            h.remove()
        assert sorted(seen) == list(range(6))
        assert [seen[i] for i in range(6)] == [i > min(active) for i in range(6)]
        model.zero_grad(set_to_none=True)
    assert sizes[(4, 5)] < 0.6 * sizes[(0, 1, 2, 3, 4, 5)]
    assert sizes[(0, 1)] < sizes[(0, 1, 2, 3, 4, 5)]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_recompute_frozen_keeps_the_gradients_and_saves_the_frozen_blocks_activations(arch):
    """`recompute_frozen`: the frozen blocks above the lowest active one are checkpointed, so backward keeps fewer
    bytes; their re-run replays the same dropout draws, so every gradient equals the plain run's."""
    keys = {"n_update": 2, "inner": {"lora_dropout": 0.3}}
    runs = {}
    for recompute in (False, True):
        model, meth = build(arch, "ist", layers=6, recompute_frozen=recompute, **keys)
        meth.sample = lambda: [1, 4]  # positions in meth.layers: blocks 1 and 4 train, 2, 3, 5 are re-run
        meth.on_step_begin(model, 0)
        model.train()
        torch.manual_seed(7)
        runs[recompute] = saved_bytes(model, batch(8)), {n: p.grad for n, p in model.named_parameters()
                                                          if p.grad is not None}, meth
    (plain, plain_grads, _), (less, grads, meth) = runs[False], runs[True]
    assert {i for i, b in meth.blocks.items() if b.gradient_checkpointing} == {2, 3, 5}
    assert less < 0.8 * plain
    assert grads.keys() == plain_grads.keys() and any(".4." in n for n in grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, plain_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_recompute_frozen_without_checkpointable_blocks_is_a_clear_error():
    toy = torch.nn.Module()
    toy.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    with pytest.raises(UserError, match=r"recompute_frozen=true` needs transformers blocks .* layers \[0, 1\]"):
        checkpointable_blocks(toy, [0, 1])


@pytest.mark.parametrize("method", ["ist", "rst"])
def test_a_resumed_run_samples_the_same_layers(tmp_path, tiny_glue, monkeypatch, method):
    extra = ["model.config.num_hidden_layers=4", "method.update_interval=3"] if method == "ist" else \
        ["model.config.num_hidden_layers=4"]
    ref, curve = resume_matches(tmp_path, tiny_glue, monkeypatch, [f"method={method}", *STEPS, *extra], 6)
    assert len({tuple(r["ist_active"]) for r in curve}) > 1
    if method == "ist":  # the scores moved (updates at steps 3, 6, 9) and were restored on resume
        assert curve[-1]["ist_scores"] != [0.0] * 4 and curve[-1]["ist_scores"] != curve[2]["ist_scores"]


@pytest.mark.parametrize("keys, message", [
    ({"n_update": 0}, r"method.n_update` must be >= 1"),
    ({"base": "full"}, r"method.base=full` has no per-layer parameters"),
    ({"base": "nope"}, r"method.base=nope` is not a method"),
    ({"rl_steps": 0}, r"method.rl_steps` must be >= 1"),
])
def test_bad_config_is_a_clear_error(keys, message):
    with pytest.raises(UserError, match=message):
        method_config({"name": "ist", **keys})


@pytest.mark.parametrize("method, keys", [("ist", {"n_update": 3}), ("rst", {"n_update": 3}),
                                          ("ist", {"n_suppress": 5})])
def test_too_many_layers_is_a_clear_error(method, keys):
    with pytest.raises(UserError, match=r"must be in \[1, 2\]: the model has 2 layers"):
        build("bert", method, layers=2, **keys)


@pytest.mark.parametrize("recompute", ["false", "true"])
def test_step_benchmark_records_each_steps_bytes_and_lowest_trained_layer(tmp_path, tiny_glue, recompute):
    """benchmarks/ist_step.py end to end on a tiny BERT: per measured step, IST's bytes and its lowest trained block;
    with one of two blocks trained, every IST step keeps fewer bytes for backward than any LoRA step."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "ist_step.py"
    out = tmp_path / "ist.json"
    subprocess.run([sys.executable, str(bench), "--model", "tiny_bert", "--task", "glue/rte", "--data-root",
                    str(tiny_glue), "--batch-size", "4", "--steps", "2", "--warmup", "1", "--block", "1",
                    "--mem-steps", "4", "--threads", "1", "--device", "cpu", "--ist-key",
                    f"recompute_frozen={recompute}", "--out", str(out)], check=True, capture_output=True)
    mem = json.loads(out.read_text())["memory"]
    ist, base = mem["ist"], mem["base"]
    assert (ist["layers"], ist["n_update"]) == (2, 1)
    assert len(ist["step_bytes"]) == len(ist["lowest_active"]) == len(base["step_bytes"]) == 4
    assert set(ist["lowest_active"]) <= {0, 1}
    assert max(ist["step_bytes"]) < min(base["step_bytes"])
    assert ist["params_with_grad_last_step"] < base["params_with_grad_last_step"]
