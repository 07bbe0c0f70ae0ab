"""The packaged MiniLM trained for a few steps on the real GLUE data in ../shared/data."""
import json

import pytest

from conftest import make_cfg
from sparse_peft.export import export
from sparse_peft.train import train

pytestmark = pytest.mark.slow


def minilm(tmp_path, data, *extra):
    return train(make_cfg(["model=minilm", f"data.root={data}", f"trainer.output_dir={tmp_path / 'run'}",
                           "trainer.progress_bar=false", "logger.wandb.mode=disabled",
                           f"data.cache_dir={tmp_path / 'cache'}", *extra]))


def test_lora_on_real_rte(tmp_path, shared_data):
    m = minilm(tmp_path, shared_data, "method=lora", "task=glue/rte", "trainer.max_steps=3", "trainer.batch_size=8",
               "data.max_train_samples=64", "data.max_eval_samples=64")
    # six maps x 6 layers at r=8 on hidden 384 / FFN 1536, plus pooler and 2-way classifier
    lora = 6 * (4 * 8 * (384 + 384) + 2 * 8 * (384 + 1536))
    assert m["trainable_params"] == m["retained_params"] == lora + 384 * 384 + 384 + 384 * 2 + 2
    assert m["total_params"] == 22_713_986  # MiniLM-L6 + pooler + classifier
    assert m["steps"] == 3
    # the reported accuracy is the curve's at the chosen step, and the saved weights reproduce it when reloaded
    curve = [json.loads(x) for x in (tmp_path / "run" / "curve.jsonl").read_text().splitlines()]
    assert m["eval"] == next(c["eval"] for c in curve if c["step"] == m["best_step"])
    report = export(tmp_path / "run", tmp_path / "adapter", verify=True)
    assert report["reproduced"] and report["reloaded_eval"] == pytest.approx(m["eval"], abs=1e-6), report


def test_lora_learns_real_stsb(tmp_path, shared_data):
    # 60 LoRA steps already give MiniLM a clear correlation with the gold similarity scores.
    m = minilm(tmp_path, shared_data, "method=lora", "task=glue/stsb", "trainer.max_steps=60", "trainer.batch_size=16",
               "trainer.lr=2e-3", "trainer.eval_every=30", "data.max_eval_samples=400")
    curve = [json.loads(x) for x in (tmp_path / "run" / "curve.jsonl").read_text().splitlines()]
    assert m["eval"]["pearson"] > 0.5, m["eval"]  # 0.69 measured here
    assert curve[-1]["train_loss"] < 5.0


def test_sora_on_real_mrpc_prunes_and_exports_to_peft(tmp_path, shared_data):
    # A threshold large enough to zero some gates in 12 steps; the export must reload through peft and give the
    # run's metrics on the real (sora-protocol) validation and test halves.
    m = minilm(tmp_path, shared_data, "method=sora", "task=glue/mrpc", "task.split_protocol=sora", "trainer.max_steps=12",
               "trainer.batch_size=16", "trainer.lr=1e-3", "method.sparse_lambda_2=0.05", "data.max_train_samples=192",
               "data.max_eval_samples=96")
    full = 6 * (4 * 8 * (384 + 384) + 2 * 8 * (384 + 1536)) + 384 * 384 + 384 + 384 * 2 + 2
    assert m["trainable_params"] == full + 6 * 6 * 8  # the gates train but are folded into B when counted
    assert m["retained_params"] < full and 0 < sum(m["ranks"].values()) < 6 * 6 * 8
    report = export(tmp_path / "run", tmp_path / "adapter", verify=True)
    assert report["reproduced"] and report["reloaded_test"] == pytest.approx(m["test"], abs=1e-6), report
    assert report["retained_params"] == m["retained_params"]
