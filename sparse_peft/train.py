"""`python -m sparse_peft.train method=<m> task=glue/<t> [key=value ...]`: the whole pipeline, top to bottom.

build model -> inject method -> train (AdamW, warmup/decay, clip, method hooks) -> evaluate every
`eval_every` steps -> best/last checkpoint -> metrics.json + curve.jsonl.
"""
from __future__ import annotations

import hashlib
import logging
import math
import resource
import shutil
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import set_seed

from sparse_peft import UserError
from sparse_peft.config import apply_presets, load_run_config
from sparse_peft.distributed import World, broadcast, finish, init_world, shard
from sparse_peft.data import build_task_data, eval_loader, eval_loaders, lengths, make_loader, subset, train_order
from sparse_peft.methods import build_method
from sparse_peft.methods.base import count
from sparse_peft.metrics import glue_metrics
from sparse_peft.models import build_model, load_tokenizer
from sparse_peft.schedulers import Stage, lr_schedule, stage_plan
from sparse_peft.runio import (RunLogger, in_sweep, save_weights, TrainState, load_checkpoint, load_trainable, prepare_output_dir,
                               save_checkpoint, trainable_state, write_json_atomic)

log = logging.getLogger("sparse_peft")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


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
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    device = pick_device(t.device, world)
    set_seed(t.seed)

    # ---- data, model, stages, method -----------------------------------------------------------------
    tokenizer = load_tokenizer(run.model)
    data = build_task_data(run.task, run.data, tokenizer)
    model = build_model(run.model, data.task.num_labels, len(tokenizer))
    total_params = count(model.parameters())
    stages, steps_per_epoch = plan_steps(run, len(data.train))
    total_steps, staged = stages[-1].end, len(stages) > 1
    method = build_method(run.method, run.model, total_steps)
    model = method.apply(model).to(device)
    ddp = DistributedDataParallel(model) if world.size > 1 else model  # forward/backward; hooks use `model`
    trainable_params = count(p for p in model.parameters() if p.requires_grad)
    log.info("%s on %s/%s: %d trainable of %d parameters, %d steps in %d stage(s)", run.method.name,
             run.task.group, run.task.name, trainable_params, total_params, total_steps, len(stages))

    # ---- optimisation --------------------------------------------------------------------------------
    optimizer, scheduler = build_optimizer(model, method, t, stages, run.scheduler.restart_lr)
    eval_every = t.eval_every if t.eval_every > 0 else steps_per_epoch
    save_every = t.save_every if t.save_every > 0 else steps_per_epoch

    state, best = TrainState(), None
    ckpt_dir = out / "checkpoints" / "last"
    if t.resume and ckpt_dir.exists():
        state, best = load_checkpoint(ckpt_dir, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt_dir, state.step)
    logger = RunLogger(out, run.logger, f"{run.method.name}-{run.task.name}-seed{t.seed}",
                       OmegaConf.to_container(cfg, resolve=True), state.step, write=world.main)
    loaders = eval_loaders(data, t.eval_batch_size)
    # Staged runs also score a fixed training subset: the `memorization` curve.
    probe = eval_loader(subset(data.train, run.scheduler.train_subset), data.collator, t.eval_batch_size) if staged else None
    metric = data.task.metric
    train_lengths = lengths(data.train)
    stage_file = lambda k: out / "stages" / f"stage{k}.safetensors"  # noqa: E731  best weights of each stage
    stage_weights = load_file(str(stage_file(state.stage))) if staged and stage_file(state.stage).exists() else None

    def evaluate_and_record(stage: Stage, loss_sum: float, loss_n: int) -> None:
        nonlocal best, stage_weights
        scores = evaluate(model, loaders["validation"], data.task, device)
        train_scores = evaluate(model, probe, data.task, device) if probe else None
        retained, ranks = method.retained_params(model), method.ranks(model)
        record = {"type": "eval", "step": state.step, "epoch": state.step / steps_per_epoch, "stage": stage.index,
                  "lambda": stage.xi, "retained_params": retained, "eval": scores, "train": train_scores,
                  "generalization": percent_of(scores[metric], state.stage0_eval),
                  "memorization": percent_of(train_scores and train_scores[metric], state.stage0_train),
                  "train_loss": loss_sum / max(loss_n, 1), "lr": scheduler.get_last_lr()[0], "ranks": ranks}
        logger.curve(record)
        logger.log({"train/loss": record["train_loss"], "train/lr": record["lr"], "sparsity/retained_params": retained,
                    "sparsity/stage": stage.index, **{f"eval/{k}": v for k, v in scores.items()},
                    **{f"train_subset/{k}": v for k, v in (train_scores or {}).items()}}, state.step)
        if state.stage_best is None or scores[metric] > state.stage_best["eval"][metric]:
            state.stage_best = {k: record[k] for k in ("step", "eval", "train", "retained_params", "ranks")}
            if stage.index == 0:
                state.best_metric, state.best_step, best = scores[metric], state.step, trainable_state(model)
            if staged:
                stage_weights = trainable_state(model)
                if world.main:
                    stage_file(stage.index).parent.mkdir(exist_ok=True)
                    save_weights(stage_weights, stage_file(stage.index))
        log.info("step %d (stage %d): %s (retained %d)", state.step, stage.index, scores, retained)

    def end_stage(stage: Stage) -> None:
        """Record the stage's best checkpoint and continue the next stage from it (Algorithm 1)."""
        rec = state.stage_best
        if stage.index == 0:
            state.stage0_eval, state.stage0_train = rec["eval"][metric], rec["train"][metric]
        logger.curve({"type": "stage", "step": state.step, "best_step": rec["step"], "stage": stage.index,
                      "lambda": stage.xi, "retained_params": rec["retained_params"], "eval": rec["eval"],
                      "train": rec["train"], "generalization": percent_of(rec["eval"][metric], state.stage0_eval),
                      "memorization": percent_of(rec["train"][metric], state.stage0_train), "ranks": rec["ranks"]})
        load_trainable(model, stage_weights)
        state.stage, state.stage_best = state.stage + 1, None

    # ---- training loop -------------------------------------------------------------------------------
    model.train()
    bar = tqdm(total=total_steps, initial=state.step, desc=f"{run.method.name}/{run.task.name}",
               disable=not t.progress_bar, dynamic_ncols=True)
    loss_sum, loss_n, start = 0.0, 0, time.perf_counter()
    while state.step < total_steps:
        stage = stages[state.stage]
        if stage.xi is not None:
            method.set_threshold(stage.xi)
        epoch, done_in_epoch = divmod(state.step, steps_per_epoch)
        order = train_order(train_lengths, t.batch_size, t.seed * 1000 + epoch, run.data.group_by_length)
        order = order[done_in_epoch * t.grad_accum * t.batch_size:]  # resume mid-epoch
        loader = make_loader(data.train, data.collator, t.batch_size // world.size, shard(order, t.batch_size, world),
                             run.data.num_workers)
        for i, batch in enumerate(loader):
            loss = forward_loss(ddp, method, {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}, state.step)
            (loss / t.grad_accum).backward()
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if (i + 1) % t.grad_accum and i + 1 < len(loader):
                continue
            optimizer_step(model, method, optimizer, scheduler, t.max_grad_norm, state.step)
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if state.step % eval_every == 0 or state.step == stage.end:
                state.train_time_s += time.perf_counter() - start
                evaluate_and_record(stage, loss_sum, loss_n)
                loss_sum, loss_n, start = 0.0, 0, time.perf_counter()
            if staged and state.step == stage.end:
                end_stage(stage)
            if state.step % save_every == 0 and state.step < total_steps and world.main:
                save_checkpoint(ckpt_dir, model, optimizer, scheduler, state, best)
            if state.step >= stage.end:
                break
    bar.close()
    log.info("rank %d of %d: trainable checksum %s", world.rank, world.size, checksum(model))
    if not world.main:  # rank 0 evaluates the final checkpoints and writes the results
        finish(world)
        return {"status": "completed", "rank": world.rank}

    # ---- final evaluation: last and best (stage 0) checkpoints on every split ------------------------
    last = evaluate_splits(model, loaders, data.task, device)
    last_weights = trainable_state(model)
    load_trainable(model, best)
    best_scores = evaluate_splits(model, loaders, data.task, device)
    chosen = best_scores if t.select == "best" else last
    if t.select == "last":
        load_trainable(model, last_weights)
    # The weights metrics.json reports, for `python -m sparse_peft.export`.
    save_weights(trainable_state(model), out / "model.safetensors")
    metrics = {
        "method": run.method.name, "task": run.task.name, "model": run.model.name, "seed": t.seed,
        "eval": chosen["eval"], "test": chosen["test"], "checkpoint": t.select,
        "selection_metric": metric, "best_step": state.best_step,
        "eval_best": best_scores["eval"], "test_best": best_scores["test"],
        "eval_last": last["eval"], "test_last": last["test"],
        "total_params": total_params, "trainable_params": trainable_params,
        "retained_params": method.retained_params(model), "ranks": method.ranks(model),
        "steps": state.step, "epochs": state.step / steps_per_epoch, "train_time_s": round(state.train_time_s, 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1), "split_protocol": run.task.split_protocol,
        "train_examples": len(data.train), "stages": logger.records("stage") if staged else None,
        "world_size": world.size, "environment": environment(device), "status": "completed",
    }
    logger.finish({f"final/{k}": v for k, v in chosen["eval"].items()})
    if not t.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    write_json_atomic(out / "metrics.json", metrics)  # last: its presence marks the run complete
    log.info("done: %s -> %s", metrics["eval"], out)
    finish(world)
    return metrics


def checksum(model) -> str:
    """A digest of the trainable parameters: equal on every rank of a data-parallel run."""
    h = hashlib.sha256()
    for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def percent_of(value, reference):
    """SoRA's generalization / memorization: a metric as a percentage of its stage-0 best."""
    return None if value is None or not reference else 100.0 * value / reference


def plan_steps(run, n_train: int) -> tuple[list[Stage], int]:
    """The scheduler's stages in optimizer steps, and the steps per epoch."""
    t = run.trainer
    steps_per_epoch = math.ceil(math.ceil(n_train / t.batch_size) / t.grad_accum)
    stage0 = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    return stage_plan(run.scheduler, getattr(run.method, "sparse_lambda_2", None), stage0, steps_per_epoch), steps_per_epoch


def build_optimizer(model, method, t, stages: list[Stage], restart_lr: bool = True):
    """AdamW over the method's parameter groups; linear warmup then linear decay to 0 in every stage."""
    optimizer = torch.optim.AdamW(method.param_groups(model, t.lr, t.weight_decay), lr=t.lr)
    return optimizer, lr_schedule(optimizer, stages, t.warmup_ratio, restart_lr)


def forward_loss(model, method, batch: dict, step: int) -> torch.Tensor:
    """Task loss plus the method's regulariser (e.g. SoRA's L1 on gates); a NaN/inf loss stops the run."""
    loss = model(**batch).loss
    reg = method.regularization_loss(model)
    if reg is not None:
        loss = loss + reg
    if not torch.isfinite(loss):
        raise UserError(f"loss is {loss.item()} at step {step}; lower trainer.lr or set trainer.max_grad_norm")
    return loss


def optimizer_step(model, method, optimizer, scheduler, max_grad_norm: float, step: int) -> None:
    # Clipping covers every optimised parameter, including groups a method adds (SoRA's gates).
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    method.after_optimizer_step(model, optimizer, step)  # e.g. a proximal step, a rank budget update
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def predict(model, loader, device) -> tuple[np.ndarray, np.ndarray]:
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        labels.append(batch.pop("labels").numpy())
        inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
        logits.append(model(**inputs).logits.float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(logits), np.concatenate(labels)


def evaluate(model, loader, task, device) -> dict[str, float]:
    logits, labels = predict(model, loader, device)
    preds = logits[:, 0] if task.is_regression else logits.argmax(-1)
    return glue_metrics(task.name, preds, labels)


def evaluate_splits(model, loaders, task, device) -> dict:
    """`eval`: validation metrics (+ `<split>_<metric>` for MNLI mismatched); `test`: the test split or None."""
    result = {"eval": {}, "test": None}
    for name, loader in loaders.items():
        scores = evaluate(model, loader, task, device)
        if name == "validation":
            result["eval"].update(scores)
        elif name == "test":
            result["test"] = scores
        else:
            result["eval"].update({f"{name}_{k}": v for k, v in scores.items()})
    return result


def pick_device(name: str, world: World = World()) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name, world.local_rank) if name == "cuda" else torch.device(name)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def environment(device: torch.device) -> dict:
    """Where the numbers came from: results from different hardware or library versions are not bit-comparable."""
    import peft
    import transformers
    return {"device": device_name(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


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


# Sweep subdirs are named by the job's overrides; `task=glue/rte` must not become a nested dir.
OmegaConf.register_new_resolver("path_safe", lambda s: (s or "default").replace("/", "-"), replace=True)


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
    main()
