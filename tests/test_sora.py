"""SoRA: the proximal step, the schedules, exact retained parameters, compaction and the peft export; AdaLoRA's
rank budget; the staged scheduler run end to end."""
import json
import math

import numpy as np
import pytest
import torch
from peft import PeftModel

import sparse_peft.runio as runio
from conftest import Crash, crash_at, fast_overrides, make_cfg
from sparse_peft import UserError
from sparse_peft.config import load_run_config
from sparse_peft.export import export, main as export_main
from sparse_peft.methods import build_method
from sparse_peft.methods.sora import GATES_GROUP, soft_threshold, sora_modules
from sparse_peft.models import build_model, load_tokenizer
from sparse_peft.tasks import build_task
from sparse_peft.report import stages_report
from sparse_peft.schedulers import lambda_values
from sparse_peft.loop import forward_loss, optimizer_step
from sparse_peft.train import train

H, FFN, LAYERS = 32, 64, 2  # configs/model/tiny_bert.yaml


def test_soft_threshold_on_hand_values():
    g = torch.tensor([0.05, 0.1, 0.15, 0.25, -0.15, -0.3, 0.0])
    # The proximal operator of 0.1 * |g|: shrink by 0.1 towards zero, never past it.
    assert torch.allclose(soft_threshold(g, 0.1), torch.tensor([0.0, 0.0, 0.05, 0.15, -0.05, -0.2, 0.0]))
    # The reference's masks: 0.1 < |g| < 0.2 is zeroed (dead zone) and |g| == 0.1 is kept.
    assert torch.allclose(soft_threshold(g, 0.1, "reference"), torch.tensor([0.0, 0.1, 0.0, 0.15, 0.0, -0.2, 0.0]))


def test_schedule_values_follow_the_three_formulas():
    assert np.allclose(lambda_values("linear", 0.0, 7e-4, 8), [i * 1e-4 for i in range(8)])
    assert np.allclose(lambda_values("exp_linear", 1e-4, 1e-2, 3), [1e-4, 1e-3, 1e-2])
    assert np.allclose(lambda_values("log_linear", 0.0, 1.0, 3), [0.0, math.log((1 + math.e) / 2), 1.0])
    assert lambda_values("linear", 3e-4, 1e-3, 1) == [3e-4]


def sora(*extra, model="tiny_bert"):
    run = load_run_config(make_cfg(["method=sora", f"model={model}", "logger.wandb.mode=disabled", *extra]))
    tok = load_tokenizer(run.model)
    torch.manual_seed(0)
    method = build_method(run.method, run.model)
    return run, method, method.inject(build_model(run.model, build_task(run.task, run.data), tok))


def randomize(model, zero_ranks: dict):
    """Non-trivial B (it starts at zero) and chosen gates set to zero: {module index: ranks to zero or 'all'}."""
    torch.manual_seed(1)
    with torch.no_grad():
        for i, (_, m) in enumerate(sora_modules(model)):
            m.lora_B.normal_(0, 0.5)
            z = zero_ranks.get(i, [])
            m.lora_gate[list(range(m.lora_gate.numel())) if z == "all" else z] = 0.0


def batch(n=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1] * (n // 2))}


def test_retained_params_is_an_exact_hand_count():
    _, method, model = sora()
    randomize(model, {0: [0, 1, 2], 1: "all", 5: [7]})  # module order per layer: q k v attn_out ffn_in ffn_out
    head = (H * H + H) + (2 * H + 2)  # pooler + classifier
    sizes = [2 * H] * 4 + [H + FFN, FFN + H]
    ranks = [8 - 3, 0, 8, 8, 8, 8 - 1] + [8] * 6
    assert method.retained_params(model) == sum(r * s for r, s in zip(ranks, sizes * LAYERS)) + head
    assert list(method.ranks(model).values()) == ranks


def test_compaction_and_the_peft_export_keep_the_logits(tmp_path):
    run, method, model = sora()
    randomize(model, {0: [0, 3], 1: "all", 7: [1, 2, 3, 4, 5, 6]})
    model.eval()
    x = {k: v for k, v in batch().items() if k != "labels"}
    gated = model(**x).logits
    compact = method.to_peft(model).eval()
    assert torch.allclose(compact(**x).logits, gated, atol=1e-6)

    method.export(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    names = [n for n, _ in sora_modules(model)]
    assert names[1] not in cfg["target_modules"] and len(cfg["target_modules"]) == len(names) - 1  # rank 0: left out
    assert sorted(cfg["rank_pattern"].values()) == sorted(r for r in method.ranks(model).values() if r)
    assert all(cfg["alpha_pattern"][k] / r == 16 / 8 for k, r in cfg["rank_pattern"].items())  # scaling kept
    torch.manual_seed(0)  # the same random-init base as in sora()
    base = build_model(run.model, build_task(run.task, run.data), load_tokenizer(run.model))
    torch.nn.init.normal_(base.classifier.weight)  # the exported head (modules_to_save) must replace it
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert torch.allclose(loaded(**x).logits, gated, atol=1e-6)
    trained = sum(m.rank * (m.base_layer.in_features + m.base_layer.out_features) for _, m in sora_modules(model))
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n) == trained


def step_with(method, model, optimizer, scheduler, n=1):
    for i in range(n):
        forward_loss(model, method, batch(seed=i), i).backward()
        optimizer_step(model, method, optimizer, scheduler, 1.0, i)


def optim(run, method, model, lr=1e-2):
    opt = torch.optim.AdamW(method.param_groups(model, lr, 0.0), lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_a_gate_at_zero_stays_zero_without_gradient_pressure():
    run, method, model = sora("method.sparse_lambda=0.5", "method.sparse_lambda_2=1e-3")
    randomize(model, {})
    first = sora_modules(model)[0][1]
    with torch.no_grad():
        first.lora_gate[2] = 0.0
        first.lora_B[:, 2] = 0.0  # the rank's only path to the loss: no task gradient reaches its gate
    opt, sched = optim(run, method, model)
    step_with(method, model, opt, sched, n=5)
    assert first.lora_gate[2].item() == 0.0  # |g|'s subgradient at 0 is 0 and Adam's moments stay 0
    assert all(first.lora_gate[i].item() != 0.0 for i in (0, 1, 3))


def test_gate_group_lr_threshold_scaling_and_l1():
    run, method, model = sora("method.sparse_lr=0.5", "method.sparse_lambda_2=0.01", "method.threshold_scaling=lr")
    groups = method.param_groups(model, 1e-3, 0.1)
    gates = next(g for g in groups if g.get("name") == GATES_GROUP)
    assert gates["lr"] == 0.5 and gates["weight_decay"] == 0.0 and gates["eps"] == 1e-6
    assert len(gates["params"]) == 6 * LAYERS and all(p.shape == (8,) for p in gates["params"])
    assert not any(p is q for g in groups if g is not gates for p in g["params"] for q in gates["params"])
    # threshold_scaling=lr: the proximal step uses lr_t * xi = 0.005
    with torch.no_grad():
        g = sora_modules(model)[0][1].lora_gate
        g.copy_(torch.tensor([0.004, -0.006, 1.0, 0, 0, 0, 0, 0]))

    class Opt:
        param_groups = [gates]

    method.after_optimizer_step(model, Opt, 0)
    assert torch.allclose(g[:3], torch.tensor([0.0, -0.001, 0.995]))
    gs = [m.lora_gate for _, m in sora_modules(model)]
    expected = 1e-3 * sum(x.abs().sum() for x in gs) / sum(x.numel() for x in gs)
    assert torch.isclose(method.regularization_loss(model), expected)


@pytest.mark.parametrize("extra, message", [
    (["method=sora", "method.sparse_lambda=-1"], "method.sparse_lambda` must be >= 0"),
    (["method=sora", "method.sparse_lambda_2=-1e-3"], "method.sparse_lambda_2` must be >= 0"),
    (["method=sora", "method.lora_r=0"], "method.lora_r` must be >= 1"),
    (["method=sora", "method.mode=dead"], "method.mode=dead"),
    (["method=sora", "scheduler=exp_linear", "method.sparse_lambda_2=0"], "exp_linear needs method.sparse_lambda_2 > 0"),
    (["method=lora", "scheduler=linear"], "method=lora has none"),
    (["method=sora", "scheduler=linear", "scheduler.max_lambda=-1"], "scheduler.max_lambda` must be >= 0"),
    (["method=adalora", "method.target_r=20"], "method.target_r` must be in [1, init_r=12]"),
])
def test_bad_sparsity_settings_fail_at_start(extra, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_run_config(make_cfg(["model=tiny_bert", *extra]))


STAGED = ["method=sora", "task=glue/mrpc", "scheduler=linear", "scheduler.max_lambda=0.4", "scheduler.lambda_num=3",
          "scheduler.stage_epochs=1", "scheduler.train_subset=16", "trainer.max_steps=4", "trainer.eval_every=2",
          "trainer.save_every=2", "method.sparse_lambda_2=0.01", "trainer.lr=0.05"]


def test_staged_run_records_every_stage_and_exports_any_of_them(tmp_path, tiny_glue):
    out = tmp_path / "run"
    m = train(make_cfg(fast_overrides(out, tiny_glue, *STAGED)))
    curve = [json.loads(x) for x in (out / "curve.jsonl").read_text().splitlines()]
    stages = [r for r in curve if r["type"] == "stage"]
    assert [s["lambda"] for s in stages] == pytest.approx([0.01, 0.205, 0.4]) and stages == m["stages"]
    assert [s["step"] for s in stages] == [4, 9, 14]  # stage 0: max_steps; then 1 epoch = 40 / 8 batches each
    assert stages[0]["generalization"] == 100.0 and stages[0]["memorization"] == 100.0
    evals = [r for r in curve if r["type"] == "eval"]
    assert all(r["train"] is not None and r["ranks"] for r in evals)
    assert all(r["generalization"] is not None for r in evals if r["stage"] > 0)
    assert stages[-1]["retained_params"] < stages[0]["retained_params"]  # a threshold of 0.4 per step prunes
    for s in stages:  # the stage's best checkpoint is kept and its count is exact
        assert (out / "stages" / f"stage{s['stage']}.safetensors").exists()
        rep = export(out, tmp_path / f"exp{s['stage']}", stage=s["stage"], verify=True)
        assert rep["retained_params"] == s["retained_params"] and rep["reproduced"], rep
    assert m["retained_params"] == stages[0]["retained_params"]  # metrics.json: stage 0's selected checkpoint
    # The LR restarts (warmup then decay) in every stage.
    lrs = {r["step"]: r["lr"] for r in evals}
    assert lrs[6] > lrs[8] < lrs[10] > lrs[12]
    table = stages_report(out, tmp_path / "report")  # the per-stage table and plot
    assert len(table.splitlines()) == 2 + 3 and (tmp_path / "report" / "stages.png").stat().st_size > 1000


@pytest.mark.parametrize("crash_step", [8, 12])  # resume from step 6 (stage 1, crosses a stage end) or 10 (stage 2)
def test_staged_run_resumes_exactly(tmp_path, tiny_glue, monkeypatch, crash_step):
    ref = train(make_cfg(fast_overrides(tmp_path / "ref", tiny_glue, *STAGED)))
    real_curve = crash_at(monkeypatch, crash_step)
    with pytest.raises(Crash):
        train(make_cfg(fast_overrides(tmp_path / "out", tiny_glue, *STAGED)))
    monkeypatch.setattr(runio.RunLogger, "curve", real_curve)
    resumed = train(make_cfg(fast_overrides(tmp_path / "out", tiny_glue, *STAGED)))
    assert resumed["stages"] == ref["stages"] and resumed["eval"] == ref["eval"]
    assert (tmp_path / "ref" / "curve.jsonl").read_text() == (tmp_path / "out" / "curve.jsonl").read_text()


def test_export_cli_verifies_a_run(tmp_path, tiny_glue, capsys):
    out = tmp_path / "run"
    train(make_cfg(fast_overrides(out, tiny_glue, "method=sora", "task=glue/stsb", "trainer.max_steps=3")))
    assert export_main([str(out), "--merge", "--verify"]) == 0
    report = json.loads((out / "export" / "export.json").read_text())
    assert report["reproduced"] and report["max_abs_diff"] <= 1e-6
    assert (out / "export" / "merged" / "model.safetensors").exists()
    assert export_main([str(tmp_path / "missing")]) == 2 and "holds no completed run" in capsys.readouterr().err


def test_export_verify_allows_float_rounding_only_across_devices(tmp_path, tiny_glue, capsys):
    out = tmp_path / "run"
    train(make_cfg(fast_overrides(out, tiny_glue, "method=sora", "task=glue/stsb", "trainer.max_steps=3")))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["environment"]["device"] == "cpu"

    def verify_with(device, shift):  # as if the run had been trained on `device`, its metric off by `shift`
        m = json.loads(json.dumps(metrics))
        m["environment"]["device"] = device
        m["eval"]["pearson"] += shift
        (out / "metrics.json").write_text(json.dumps(m))
        code = export_main([str(out), "--verify"])
        return code, json.loads((out / "export" / "export.json").read_text())

    code, report = verify_with("NVIDIA H100 80GB HBM3", 5e-5)
    assert code == 0 and report["tolerance"] == 1e-4 and report["run_device"] != report["verify_device"]
    code, report = verify_with("cpu", 5e-5)  # same device: a 5e-5 gap is a real difference
    assert code == 1 and report["tolerance"] == 1e-6 and "trained on cpu, verified on cpu" in capsys.readouterr().err


def test_adalora_prunes_to_its_budget_and_counts_exactly(tmp_path, tiny_glue):
    out = tmp_path / "run"
    m = train(make_cfg(fast_overrides(out, tiny_glue, "method=adalora", "trainer.max_steps=20", "trainer.lr=0.01",
                                      "method.delta_t=2", "method.target_r=4", "trainer.select=last")))
    ranks = m["ranks"]
    assert len(ranks) == 6 * LAYERS and sum(ranks.values()) <= 4 * len(ranks) < 12 * len(ranks)
    sizes = dict(zip(sorted(ranks), [0] * len(ranks)))
    run, _, model = sora()  # the same module names and shapes, for the hand count
    for name, mod in sora_modules(model):
        sizes[next(k for k in ranks if k.endswith(name))] = mod.base_layer.in_features + mod.base_layer.out_features
    head = (H * H + H) + (2 * H + 2)
    assert m["retained_params"] == sum(ranks[k] * sizes[k] for k in ranks) + head
