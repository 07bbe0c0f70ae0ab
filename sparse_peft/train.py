"""`python -m sparse_peft.train method=<m> task=glue/<t> [key=value ...]`: the whole pipeline, top to bottom.

build model -> inject method -> train (AdamW, warmup/decay, clip, method hooks) -> evaluate every
`eval_every` steps -> best/last checkpoint -> metrics.json + curve.jsonl.
"""
from __future__ import annotations

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
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup, set_seed

from sparse_peft import UserError
from sparse_peft.config import load_run_config
from sparse_peft.data import build_task_data, eval_loader, lengths, make_loader, train_order
from sparse_peft.methods import build_method
from sparse_peft.methods.base import count
from sparse_peft.metrics import glue_metrics
from sparse_peft.models import build_model, load_tokenizer
from sparse_peft.runio import (RunLogger, TrainState, load_checkpoint, load_trainable, prepare_output_dir,
                               save_checkpoint, trainable_state, write_json_atomic)

log = logging.getLogger("sparse_peft")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def train(cfg: DictConfig) -> dict:
    run = load_run_config(cfg)
    t = run.trainer
    out = prepare_output_dir(t, cfg)
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    device = pick_device(t.device)
    set_seed(t.seed)

    # ---- model, data, method -------------------------------------------------------------------------
    tokenizer = load_tokenizer(run.model)
    data = build_task_data(run.task, run.data, tokenizer)
    model = build_model(run.model, data.task.num_labels, len(tokenizer))
    total_params = count(model.parameters())
    method = build_method(run.method, run.model)
    model = method.apply(model).to(device)
    trainable_params = count(p for p in model.parameters() if p.requires_grad)
    log.info("%s on %s/%s: %d trainable of %d parameters", run.method.name, run.task.group, run.task.name,
             trainable_params, total_params)

    # ---- optimisation --------------------------------------------------------------------------------
    batches_per_epoch = math.ceil(len(data.train) / t.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    optimizer, scheduler = build_optimizer(model, method, t, total_steps)
    eval_every = t.eval_every if t.eval_every > 0 else steps_per_epoch
    save_every = t.save_every if t.save_every > 0 else steps_per_epoch

    state, best = TrainState(), None
    ckpt_dir = out / "checkpoints" / "last"
    if t.resume and ckpt_dir.exists():
        state, best = load_checkpoint(ckpt_dir, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt_dir, state.step)
    logger = RunLogger(out, run.logger, f"{run.method.name}-{run.task.name}-seed{t.seed}",
                       OmegaConf.to_container(cfg, resolve=True), state.step)
    eval_loaders = {name: eval_loader(ds, data.collator, t.eval_batch_size) for name, ds in data.eval_splits.items()}
    metric = data.task.metric
    train_lengths = lengths(data.train)

    def evaluate_and_record(loss_sum: float, loss_n: int) -> None:
        nonlocal best
        scores = evaluate(model, eval_loaders["validation"], data.task, device)
        retained = method.retained_params(model)
        record = {"step": state.step, "epoch": state.step / steps_per_epoch, "stage": 0, "lambda": None,
                  "retained_params": retained, "eval": scores, "train": None, "generalization": None,
                  "memorization": None, "train_loss": loss_sum / max(loss_n, 1), "lr": scheduler.get_last_lr()[0]}
        logger.curve(record)
        logger.log({"train/loss": record["train_loss"], "train/lr": record["lr"],
                    "sparsity/retained_params": retained, **{f"eval/{k}": v for k, v in scores.items()}}, state.step)
        if state.best_metric is None or scores[metric] > state.best_metric:
            state.best_metric, state.best_step, best = scores[metric], state.step, trainable_state(model)
        log.info("step %d: %s (retained %d)", state.step, scores, retained)

    # ---- training loop -------------------------------------------------------------------------------
    model.train()
    bar = tqdm(total=total_steps, initial=state.step, desc=f"{run.method.name}/{run.task.name}",
               disable=not t.progress_bar, dynamic_ncols=True)
    loss_sum, loss_n, start = 0.0, 0, time.perf_counter()
    while state.step < total_steps:
        epoch, done_in_epoch = divmod(state.step, steps_per_epoch)
        order = train_order(train_lengths, t.batch_size, t.seed * 1000 + epoch, run.data.group_by_length)
        order = order[done_in_epoch * t.grad_accum * t.batch_size:]  # resume mid-epoch
        loader = make_loader(data.train, data.collator, t.batch_size, order, run.data.num_workers)
        for i, batch in enumerate(loader):
            loss = forward_loss(model, method, {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}, state.step)
            (loss / t.grad_accum).backward()
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if (i + 1) % t.grad_accum and i + 1 < len(loader):
                continue
            optimizer_step(model, method, optimizer, scheduler, t.max_grad_norm, state.step)
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if state.step % eval_every == 0 or state.step == total_steps:
                state.train_time_s += time.perf_counter() - start
                evaluate_and_record(loss_sum, loss_n)
                loss_sum, loss_n, start = 0.0, 0, time.perf_counter()
            if state.step % save_every == 0 and state.step < total_steps:
                save_checkpoint(ckpt_dir, model, optimizer, scheduler, state, best)
            if state.step >= total_steps:
                break
    bar.close()

    # ---- final evaluation: last and best checkpoints on every split ----------------------------------
    last = evaluate_splits(model, eval_loaders, data.task, device)
    load_trainable(model, best)
    best_scores = evaluate_splits(model, eval_loaders, data.task, device)
    save_file({k: v.contiguous() for k, v in best.items()}, str(out / "best.safetensors"))
    chosen = best_scores if t.select == "best" else last
    metrics = {
        "method": run.method.name, "task": run.task.name, "model": run.model.name, "seed": t.seed,
        "eval": chosen["eval"], "test": chosen["test"], "checkpoint": t.select,
        "selection_metric": metric, "best_step": state.best_step,
        "eval_best": best_scores["eval"], "test_best": best_scores["test"],
        "eval_last": last["eval"], "test_last": last["test"],
        "total_params": total_params, "trainable_params": trainable_params,
        "retained_params": method.retained_params(model),
        "steps": state.step, "epochs": state.step / steps_per_epoch, "train_time_s": round(state.train_time_s, 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1), "split_protocol": run.task.split_protocol,
        "train_examples": len(data.train), "status": "completed",
    }
    logger.finish({f"final/{k}": v for k, v in chosen["eval"].items()})
    if not t.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    write_json_atomic(out / "metrics.json", metrics)  # last: its presence marks the run complete
    log.info("done: %s -> %s", metrics["eval"], out)
    return metrics


def build_optimizer(model, method, t, total_steps: int):
    """AdamW over the method's parameter groups, linear warmup then linear decay to 0."""
    optimizer = torch.optim.AdamW(method.param_groups(model, t.lr, t.weight_decay), lr=t.lr)
    return optimizer, get_linear_schedule_with_warmup(optimizer, math.ceil(t.warmup_ratio * total_steps), total_steps)


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
    method.after_optimizer_step(model, step)  # e.g. a proximal step, a mask update
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


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


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


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig):
    try:
        metrics = train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return metrics["eval"][metrics["selection_metric"]]  # what a Hydra sweeper optimises


if __name__ == "__main__":
    check_choices(sys.argv[1:])
    main()
