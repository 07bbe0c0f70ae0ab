"""One table over every method: it composes, trains 2 steps, touches only its own parameters, counts exactly."""
import json

import pytest
import torch

from conftest import fast_overrides, make_cfg
from sparse_peft import UserError
from sparse_peft.config import load_run_config
from sparse_peft.methods import METHODS, build_method
from sparse_peft.models import build_model, load_tokenizer
from sparse_peft.tasks import build_task
from sparse_peft.train import train

ALL_METHODS = sorted(m for m in METHODS if not m.startswith("test_"))  # tests register doubles
TASKS = ["rte", "stsb", "cola", "mnli"]
ADAPTIVE = {"sora", "adalora", "pst", "magnitude"}  # retained parameters differ from the trainable ones
PRUNED = {"sparse_adapter"}  # retained < trainable from the first step (pruned at initialisation)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("task", TASKS)
def test_every_method_trains_two_steps(method, task, tmp_path, tiny_glue):
    out = tmp_path / "run"
    m = train(make_cfg(fast_overrides(out, tiny_glue, f"method={method}", f"task=glue/{task}")))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["status"] == "completed" and saved["steps"] == 2 and saved == json.loads(json.dumps(m))
    assert m["selection_metric"] in m["eval"]
    assert 0 < m["trainable_params"] <= m["total_params"]
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [1, 2]
    at_best = next(c for c in curve if c["step"] == m["best_step"])
    assert m["retained_params"] == at_best["retained_params"] and m["ranks"] == at_best["ranks"]
    if method not in ADAPTIVE | PRUNED:
        assert all(c["retained_params"] == m["trainable_params"] for c in curve)
    if task == "mnli":
        assert "validation_mismatched_accuracy" in m["eval"]


def build(method, model="tiny_bert", *extra):
    run = load_run_config(make_cfg([f"method={method}", f"model={model}", "logger.wandb.mode=disabled", *extra]))
    tok = load_tokenizer(run.model)
    torch.manual_seed(0)
    task = build_task(run.task, run.data)  # glue/rte: two labels
    base = build_model(run.model, task, tok)
    meth = build_method(run.method, run.model, task=task)
    return base, meth


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_deberta"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_only_the_methods_parameters_change(method, model):
    base, meth = build(method, model)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model_ = meth.inject(base)
    opt = torch.optim.AdamW(meth.param_groups(model_, 1e-2, 0.0))
    ids = torch.randint(5, 1000, (4, 12))
    model_(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    opt.step()
    trainable = {n for n, p in model_.named_parameters() if p.requires_grad}
    assert trainable, "a method must train something"
    for n, p in model_.named_parameters():
        key = n.replace("base_model.model.", "").replace("base_layer.", "")
        if n not in trainable and key in before:
            assert torch.equal(p, before[key]), f"frozen {n} changed"
    assert any("classifier" in n for n in trainable), "the task head trains for every method"
    if method not in ADAPTIVE:
        assert meth.retained_params(model_) == sum(p.numel() for p in model_.parameters() if p.requires_grad)


def test_lora_and_adapter_counts_by_hand():
    # tiny_bert: hidden 32, FFN 64, 2 layers; head = pooler (32*32+32) + classifier (32*2+2) = 1122
    head = 32 * 32 + 32 + 32 * 2 + 2
    base, meth = build("lora")
    model = meth.inject(base)
    per_layer = 4 * 8 * (32 + 32) + 2 * 8 * (32 + 64)  # q,k,v,attn-out + FFN in/out, r=8
    assert meth.retained_params(model) == 2 * per_layer + head
    base, meth = build("adapter")
    model = meth.inject(base)
    per_site = 2 * 32 * 64 + 64 + 32  # down + up weights and biases, bottleneck 64
    assert meth.retained_params(model) == 2 * 2 * per_site + head
    base, meth = build("bitfit")
    model = meth.inject(base)
    biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias") and not n.startswith(("classifier", "bert.pooler")))
    assert meth.retained_params(model) == biases + head


def test_train_head_false_freezes_the_head():
    base, meth = build("lora", "tiny_bert", "method.train_head=false")
    model = meth.inject(base)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n or "pooler" in n)


def test_adapter_lora_init_is_identity_at_start():
    base, _ = build("full")
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    base2, meth = build("adapter", "tiny_bert", "method.init=lora")
    base2.load_state_dict(ref)
    adapted = meth.inject(base2).eval()
    ids = torch.randint(5, 1000, (2, 9))
    assert torch.allclose(adapted(input_ids=ids).logits, base.eval()(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("method, target", [("lora", "query_proj"), ("adapter", "no_such_module")])
def test_unmatched_target_is_an_error(method, target):
    base, meth = build(method, "tiny_bert", f"method.target_modules=[{target}]")
    with pytest.raises(UserError, match=f"target `{target}` matches no"):
        meth.inject(base)


def test_roles_resolve_per_architecture():
    # the same role names select DeBERTa's query_proj and BERT's query
    for model, name in (("tiny_bert", "query"), ("tiny_deberta", "query_proj")):
        base, meth = build("lora", model, "method.target_modules=[query]")
        peft_model = meth.inject(base)
        assert any(n.endswith(f"{name}.lora_A.default.weight") for n, _ in peft_model.named_parameters())
