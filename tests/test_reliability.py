"""Reliability: a resumed run is the run asked for, a diverged or crashed run never poisons its directory, one
writer per directory, real kills (SIGKILL) at the worst moments resume to the same result, and a killed sweep job
re-runs once."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import sparse_peft.runio as runio
from conftest import REPO, Crash, crash_at, fast_overrides, make_cfg, train_cli
from sparse_peft import UserError
from sparse_peft.train import train


def run(out, data, *extra):
    return train(make_cfg(fast_overrides(out, data, *extra)))


def crash_after_checkpoint(monkeypatch, out, data, *steps):
    real = crash_at(monkeypatch, 3)
    with pytest.raises(Crash):
        run(out, data, *steps)
    monkeypatch.setattr(runio.RunLogger, "curve", real)
    assert (out / "checkpoints" / "last").is_dir()


STEPS = ["trainer.max_steps=5", "trainer.save_every=2", "data.max_train_samples=24", "method=lora"]


def test_a_resume_with_another_config_is_refused(tmp_path, tiny_glue, monkeypatch):
    out = tmp_path / "r"
    crash_after_checkpoint(monkeypatch, out, tiny_glue, *STEPS)
    with pytest.raises(UserError, match=r"unfinished run with another config \(`trainer.lr`, `trainer.seed` differ\); "
                                        r"re-run with its config to resume it, or pass trainer.overwrite=true"):
        run(out, tiny_glue, *STEPS, "trainer.lr=1e-3", "trainer.seed=7")
    with pytest.raises(UserError, match="`method.lora_r` differs"):  # a changed shape: no size-mismatch traceback
        run(out, tiny_glue, *STEPS, "method.lora_r=4")
    assert run(out, tiny_glue, *STEPS)["steps"] == 5  # the same config resumes
    fresh = run(tmp_path / "f", tiny_glue, *STEPS, "trainer.lr=1e-3", "trainer.seed=7")
    crash_after_checkpoint(monkeypatch, tmp_path / "o", tiny_glue, *STEPS)
    over = run(tmp_path / "o", tiny_glue, *STEPS, "trainer.lr=1e-3", "trainer.seed=7", "trainer.overwrite=true")
    assert over["eval"] == fresh["eval"] and over["eval_last"] == fresh["eval_last"]  # started fresh, new lr and seed


def test_a_diverged_run_keeps_its_last_good_checkpoint_and_the_advice_works(tmp_path, tiny_glue):
    out = tmp_path / "r"
    bad = ["trainer.lr=1e30", "trainer.max_grad_norm=0", "trainer.save_every=1", "trainer.max_steps=6", "method=full"]
    with pytest.raises(UserError, match="(non-finite|loss is nan).*re-run with trainer.overwrite=true"):
        run(out, tiny_glue, *bad)
    assert not (out / "metrics.json").exists()
    ckpt = out / "checkpoints" / "last" / "trainable.safetensors"
    if ckpt.exists():  # whatever was saved is finite
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt)).values())
    sane = [b for b in bad if "lr" not in b] + ["trainer.lr=1e-3"]
    if ckpt.exists():
        with pytest.raises(UserError, match="`trainer.lr` differs"):
            run(out, tiny_glue, *sane)
    assert run(out, tiny_glue, *sane, "trainer.overwrite=true")["status"] == "completed"


def test_non_finite_weights_are_never_saved(tmp_path, tiny_glue, monkeypatch):
    from sparse_peft.methods.full import Full

    def poison(self, model, optimizer, step, loss=None):
        if step == 2:
            with torch.no_grad():
                model.classifier.weight[0, 0] = float("inf")

    monkeypatch.setattr(Full, "after_optimizer_step", poison)
    out = tmp_path / "r"
    with pytest.raises(UserError, match="parameters became non-finite at step 3 \\(classifier.weight"):
        run(out, tiny_glue, "method=full", "trainer.max_steps=6", "trainer.save_every=1")
    saved = load_file(str(out / "checkpoints" / "last" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert json.loads((out / "checkpoints" / "last" / "state.json").read_text())["step"] == 2


def cli(out, data, *args, env=None):
    return train_cli("model=tiny_bert", f"data.root={data}", f"trainer.output_dir={out}",
                     f"hydra.run.dir={out.parent / 'hydra'}", "trainer.batch_size=8", "trainer.progress_bar=false",
                     "trainer.num_threads=1", "logger.wandb.mode=disabled",
                     f"data.cache_dir={out.parent / 'tok_cache'}", *args, env=env)


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, tiny_glue):
    out = tmp_path / "r"
    runio.lock_output_dir(out)  # this process is the first writer
    try:
        r = cli(out, tiny_glue, "trainer.max_steps=2")
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
            f"error: {out} is in use by another run (pid {os.getpid()}); wait for it to finish or choose another "
            f"trainer.output_dir"), r.stderr[-1500:]
        assert not (out / "curve.jsonl").exists()
    finally:
        runio.unlock_output_dir(out)
    # A writer killed while holding the lock: the kernel drops the lock with the process.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from sparse_peft.runio import lock_output_dir; lock_output_dir(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(600)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    r = cli(out, tiny_glue, "trainer.max_steps=2", "trainer.eval_every=1")
    assert r.returncode == 0, r.stderr[-1500:]
    assert len((out / "curve.jsonl").read_text().splitlines()) == 2  # one writer: nothing doubled


def test_environment_wandb_disabled_wins_and_a_failed_start_leaves_no_run(tmp_path, tiny_glue, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "r"
    run(out, tiny_glue, "logger.wandb.mode=offline")
    assert not (out / "wandb").exists()
    from sparse_peft.methods.lora import Lora

    monkeypatch.setattr(Lora, "regularization_loss", lambda self, m: torch.tensor(float("nan")))
    out = tmp_path / "failed"
    with pytest.raises(UserError, match="loss is nan"):
        run(out, tiny_glue, "logger.wandb.mode=offline", "method=lora")
    assert not [p.name for p in out.iterdir() if p.name != ".lock"]  # no config.yaml, curve or wandb/ left


def test_export_messages(tmp_path, tiny_glue):
    from sparse_peft.export import export

    out = tmp_path / "r"
    run(out, tiny_glue, "method=adapter")
    with pytest.raises(UserError, match="method=adapter exports no peft adapter; --merge and --verify need one"):
        export(out, tmp_path / "exp", verify=True)
    assert not (tmp_path / "exp").exists()  # refused before writing anything
    (out / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors not found; the run's trained weights are missing"):
        export(out, tmp_path / "exp")


def kill_and_resume(tmp_path, data, point: str, *args):
    """Uninterrupted vs SIGKILLed at `point` and re-run (possibly several kills: every checkpoint save is a
    `checkpoint_mid`, so that kill repeats until the env var is dropped)."""
    ref = cli(tmp_path / "ref", data, *args)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    killed = cli(out, data, *args, env={"SPARSE_PEFT_CRASH_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = cli(out, data, *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "ref", out))
    for key in ("eval", "eval_last", "best_step", "retained_params", "steps", "stages"):
        assert a[key] == b[key], key
    wa, wb = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "ref", out))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    curves = [[json.loads(x)["step"] for x in (d / "curve.jsonl").read_text().splitlines()] for d in (tmp_path / "ref", out)]
    assert curves[0] == curves[1]  # nothing doubled, nothing lost
    return b


PLAIN = ["method=sora", "trainer.max_steps=6", "trainer.save_every=2", "trainer.eval_every=1", "data.max_train_samples=24"]
STAGED = ["method=sora", "scheduler=linear", "scheduler.max_lambda=0.2", "scheduler.lambda_num=3",
          "scheduler.stage_epochs=1", "scheduler.train_subset=16", "trainer.max_steps=4", "trainer.eval_every=2",
          "trainer.save_every=2", "method.sparse_lambda_2=0.01", "trainer.lr=0.05", "data.max_train_samples=24"]


@pytest.mark.slow
@pytest.mark.parametrize("point, args", [
    ("step1", PLAIN),            # before the first checkpoint
    ("checkpoint_mid", PLAIN),   # inside the first checkpoint save (weights written, not yet renamed)
    ("step5", PLAIN),            # after a checkpoint, mid-run
    ("final_write", PLAIN),      # metrics.json written to its temp file, not yet renamed
    ("stage_end", STAGED),       # right after a scheduler stage ended
    ("checkpoint_mid", STAGED),
    ("final_write", STAGED),
], ids=["plain-before-ckpt", "plain-mid-save", "plain-mid-run", "plain-final-write", "staged-stage-end",
        "staged-mid-save", "staged-final-write"])
def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_glue, point, args):
    kill_and_resume(tmp_path, tiny_glue, point, *args)


@pytest.mark.slow
def test_a_killed_sweep_job_reruns_once_and_nothing_is_shared_or_doubled(tmp_path, tiny_glue):
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", "model=tiny_bert",
            f"data.root={tiny_glue}", "trainer.max_steps=4", "trainer.save_every=1", "trainer.eval_every=1",
            "trainer.batch_size=8", "trainer.progress_bar=false", "trainer.num_threads=1", "logger.wandb.mode=disabled",
            "method=lora,bitfit", "trainer.seed=1,2,3,4"]
    victim = "method=bitfit,model=tiny_bert,trainer.batch_size=8,trainer.eval_every=1,trainer.max_steps=4,trainer.save_every=1,trainer.seed=3"
    first = train_cli(*args, env={"SPARSE_PEFT_CRASH_AT": f"step2@{victim}"}, timeout=900)
    assert first.returncode != 0  # the killed worker fails the sweep
    assert not (sweep / victim / "metrics.json").exists()
    completed_first = len(list(sweep.glob("*/metrics.json")))
    second = train_cli(*args, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("complete, skipped") == completed_first < 8  # completed jobs are not run again
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == 8 and len({j.name for j in jobs}) == 8
    for j in jobs:
        m = json.loads((j / "metrics.json").read_text())
        assert f"method={m['method']}" in j.name and f"trainer.seed={m['seed']}" in j.name  # its own dir
        assert [json.loads(x)["step"] for x in (j / "curve.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
