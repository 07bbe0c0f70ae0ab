"""The training loop, top to bottom: AdamW over the method's groups, warmup/decay, method hooks in the order
`methods/base.py` documents, evaluation every `eval_every` steps, best/last checkpoints, resume, scheduler stages.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from sparse_peft import UserError
from sparse_peft.distributed import World, shard
from sparse_peft.runio import (RunLogger, TrainState, crash_point, load_checkpoint, load_trainable, recover_checkpoint,
                               save_checkpoint)
from sparse_peft.schedulers import Plan, Stages, lr_schedule
from sparse_peft.tasks.loaders import lengths, make_loader, subset, train_order

log = logging.getLogger("sparse_peft")


@dataclass
class Result:
    state: TrainState
    best: Optional[dict]  # trainable weights of the best evaluation of stage 0
    logger: RunLogger
    loaders: dict  # evaluation split name -> loader, for the final evaluation


def fit(run, task, data, model, method, plan: Plan, out: Path, world: World, device: torch.device, config: dict) -> Result:
    t = run.trainer
    ddp = DistributedDataParallel(model) if world.size > 1 else model  # forward/backward; hooks use `model`
    optimizer, scheduler = build_optimizer(model, method, run, plan)
    eval_every = t.eval_every if t.eval_every > 0 else plan.steps_per_epoch
    save_every = t.save_every if t.save_every > 0 else plan.steps_per_epoch

    state, best = TrainState(), None
    ckpt_dir = out / "checkpoints" / "last"
    recover_checkpoint(ckpt_dir)
    if t.resume and ckpt_dir.exists():
        state, best = load_checkpoint(ckpt_dir, model, method, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt_dir, state.step)
    elif method.train_start_batches > 0:
        method.on_train_start(model, start_batches(task, data, run, method.train_start_batches, device))
    method.draw_batch = lambda key, size: draw_batch(task, data, run, device, key, size)
    logger = RunLogger(out, run.logger, f"{run.method.name}-{run.task.name}-seed{t.seed}", config, state.step,
                       write=world.main)
    loaders = {name: task.eval_loader(split, t.eval_batch_size) for name, split in data.eval_splits.items()}
    stages = None
    if plan.staged:  # staged runs also score a fixed training subset: the `memorization` curve
        stages = Stages(out, task.eval_loader(subset(data.train, run.scheduler.train_subset), t.eval_batch_size),
                        write=world.main)
        stages.resume(state.stage)
    metric, train_lengths = task.metric, lengths(data.train)

    def evaluate_and_record(stage, loss_sum: float, loss_n: int) -> None:
        nonlocal best
        scores = task.evaluate(model, loaders["validation"], device)
        train_scores = task.evaluate(model, stages.probe, device) if stages else None
        retained, ranks = method.retained_params(model), method.ranks(model)
        settled = plan.settled(state.step)  # a candidate for the best checkpoint; the report counts these too
        record = {"type": "eval", "step": state.step, "epoch": state.step / plan.steps_per_epoch, "stage": stage.index,
                  "lambda": stage.xi, "settled": settled, "retained_params": retained, "eval": scores,
                  "train": train_scores,
                  **(stages.curves(state, scores, train_scores, metric) if stages else
                     {"generalization": None, "memorization": None}),
                  "train_loss": loss_sum / max(loss_n, 1), "lr": scheduler.get_last_lr()[0], "ranks": ranks,
                  **method.log_values(model)}
        logger.curve(record)
        logger.log({"train/loss": record["train_loss"], "train/lr": record["lr"], "sparsity/retained_params": retained,
                    "sparsity/stage": stage.index, **{f"eval/{k}": v for k, v in scores.items()},
                    **{f"train_subset/{k}": v for k, v in (train_scores or {}).items()}}, state.step)
        better = state.stage_best is None or scores[metric] > state.stage_best["eval"][metric]
        if better and settled:
            state.stage_best = {k: record[k] for k in ("step", "eval", "train", "retained_params", "ranks")}
            if stage.index == 0:
                state.best_metric, state.best_step, best = scores[metric], state.step, method.trained_state(model)
            if stages:
                stages.new_best(stage.index, method.trained_state(model))
        log.info("step %d (stage %d): %s (retained %d)", state.step, stage.index, scores, retained)

    # ---- the loop ------------------------------------------------------------------------------------
    model.train()
    bar = tqdm(total=plan.total_steps, initial=state.step, desc=f"{run.method.name}/{run.task.name}",
               disable=not t.progress_bar, dynamic_ncols=True)
    loss_sum, loss_n, start = 0.0, 0, time.perf_counter()
    while state.step < plan.total_steps:
        stage = plan.stages[state.stage]
        epoch, done_in_epoch = divmod(state.step, plan.steps_per_epoch)
        order = train_order(train_lengths, t.batch_size, t.seed * 1000 + epoch, run.data.group_by_length)
        order = order[done_in_epoch * t.grad_accum * t.batch_size:]  # resume mid-epoch
        loader = make_loader(data.train, data.collator, t.batch_size // world.size, shard(order, t.batch_size, world),
                             run.data.num_workers)
        for i, batch in enumerate(loader):
            if i % t.grad_accum == 0:  # the first micro-batch of a step
                value = plan.value(state.step)
                if value is not None:
                    method.set_threshold(value)
                method.on_step_begin(model, state.step)
            loss = forward_loss(ddp, method, task.inputs(batch, device), state.step)
            (loss / t.grad_accum).backward()
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if (i + 1) % t.grad_accum and i + 1 < len(loader):
                continue
            optimizer_step(model, method, optimizer, scheduler, t.max_grad_norm, state.step, loss.item())
            state.step += 1
            crash_point(f"step{state.step}", out)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if state.step % eval_every == 0 or state.step == stage.end:
                state.train_time_s += time.perf_counter() - start
                evaluate_and_record(stage, loss_sum, loss_n)
                loss_sum, loss_n, start = 0.0, 0, time.perf_counter()
            if stages and state.step == stage.end:  # Algorithm 1: record the stage, continue from its best
                logger.curve(stages.end_stage(state, stage, metric))
                load_trainable(model, stages.best_weights)
                crash_point("stage_end", out)
            if state.step % save_every == 0 and state.step < plan.total_steps and world.main:
                save_checkpoint(ckpt_dir, model, method, optimizer, scheduler, state, best)
            if state.step >= stage.end:
                break
    bar.close()
    return Result(state, best, logger, loaders)


def build_optimizer(model, method, run, plan: Plan):
    """AdamW over the method's parameter groups; linear warmup then linear decay to 0 in every stage."""
    t = run.trainer
    # Fused: one kernel per tensor instead of torch's default loop of ~8 ops on CPU (fused=None), which took a fifth
    # of a full fine-tuning step (benchmarks/adamw_step.py); the same update up to rounding. A resumed run keeps the
    # kernel it started with (load_state_dict restores the group's flags).
    groups = method.param_groups(model, t.lr, t.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, fused=t.fused_adamw or None)
    return optimizer, lr_schedule(optimizer, plan.stages, t.warmup_ratio, run.scheduler.restart_lr)


def start_batches(task, data, run, n: int, device) -> list[dict]:
    """`n` training batches for a method's data-driven set-up, drawn with their own generator (the run's RNG
    stream is untouched, so a method that asks for none trains exactly as before)."""
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(run.trainer.seed)).tolist()
    loader = make_loader(data.train, data.collator, run.trainer.batch_size, order[: n * run.trainer.batch_size])
    return [task.inputs(b, device) for b in loader]


def draw_batch(task, data, run, device, key: int, size: int) -> dict:
    """`size` distinct training examples as one batch, drawn with a generator seeded from (trainer.seed, key), so a
    method's extra batches (IST's importance update) are the same on a resumed run and leave the run's RNG alone."""
    g = torch.Generator().manual_seed(run.trainer.seed * 1_000_003 + key)
    order = torch.randperm(len(data.train), generator=g)[:size].tolist()
    return task.inputs(next(iter(make_loader(data.train, data.collator, len(order), order))), device)


def forward_loss(model, method, batch: dict, step: int) -> torch.Tensor:
    """Task loss plus the method's regulariser (e.g. SoRA's L1 on gates); a NaN/inf loss stops the run."""
    loss = model(**batch).loss
    reg = method.regularization_loss(model)
    if reg is not None:
        loss = loss + reg
    if not torch.isfinite(loss):
        raise UserError(f"loss is {loss.item()} at step {step}; lower trainer.lr or set trainer.max_grad_norm, and "
                        f"re-run with trainer.overwrite=true (a resume would replay the divergence)")
    return loss


def optimizer_step(model, method, optimizer, scheduler, max_grad_norm: float, step: int, loss: Optional[float] = None) -> None:
    # Clipping covers every optimised parameter, including groups a method adds (SoRA's gates).
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    method.after_optimizer_step(model, optimizer, step, loss)  # e.g. a proximal step, a rank budget update
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def evaluate_splits(model, task, loaders: dict, device) -> dict:
    """`eval`: validation metrics (+ `<split>_<metric>` for extra splits such as MNLI mismatched); `test`: the
    test split or None."""
    result = {"eval": {}, "test": None}
    for name, loader in loaders.items():
        scores = task.evaluate(model, loader, device)
        if name == "validation":
            result["eval"].update(scores)
        elif name == "test":
            result["test"] = scores
        else:
            result["eval"].update({f"{name}_{k}": v for k, v in scores.items()})
    return result
