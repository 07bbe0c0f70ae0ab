"""Bad input through the real command line: one clear line, non-zero exit, no metrics.json."""
import json

import pytest
import yaml

from conftest import train_cli


def cli(tmp_path, *args):
    return train_cli(f"hydra.run.dir={tmp_path / 'hydra'}", f"trainer.output_dir={tmp_path / 'out'}",
                     "logger.wandb.mode=disabled", *args, env={"SPARSE_PEFT_DATA": None}, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["method=nope"], "error: unknown method `nope`; choose method=<name> with name in ['adalora', 'adapter', 'bitfit'"),
    (["task=glue/nope"], "error: unknown task `glue/nope`"),
    (["-m", "model=minilm,nope"], "error: unknown model `nope`"),
    (["trainer.epoch=3"], "error: config `trainer.epoch`: no such key; check its spelling"),
    (["model=tiny_bert", "data.root=/nonexistent"], "error: data directory /nonexistent/glue/rte does not exist"),
    (["model=bert_base", "data.root=DATA"], "error: model `bert_base`"),
    (["model=tiny_bert"], "error: cannot load nyu-mll/glue/rte from the Hugging Face hub"),
])
def test_bad_input_exits_nonzero_with_one_clear_line(tmp_path, tiny_glue, args, message):
    args = [a.replace("DATA", str(tiny_glue)) for a in args]
    r = cli(tmp_path, *args)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_cli_runs_and_refuses_a_completed_dir(tmp_path, tiny_glue):
    args = ["model=tiny_bert", f"data.root={tiny_glue}", "trainer.max_steps=2", "trainer.batch_size=8",
            "trainer.progress_bar=false"]
    assert cli(tmp_path, *args).returncode == 0
    assert (tmp_path / "out" / "metrics.json").exists() and (tmp_path / "out" / "config.yaml").exists()
    r = cli(tmp_path, *args)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "overwrite" in r.stderr


def sweep(tmp_path, tiny_glue, *args):
    return train_cli("-m", f"hydra.sweep.dir={tmp_path}", "model=tiny_bert", f"data.root={tiny_glue}",
                     "trainer.max_steps=1", "trainer.batch_size=8", "trainer.progress_bar=false",
                     "logger.wandb.mode=disabled", *args, timeout=300)


def test_multirun_gives_each_job_its_own_dir_and_reruns_only_missing_jobs(tmp_path, tiny_glue):
    r = sweep(tmp_path, tiny_glue, "method=sora", "method.sparse_lambda=0.01,0.1", "trainer.seed=1,2")
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = sorted((json.loads((p.parent / "metrics.json").read_text())["seed"],
                   yaml.safe_load(p.read_text())["method"]["sparse_lambda"]) for p in tmp_path.glob("*/config.yaml"))
    assert jobs == [(1, 0.01), (1, 0.1), (2, 0.01), (2, 0.1)]
    # dirs are named by the overrides, so the same sweep finds its jobs again
    job = "method.sparse_lambda=0.1,method=sora,model=tiny_bert,trainer.batch_size=8,trainer.max_steps=1,trainer.seed=2"
    assert (tmp_path / job / "metrics.json").exists()  # data.root, logger, progress bar: not part of the name
    before = {p: p.stat().st_mtime_ns for p in [*tmp_path.glob("*/metrics.json"), *tmp_path.glob("*/.hydra/*")]}
    assert len(before) == 4 * 4  # metrics.json and Hydra's record (config, hydra, overrides) of each job

    r = sweep(tmp_path, tiny_glue, "method=sora", "method.sparse_lambda=0.01,0.1", "trainer.seed=1,2,3", "--dry-run")
    assert r.returncode == 0 and r.stdout.count("[dry-run] complete, skipped") == 4, r.stdout + r.stderr[-2000:]
    assert r.stdout.count("[dry-run] would run") == 2 and len(list(tmp_path.glob("*/metrics.json"))) == 4

    r = sweep(tmp_path, tiny_glue, "method=sora", "method.sparse_lambda=0.01,0.1", "trainer.seed=1,2,3",
              "logger.wandb.project=x")  # a key that cannot change a result: the same cells
    assert r.returncode == 0 and r.stdout.count("complete, skipped") == 4, r.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # completed jobs untouched, their .hydra/ record too
    assert "logger.wandb.project=x" in (tmp_path / job / ".hydra_launch" / "overrides.yaml").read_text()
    assert "logger.wandb.project=x" not in (tmp_path / job / ".hydra" / "overrides.yaml").read_text()
    assert len(list(tmp_path.glob("*/metrics.json"))) == 6

    # A completed dir whose config differs (here: a default changed under it) is an error, not a silent skip.
    cfg = tmp_path / job / "config.yaml"
    cfg.write_text(cfg.read_text().replace("lora_alpha: 16", "lora_alpha: 8"))
    r = sweep(tmp_path, tiny_glue, "method=sora", "method.sparse_lambda=0.1", "trainer.seed=2")
    assert r.returncode != 0  # in a sweep the other jobs still run; the sweep fails at the end
    assert "error: " in r.stderr and "holds a completed run with another config (`method.lora_alpha` differs)" in r.stderr
