"""Shared helpers for the benchmarks: compose the project's Hydra config and build a run with the functions
the training loop uses (sparse_peft/loop.py: build_optimizer, forward_loss, optimizer_step), so the timed step is
the loop's."""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from sparse_peft.config import load_run_config
from sparse_peft.loop import build_optimizer, forward_loss, optimizer_step
from sparse_peft.methods import build_method
from sparse_peft.models import build_model, load_tokenizer
from sparse_peft.schedulers import plan
from sparse_peft.tasks import build_task
from sparse_peft.tasks.loaders import make_loader  # noqa: F401  (also used by padding.py)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")  # GLUE's (sparse_peft.tasks.base.Task)

REPO = Path(__file__).resolve().parents[1]
BACKGROUND_NOTE = ("measured on a 2-core CPU box while a long training job ran in the background at nice 10; "
                   "absolute seconds are inflated and noisy, ratios are taken side by side in one process")


def base_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-root", default=None, help="GLUE root (default: $SPARSE_PEFT_DATA)")
    p.add_argument("--note", default=BACKGROUND_NOTE, help="free text stored in the JSON")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p


def setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def run_config(overrides: list[str], args):
    """`load_run_config` on `configs/config.yaml` composed with `overrides` (no Hydra run dir, no wandb)."""
    base = ["model=minilm", "method=lora", "task=glue/rte", "logger.wandb.mode=disabled",
            f"trainer.seed={args.seed}", "trainer.progress_bar=false"]
    if args.data_root:
        base.append(f"data.root={args.data_root}")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=base + overrides)
    return load_run_config(cfg)


def build_ours(run, data, task, tokenizer, seed: int):
    """Model, method, optimizer and scheduler exactly as train.py builds them (device: CPU)."""
    torch.manual_seed(seed)
    model = build_model(run.model, task, tokenizer)
    steps = plan(run, len(data.train))
    method = build_method(run.method, run.model, steps.total_steps, task)
    model = method.inject(model)
    optimizer, scheduler = build_optimizer(model, method, run, steps)
    model.train()
    return model, method, optimizer, scheduler


def load_data(run):
    """(TaskData, task, tokenizer) as train.py gets them."""
    tokenizer = load_tokenizer(run.model)
    task = build_task(run.task, run.data)
    return task.load(tokenizer), task, tokenizer


def train_step(model, method, optimizer, scheduler, batch, run, step: int) -> float:
    """One optimisation step as train.py's loop runs it (grad_accum=1, CPU, no tqdm)."""
    batch = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    loss = forward_loss(model, method, batch, step)
    loss.backward()
    value = loss.item()  # train.py accumulates loss.item() for its log
    optimizer_step(model, method, optimizer, scheduler, run.trainer.max_grad_norm, step)
    return value


def time_train_steps(built: dict, runs: dict, batch: dict, args, before=None) -> tuple[dict, dict, dict]:
    """Seconds of each built variant's train step on the same batch, interleaved (`time_interleaved`), the losses
    of every step, and each variant's step function (one more step, returning its seconds).
    `built[name]` = (model, method, optimizer, scheduler); `before(name, step)`, if given, runs untimed before
    each step (to patch in the variant's code or reseed)."""
    losses = {name: [] for name in built}
    counters = {name: 0 for name in built}

    def stepper(name):
        model, method, optimizer, scheduler = built[name]

        def step() -> float:
            if before is not None:
                before(name, counters[name])
            t0 = time.perf_counter()
            losses[name].append(train_step(model, method, optimizer, scheduler, batch, runs[name], counters[name]))
            counters[name] += 1
            return time.perf_counter() - t0
        return step

    steppers = {name: stepper(name) for name in built}
    return time_interleaved(steppers, args.steps, args.warmup, args.block), losses, steppers


def compare_steps(runs: dict, args, goal: float, patch=None) -> tuple[dict, dict]:
    """Two variants' train step (`runs`: name -> run config; the first is the code's own) on the fixed first batch
    of the first run's task, each built from `args.seed` and stepped by train.py's code with dropout reseeded per
    step, interleaved; `patch(name)`, if given, runs untimed before each step of `name`. Returns first / second
    (`ratio_report` against `goal`) with how far the two runs' losses drift apart, and the built variants."""
    first = next(iter(runs.values()))
    data, task, tok = load_data(first)
    batch = first_train_batch(data, first.trainer.batch_size, args.seed)
    built = {name: build_ours(run, data, task, tok, args.seed) for name, run in runs.items()}

    def before(name: str, step: int) -> None:
        if patch is not None:
            patch(name)
        torch.manual_seed(step)  # the same dropout draws for both at each step

    times, losses, _ = time_train_steps(built, runs, batch, args, before)
    a, b = runs
    return {**ratio_report(times, a, b, goal), "batch_shape": list(batch["input_ids"].shape),
            "identical_losses": losses[a] == losses[b],
            "max_loss_difference": max(abs(x - y) for x, y in zip(losses[a], losses[b]))}, built


def step_args(description: str):
    """The parsed common options of a step comparison (timing, `--task`, CoLA by default: short sentences, where the
    per-weight work is a large share of the step), applied (threads, seed)."""
    p = base_args(description)
    add_timing_args(p, steps=20, warmup=3, block=5)
    p.add_argument("--task", default="glue/cola")
    args = p.parse_args()
    setup(args)
    return args


def step_summary(model, method, losses: list[float]) -> dict:
    """Parameter counts and first/last loss of a timed variant."""
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "retained_params_after": method.retained_params(model), "first_loss": losses[0], "last_loss": losses[-1]}


def timed(fn):
    """A step for `time_interleaved`: call `fn()`, return its seconds."""
    def call() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return call


def time_interleaved(fns: dict, steps: int, warmup: int, block: int) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument `fns[name]` (which returns its own timed seconds): `warmup` untimed
    calls each, then `steps` timed calls each in blocks of `block`, alternating which variant goes first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names, times = list(fns), {name: [] for name in fns}
    for r in range(-(-steps // block)):
        for name in (names if r % 2 == 0 else names[::-1]):
            n = min(block, steps - len(times[name]))
            times[name] += [fns[name]() for _ in range(n)]
    return times


def ratio_report(times: dict[str, list[float]], num: str, den: str, goal: float) -> dict:
    """median(num) / median(den) against `goal` (lower is better), with a bootstrap interval and a verdict."""
    ratio = median(times[num]) / median(times[den])
    lo, hi = bootstrap_ratio_ci(times[num], times[den])
    verdict = "pass" if hi <= goal else "fail" if lo > goal else "inconclusive (interval straddles the goal)"
    summary = {name: {"median_s": median(ts), "mean_s": statistics.mean(ts), "all_s": [round(t, 4) for t in ts]}
               for name, ts in times.items()}
    return {**summary, "ratio": ratio, "ratio_of_means": statistics.mean(times[num]) / statistics.mean(times[den]),
            "goal": f"{num} / {den} (median seconds) <= {goal}", "pass": bool(ratio <= goal),
            "ratio_ci95_bootstrap": [lo, hi], "verdict": verdict}


def add_timing_args(p: argparse.ArgumentParser, steps: int, warmup: int, block: int) -> None:
    p.add_argument("--steps", type=int, default=steps, help="timed calls per variant")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed calls per variant")
    p.add_argument("--block", type=int, default=block, help="consecutive calls of one variant between switches")


def first_train_batch(data, batch_size: int, seed: int) -> dict:
    """The first batch of a seeded permutation of the training set (dynamic padding), model inputs only."""
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed * 1000)).tolist()
    batch = next(iter(make_loader(data.train, data.collator, batch_size, sampler=order)))
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def bootstrap_ratio_ci(a, b, n: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of median(a) / median(b), resampling a and b independently."""
    rng = random.Random(seed)
    rs = sorted(median(rng.choices(a, k=len(a))) / median(rng.choices(b, k=len(b))) for _ in range(n))
    return [rs[int(0.025 * n)], rs[int(0.975 * n) - 1]]


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def environment(args) -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0], "seed": args.seed}
