"""Bad input through the real command line: one clear line, non-zero exit, no metrics.json."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO


def cli(tmp_path, *args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env_extra or {})}
    env.pop("SPARSE_PEFT_DATA", None)
    return subprocess.run([sys.executable, "-m", "sparse_peft.train", f"hydra.run.dir={tmp_path / 'hydra'}",
                           f"trainer.output_dir={tmp_path / 'out'}", "logger.wandb.mode=disabled", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["method=nope"], "error: unknown method `nope`; choose method=<name> with name in ['adalora', 'adapter', 'bitfit'"),
    (["task=glue/nope"], "error: unknown task `glue/nope`"),
    (["-m", "model=minilm,nope"], "error: unknown model `nope`"),
    (["trainer.epoch=3"], "Key 'epoch' is not in struct"),
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


def test_multirun_gives_each_job_its_own_dir(tmp_path, tiny_glue):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "sparse_peft.train", "-m", f"hydra.sweep.dir={tmp_path}", "model=tiny_bert",
                        f"data.root={tiny_glue}", "trainer.max_steps=1", "trainer.batch_size=8", "trainer.progress_bar=false",
                        "logger.wandb.mode=disabled", "method=sora", "method.sparse_lambda=0.01,0.1", "trainer.seed=1,2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = sorted((json.loads((p.parent / "metrics.json").read_text())["seed"],
                   yaml.safe_load(p.read_text())["method"]["sparse_lambda"]) for p in tmp_path.glob("*/config.yaml"))
    assert jobs == [(1, 0.01), (1, 0.1), (2, 0.01), (2, 0.1)]
