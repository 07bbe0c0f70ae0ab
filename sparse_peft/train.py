"""`python -m sparse_peft.train method=<m> task=<group>/<t> [key=value ...]`: the whole pipeline on one screen.

compose + check the config -> output dir -> task data -> model -> method (inject) -> the loop (`loop.fit`) ->
evaluate the best and last checkpoints on every split -> model.safetensors + metrics.json (last, atomically).
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from sparse_peft import UserError
from sparse_peft.config import apply_presets, load_run_config
from sparse_peft.devices import environment, peak_memory_mb, pick_device
from sparse_peft.distributed import broadcast, finish, init_world
from sparse_peft.loop import evaluate_splits, fit
from sparse_peft.methods import build_method, count
from sparse_peft.models import build_model, load_tokenizer
from sparse_peft.runio import (discard_failed_start, in_sweep, load_trainable, prepare_output_dir, run_dirname,
                               save_method_state, save_weights, unlock_output_dir, write_json_atomic)
from sparse_peft.schedulers import plan as plan_steps
from sparse_peft.tasks import build_task

log = logging.getLogger("sparse_peft")


def train(cfg: DictConfig) -> dict:
    cfg = apply_presets(cfg)
    run = load_run_config(cfg)
    t = run.trainer
    world = init_world(t.device)  # torchrun / accelerate launch: one process per rank, rank 0 writes
    out, done = broadcast(prepare_output_dir(t, cfg) if world.main else None, world)
    if done is not None or t.dry_run:  # a sweep's completed job, or a dry run: nothing to train
        status = "complete, skipped" if done else ("would resume" if (out / "checkpoints" / "last").exists() else "would run")
        print(f"{'[dry-run] ' if t.dry_run else ''}{status}: {out}", flush=True)
        return done or {"status": "dry-run", "output_dir": str(out)}
    try:
        return run_training(cfg, run, world, out)
    except BaseException:
        if world.main:  # nothing half-written that looks like a run; a run with a checkpoint keeps it to resume
            discard_failed_start(out)
        raise
    finally:
        unlock_output_dir(out)


def run_training(cfg: DictConfig, run, world, out: Path) -> dict:
    t = run.trainer
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    device = pick_device(t.device, world)
    set_seed(t.seed)

    tokenizer = load_tokenizer(run.model)
    task = build_task(run.task, run.data)
    data = task.load(tokenizer)
    model = build_model(run.model, task, tokenizer)
    total_params = count(model.parameters())
    plan = plan_steps(run, len(data.train))
    method = build_method(run.method, run.model, plan.total_steps, task)
    model = method.inject(model).to(device)
    trainable_params = count(p for p in model.parameters() if p.requires_grad)
    log.info("%s on %s/%s: %d trainable of %d parameters, %d steps in %d stage(s)", run.method.name, run.task.group,
             run.task.name, trainable_params, total_params, plan.total_steps, len(plan.stages))

    result = fit(run, task, data, model, method, plan, out, world, device, OmegaConf.to_container(cfg, resolve=True))
    state = result.state
    log.info("rank %d of %d: trainable checksum %s", world.rank, world.size, checksum(model, method))
    if not world.main:  # rank 0 evaluates the final checkpoints and writes the results
        finish(world)
        return {"status": "completed", "rank": world.rank}

    # ---- final evaluation: last and best (stage 0) checkpoints on every split ------------------------
    loaders = result.loaders
    last = evaluate_splits(model, task, loaders, device)
    last_weights = method.trained_state(model)
    if result.best is not None:  # none when no evaluation came after the threshold settled: best = last
        load_trainable(model, result.best)
    best_scores = evaluate_splits(model, task, loaders, device) if result.best is not None else last
    chosen = best_scores if t.select == "best" else last
    if t.select == "last":
        load_trainable(model, last_weights)
    save_weights(method.trained_state(model), out / "model.safetensors")  # what metrics.json reports; for export
    if method.state_dict():  # e.g. SparseAdapter's masks, which the export restores with the weights
        save_method_state(method.state_dict(), out / "method_state.pt")
    metrics = {
        "method": run.method.label or run.method.name, "task": run.task.name, "model": run.model.name, "seed": t.seed,
        "eval": chosen["eval"], "test": chosen["test"], "checkpoint": t.select,
        "selection_metric": task.metric, "best_step": state.best_step,
        "eval_best": best_scores["eval"], "test_best": best_scores["test"],
        "eval_last": last["eval"], "test_last": last["test"],
        "total_params": total_params, "trainable_params": trainable_params,
        "retained_params": method.retained_params(model), "ranks": method.ranks(model),
        "steps": state.step, "epochs": state.step / plan.steps_per_epoch, "train_time_s": round(state.train_time_s, 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1), **data.info,
        "train_examples": len(data.train), "stages": result.logger.records("stage") if plan.staged else None,
        "world_size": world.size, "environment": environment(device), "status": "completed",
    }
    result.logger.finish({f"final/{k}": v for k, v in chosen["eval"].items()})
    write_json_atomic(out / "metrics.json", metrics)  # its presence marks the run complete
    if not t.keep_checkpoints:  # only now: a kill before the line above resumes from them
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    log.info("done: %s -> %s", metrics["eval"], out)
    finish(world)
    return metrics


def checksum(model, method) -> str:
    """A digest of the trained parameters: equal on every rank of a data-parallel run."""
    h = hashlib.sha256()
    for _, p in sorted(method.trained_state(model).items()):
        h.update(p.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def check_choices(argv: list[str]) -> None:
    """One clear line for an unknown method/task/model/scheduler (Hydra's own message spans a screen)."""
    for arg in argv:
        group, sep, values = arg.lstrip("+~").partition("=")
        if not sep or group not in ("method", "model", "task", "scheduler"):
            continue
        options = sorted(str(p.relative_to(CONFIG_DIR / group).with_suffix("")) for p in (CONFIG_DIR / group).rglob("*.yaml"))
        for value in values.split(","):  # multirun: method=lora,sora
            if value not in options:
                print(f"error: unknown {group} `{value}`; choose {group}=<name> with name in {options}", file=sys.stderr)
                sys.exit(2)


def check_overrides(argv: list[str]) -> None:
    """Compose the config once before Hydra does, so that a misspelt key or a missing config file is one clear
    line (Hydra's own message spans several lines and exits 1). Sweeps are checked with each list's first value."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a in ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd") for a in argv):
        return  # another primary config: Hydra checks it
    args, skip = [], False
    for a in argv:
        if skip and "=" not in a:  # the value of a Hydra flag (`--cfg job`, `--config-name x`)
            skip = False
            continue
        skip = a in ("--cfg", "-c", "--package", "-p", "--info", "-i")
        if not a.startswith("-") and not a.lstrip("+~").startswith("hydra"):
            args.append(a)
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception as e:
        print(f"error: cannot parse the overrides: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    first = []
    for arg, o in zip(args, parsed):
        if o.is_sweep_override():
            prefix = arg[: len(arg) - len(arg.lstrip("+~"))]
            first.append(f"{prefix}{o.key_or_group}={next(iter(o.sweep_string_iterator()))}")
        else:
            first.append(arg)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            compose(config_name="config", overrides=first)
    except Exception as e:
        cause = str(e.__cause__ or "").splitlines()
        lines = str(e).splitlines()
        if cause and cause[0].startswith("Key '"):  # a misspelt key
            key = lines[0].removeprefix("Could not override '").rstrip(".'")
            msg = f"config `{key}`: no such key; check its spelling (`--cfg job` prints the config), or add it with +{key}=..."
        elif any(line.startswith("Available options") for line in lines):  # an unknown config file
            i = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
            options = []
            for line in lines[i + 1:]:
                if not line.startswith("\t"):
                    break
                options.append(line.strip())
            msg = f"{lines[0].split(': ', 1)[-1]}; choose one of {options}"
        else:
            msg = lines[0]
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


OmegaConf.register_new_resolver("run_dirname", run_dirname, replace=True)  # configs/config.yaml: hydra.sweep.subdir


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig):
    try:
        metrics = train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if in_sweep():
            raise  # Hydra records the failed job, runs the others, and fails the sweep at the end
        sys.exit(2)
    return metrics["eval"][metrics["selection_metric"]] if metrics.get("eval") else None  # for a Hydra sweeper


if __name__ == "__main__":
    if "--dry-run" in sys.argv:  # list what a run or sweep would do, train nothing
        sys.argv = [a for a in sys.argv if a != "--dry-run"] + ["trainer.dry_run=true"]
    check_choices(sys.argv[1:])
    check_overrides(sys.argv[1:])
    main()
