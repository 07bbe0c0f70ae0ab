"""The training loop's guarantees: resume, refusal to overwrite, batch-size-free evaluation, NaN, selection."""
import json

import pytest
import torch
from safetensors.torch import load_file

import sparse_peft.runio as runio
from conftest import Crash, crash_at, fast_overrides, make_cfg
from sparse_peft import UserError
from sparse_peft.train import train


def run(out, data, *extra):
    return train(make_cfg(fast_overrides(out, data, *extra)))


def test_refuses_a_completed_dir_unless_overwrite(tmp_path, tiny_glue):
    out = tmp_path / "run"
    run(out, tiny_glue)
    with pytest.raises(UserError, match="already holds a completed run; pass trainer.overwrite=true"):
        run(out, tiny_glue)
    assert run(out, tiny_glue, "trainer.overwrite=true")["status"] == "completed"
    assert len((out / "curve.jsonl").read_text().splitlines()) == 2  # not appended to the old curve


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_glue, monkeypatch):
    steps = ["trainer.max_steps=6", "trainer.save_every=2", "data.max_train_samples=24"]  # 3 batches of 8 = 1 epoch
    ref = run(tmp_path / "ref", tiny_glue, *steps)
    out = tmp_path / "resumed"
    real_curve = crash_at(monkeypatch, 5)
    with pytest.raises(Crash):
        run(out, tiny_glue, *steps)
    assert not (out / "metrics.json").exists() and (out / "checkpoints" / "last").is_dir()
    monkeypatch.setattr(runio.RunLogger, "curve", real_curve)
    resumed = run(out, tiny_glue, *steps)  # picks up checkpoints/last (step 4), crosses an epoch boundary
    assert resumed["eval"] == ref["eval"] and resumed["best_step"] == ref["best_step"]
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert [json.loads(x)["step"] for x in (out / "curve.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert not (out / "checkpoints").exists()  # removed after success unless trainer.keep_checkpoints


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_evaluation_does_not_depend_on_eval_batch_size(tmp_path, tiny_glue, task):
    a = run(tmp_path / "a", tiny_glue, f"task=glue/{task}", "trainer.eval_batch_size=1")
    b = run(tmp_path / "b", tiny_glue, f"task=glue/{task}", "trainer.eval_batch_size=7")
    # Every example is scored (no dropped batch) and metrics are per example, not per batch; padding to a
    # different width only moves float32 rounding, which a near-constant tiny model's Pearson amplifies.
    assert a["eval"] == pytest.approx(b["eval"], abs=1e-4)


def test_nan_loss_stops_with_a_clear_error_and_no_metrics(tmp_path, tiny_glue, monkeypatch):
    from sparse_peft.methods.full import Full

    calls = iter(range(100))
    monkeypatch.setattr(Full, "regularization_loss", lambda self, m: torch.tensor(float("nan") if next(calls) == 1 else 0.0))
    out = tmp_path / "run"
    with pytest.raises(UserError, match="loss is nan at step 1; lower trainer.lr"):
        run(out, tiny_glue, "method=full")
    assert not (out / "metrics.json").exists()


def test_metrics_keep_best_and_last(tmp_path, tiny_glue):
    m = run(tmp_path / "r", tiny_glue, "task=glue/stsb", "trainer.max_steps=4", "trainer.select=last", "trainer.lr=5e-3")
    assert m["checkpoint"] == "last" and m["eval"] == m["eval_last"]
    curve = [json.loads(x) for x in (tmp_path / "r" / "curve.jsonl").read_text().splitlines()]
    # best: the curve's best step, re-evaluated from its saved weights; last: the final step
    best = max(curve, key=lambda c: c["eval"]["pearson"])
    assert m["best_step"] == best["step"] != curve[-1]["step"], [c["eval"]["pearson"] for c in curve]
    assert m["eval_best"] == pytest.approx(best["eval"], abs=1e-6) and m["eval_last"] == pytest.approx(curve[-1]["eval"], abs=1e-6)


def test_sora_protocol_reports_a_test_split(tmp_path, tiny_glue):
    m = run(tmp_path / "r", tiny_glue, "task.split_protocol=sora")
    assert m["test"] is not None and "accuracy" in m["test"] and m["split_protocol"] == "sora"


@pytest.mark.parametrize("override, message", [
    ("+trainer.epoch=3", "Key 'epoch' not in 'TrainerConfig'"),
    ("trainer.batch_size=abc", "batch_size"),
    ("trainer.lr=-1", "trainer.lr` must be > 0"),
    ("task.split_protocol=other", "is not one of"),
    ("method.lora_r=0", "lora_r` must be >= 1"),
    ("+method.lora_rank=4", "Key 'lora_rank' not in"),
])
def test_config_errors_fail_at_start(tmp_path, tiny_glue, override, message):
    with pytest.raises(UserError, match=message):
        run(tmp_path / "r", tiny_glue, override)
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_wandb_offline_by_default_writes_a_local_run(tmp_path, tiny_glue, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "r"
    run(out, tiny_glue, "logger.wandb.mode=offline")
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb")), "an offline run to `wandb sync` later"


def test_wandb_groups_a_sweep_and_logs_stage_curves(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sparse_peft.config import LoggerConfig

    monkeypatch.setattr(runio, "in_sweep", lambda: True)
    monkeypatch.setattr("hydra.core.hydra_config.HydraConfig.get",
                        staticmethod(lambda: SimpleNamespace(sweep=SimpleNamespace(dir="/x/runs/sora_glue"))))
    assert runio.sweep_name() == "sora_glue"

    logged = []
    logger = runio.RunLogger(tmp_path, LoggerConfig(wandb=runio_wandb_disabled()), "r", {}, 0)
    logger.wandb = SimpleNamespace(log=lambda values, step: logged.append((step, values)))
    logger.curve({"type": "stage", "step": 9, "stage": 1, "lambda": 0.2, "retained_params": 123,
                  "eval": {"f1": 0.5}, "train": {"f1": 0.6}, "generalization": 90.0, "memorization": 95.0})
    assert logged == [(9, {"stage/lambda": 0.2, "stage/retained_params": 123, "stage/generalization": 90.0,
                           "stage/memorization": 95.0, "stage/eval_f1": 0.5, "stage/train_f1": 0.6})]


def runio_wandb_disabled():
    from sparse_peft.config import WandbConfig

    return WandbConfig(mode="disabled")


def test_fused_adamw_makes_the_loops_update_and_the_same_run(tmp_path, tiny_glue, monkeypatch):
    made, real = [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: made.append(kw.get("fused")) or real(*a, **kw))
    steps = ["method=full", "trainer.max_steps=4", "trainer.weight_decay=0.1", "trainer.warmup_ratio=0",
             "trainer.select=last"]  # the weights after 4 steps at full lr (the best could be step 1's, at lr 0)
    run(tmp_path / "fused", tiny_glue, *steps)
    run(tmp_path / "loop", tiny_glue, *steps, "trainer.fused_adamw=false")
    assert made == [True, None]  # None: torch's default, the per-tensor loop on CPU
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("fused", "loop"))
    assert a.keys() == b.keys()
    # rounding apart (measured 4e-9); the weight decay alone moves them 1e-5 here, a step ~lr = 5e-4
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    with pytest.raises(UserError, match="already holds a completed run"):  # the kernel is not part of the run
        run(tmp_path / "loop", tiny_glue, *steps)
