"""Sweeps through Hydra's launchers (joblib: 2 parallel jobs; submitit_local: the SLURM code path), the SLURM
launcher config, and the experiment presets."""
import json

import pytest

from conftest import CONFIGS, REPO, make_cfg, train_cli
from sparse_peft.config import apply_presets, load_run_config


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launchers_run_every_job_in_its_own_dir(tmp_path, tiny_glue, launcher):
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=5"]
    r = train_cli("-m", f"hydra/launcher={launcher}", *extra, f"hydra.sweep.dir={tmp_path}", "model=tiny_bert",
                  f"data.root={tiny_glue}", "trainer.max_steps=1", "trainer.batch_size=8", "trainer.progress_bar=false",
                  "trainer.num_threads=1", "logger.wandb.mode=disabled", "logger.wandb.project=x", "method=sora,lora")
    assert r.returncode == 0, r.stderr[-3000:]
    done = {p.parent.name: json.loads(p.read_text())["method"] for p in tmp_path.glob("*/metrics.json")}
    assert done == {f"method={m},model=tiny_bert,trainer.batch_size=8,trainer.max_steps=1": m for m in ("lora", "sora")}


def test_slurm_launcher_config_composes():
    r = train_cli("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SlurmLauncher" in r.stdout and "partition: gpu" in r.stdout and "gpus_per_node: 1" in r.stdout


def test_a_sweep_dir_is_named_by_the_overrides_that_can_change_a_result():
    """Else a rerun with `trainer.fused_adamw=false` (or a wandb project) lands in a new dir and trains again instead
    of finding its completed cell; and every committed result dir keeps the name it ran under."""
    import yaml

    from sparse_peft.runio import run_dirname

    cell = ["trainer.lr=5e-4", "method=lora", "task=glue/rte"]
    assert run_dirname(cell) == "method=lora,task=glue-rte,trainer.lr=5e-4"
    assert run_dirname([*cell, "+experiment=pst_glue", "trainer.fused_adamw=false", "trainer.num_threads=1",
                        "logger.wandb.project=x", "data.num_workers=2", "data.root=/d"]) == run_dirname(cell)
    assert run_dirname([*cell, "trainer.epochs=6"]) != run_dirname(cell)
    assert run_dirname([*cell, "data.max_train_samples=16"]) != run_dirname(cell)
    assert run_dirname([]) == "default"
    committed = list((REPO / "results").rglob("overrides.yaml"))  # <run>/.hydra/overrides.yaml or <run>/overrides.yaml
    assert len(committed) > 100
    for p in committed:
        run = p.parent.parent if p.parent.name == ".hydra" else p.parent
        assert run_dirname(yaml.safe_load(p.read_text())) == run.name, run


PRESETS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes(preset):
    r = train_cli(f"+experiment={preset}", "--cfg", "job", timeout=120)
    assert r.returncode == 0 and "model:" in r.stdout, r.stderr[-2000:]
    load_run_config(apply_presets(make_cfg([f"+experiment={preset}"])))


def test_commonsense_preset_gives_every_method_the_scripts_lora():
    """LoRA and DoRA get the IST scripts' LoRA directly, IST and RST as their inner method; a rate on the command
    line wins (the sweep's grid)."""
    def job(method):
        overrides = ["+experiment=commonsense_smollm2", f"method={method}", "trainer.lr=5e-4"]
        return load_run_config(apply_presets(make_cfg(overrides), overrides=overrides))

    for method in ("lora", "dora", "ist", "rst"):
        run = job(method)
        lora = run.method.inner_config() if method in ("ist", "rst") else run.method
        assert (lora.name, lora.lora_r, lora.lora_alpha, lora.lora_dropout) == (
            "dora" if method == "dora" else "lora", 32, 64, 0.05), method
        assert lora.target_modules == ["query", "key", "value", "ffn_in", "ffn_out"]
        assert (run.model.name, run.task.name, run.task.eval_mode, run.trainer.lr) == (
            "smollm2", "all", "loglik", 5e-4)


def test_sora_glue_preset_gives_each_method_its_setting():
    def job(method, task="glue/rte"):
        return load_run_config(apply_presets(make_cfg(["+experiment=sora_glue", f"method={method}", f"task={task}"])))

    assert job("full").trainer.lr == 5e-5 and job("full").trainer.weight_decay == 0.01
    assert job("bitfit").trainer.lr == 1e-3 and job("lora").trainer.lr == 5e-4
    s = job("sora")
    assert (s.method.lora_r, s.method.sparse_lambda, s.method.sparse_lambda_2) == (8, 1e-3, 1e-3)
    assert (job("adalora").method.init_r, job("adalora").method.target_r) == (12, 8)
    assert job("adalora").trainer.select == "last" and s.trainer.select == "best"
    assert job("lora", "glue/sst2").data.max_train_samples == 10000 and job("lora").data.max_train_samples is None
    assert s.task.split_protocol == "sora" and s.model.name == "minilm" and s.trainer.epochs == 3


def test_command_line_values_win_over_the_preset():
    def job(*overrides):
        overrides = ["+experiment=sora_glue", *overrides]
        return load_run_config(apply_presets(make_cfg(overrides), overrides))

    assert job("method=lora", "method.lora_r=4").method.lora_r == 4  # the preset says 8
    assert job("method=lora").method.lora_r == 8
    s = job("method=sora", "method.sparse_lambda_2=3e-4", "task=glue/sst2")
    assert s.method.sparse_lambda_2 == 3e-4 and s.method.sparse_lambda == 1e-3 and s.data.max_train_samples == 10000
    assert job("method=sora", "per_method.sora.method.sparse_lambda_2=2e-4").method.sparse_lambda_2 == 2e-4
    assert job("method=full", "trainer.lr=1e-4").trainer.lr == 1e-4
