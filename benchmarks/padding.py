"""Epoch time on RTE train: dynamic padding vs padding every example to max_length (the SoRA scripts' setting).

Both variants are the real training setup (model=minilm, method=lora r=8 on the six default maps, batch 32,
AdamW + linear schedule + clipping; each step is train.py's loop body, see _common.train_step), built with the
project's own load_run_config / load_tokenizer / build_task_data / build_model / build_method / make_loader:

  dynamic: data.pad_to_max_length=false data.max_length=320   (pad each batch to its longest example)
  padded:  data.pad_to_max_length=true  data.max_length=320   (every batch is 32 x 320 tokens)

Both variants use the same example order: epoch 0 of train.py (seeded seed*1000; length-grouped when this
checkout's train.py has `data.group_by_length` and it is on), or with `--order random` a plain seeded
permutation. A full epoch at 320 tokens takes many minutes on 2 CPUs, so by default `--batches` batches spread
evenly over the epoch are timed, interleaved (dynamic/padded, alternating which goes first) after `--warmup`
batches each, and the epoch time is extrapolated as mean sec/batch x batches per epoch; `--full-epoch` times
every batch. Collation is not in the step times (reported separately from one pass over each epoch loader,
which also gives the mean tokens per batch over the whole epoch). ratio = padded / dynamic; goal >= 3.

  SPARSE_PEFT_DATA=/work/shared/data python benchmarks/padding.py --out benchmarks/results/padding.json
  SPARSE_PEFT_DATA=/work/shared/data python benchmarks/padding.py --order random --out benchmarks/results/padding_random.json
  SPARSE_PEFT_DATA=/work/shared/data python benchmarks/padding.py --full-epoch --threads 2
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from _common import (base_args, build_ours, emit, environment, load_data, make_loader, median, run_config, setup,
                     train_step)

GOAL = 3.0
try:  # train.py's epoch order (length-grouped when data.group_by_length), where this checkout has it
    from sparse_peft.tasks.loaders import lengths, train_order
except ImportError:
    train_order = None


def epoch_order(run, data, mode: str) -> tuple[list[int], str]:
    """Epoch 0's example order, seeded as in train.py (seed * 1000 + epoch)."""
    seed = run.trainer.seed * 1000
    if mode == "train" and train_order is not None:
        grouped = run.data.group_by_length
        return (train_order(lengths(data.train), run.trainer.batch_size, seed, grouped),
                "length-grouped (train.py)" if grouped else "random permutation (train.py)")
    return torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed)).tolist(), "random permutation"


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=12, help="batches timed per variant (ignored with --full-epoch)")
    p.add_argument("--full-epoch", action="store_true", help="time every batch of one epoch")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up batches per variant")
    p.add_argument("--repeats", type=int, default=1, help="time each batch this many times, keep the median")
    p.add_argument("--order", choices=["train", "random"], default="train",
                   help="train: the order train.py uses now; random: a seeded permutation for both")
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    setup(args)

    common = [f"data.max_length={args.max_length}", f"trainer.batch_size={args.batch_size}"]
    variants = {"dynamic": ["data.pad_to_max_length=false"], "padded": ["data.pad_to_max_length=true"]}
    state, batches, loader_stats, order = {}, {}, {}, None
    for name, extra in variants.items():  # dynamic first: its lengths give the order both variants use
        run = run_config(common + extra, args)
        data, task, tok = load_data(run)
        if order is None:
            order, order_kind = epoch_order(run, data, args.order)
        t0 = time.perf_counter()
        batches[name] = list(make_loader(data.train, data.collator, run.trainer.batch_size, sampler=order,
                                         num_workers=run.data.num_workers))
        collate_s = time.perf_counter() - t0
        loader_stats[name] = {"examples": len(data.train), "collate_s_per_batch": collate_s / len(batches[name]),
                              "epoch_mean_tokens_per_batch":
                                  statistics.mean(b["input_ids"].numel() for b in batches[name]),
                              "epoch_mean_real_tokens_per_batch":
                                  statistics.mean(int(b["attention_mask"].sum()) for b in batches[name])}
        state[name] = (run, *build_ours(run, data, task, tok, args.seed))
    assert loader_stats["dynamic"]["examples"] == loader_stats["padded"]["examples"]
    per_epoch = len(batches["dynamic"])
    measured = per_epoch if args.full_epoch else min(args.batches, per_epoch)
    # Evenly spread over the epoch: a length-grouped order puts its longest batch first.
    picked = [i * per_epoch // measured for i in range(measured)]

    steps = {name: 0 for name in variants}

    def step(name: str, i: int) -> float:
        run, model, method, optimizer, scheduler = state[name]
        t0 = time.perf_counter()
        train_step(model, method, optimizer, scheduler, batches[name][i], run, steps[name])
        steps[name] += 1
        return time.perf_counter() - t0

    for i in range(args.warmup):
        for name in variants:
            step(name, picked[i % measured])
    times = {name: [] for name in variants}
    for k, i in enumerate(picked):
        names = list(variants) if k % 2 == 0 else list(variants)[::-1]  # alternate who goes first
        for name in names:
            times[name].append(median([step(name, i) for _ in range(args.repeats)]))

    out = {}
    for name in variants:
        ts, bs = times[name], [batches[name][i] for i in picked]
        out[name] = {"overrides": common + variants[name], "sec_per_batch_median": median(ts),
                     "sec_per_batch_mean": statistics.mean(ts), "sec_per_batch_all": [round(t, 4) for t in ts],
                     "epoch_seconds": sum(ts) if args.full_epoch else statistics.mean(ts) * per_epoch,
                     "mean_tokens_per_batch": statistics.mean(b["input_ids"].numel() for b in bs),
                     "mean_real_tokens_per_batch": statistics.mean(int(b["attention_mask"].sum()) for b in bs),
                     **loader_stats[name]}
    ratio = out["padded"]["epoch_seconds"] / out["dynamic"]["epoch_seconds"]
    result = {
        "benchmark": "padding", "task": "glue/rte", "model": "minilm", "method": "lora r=8 (six maps)",
        "batch_size": args.batch_size, "max_length": args.max_length,
        "mode": "full_epoch" if args.full_epoch else "extrapolated",
        "order": order_kind, "measured_batches": measured, "measured_batch_indices": picked,
        "batches_per_epoch": per_epoch, "warmup_batches": args.warmup,
        "repeats": args.repeats,
        "epoch_seconds_basis": "sum over the epoch" if args.full_epoch else "mean sec/batch x batches_per_epoch",
        "dynamic": out["dynamic"], "padded": out["padded"],
        "ratio": ratio, "ratio_of_median_sec_per_batch":
            out["padded"]["sec_per_batch_median"] / out["dynamic"]["sec_per_batch_median"],
        "token_ratio_epoch":
            out["padded"]["epoch_mean_tokens_per_batch"] / out["dynamic"]["epoch_mean_tokens_per_batch"],
        "goal": f"ratio (padded/dynamic epoch seconds) >= {GOAL}", "pass": bool(ratio >= GOAL),
        "env": environment(args), "note": args.note,
    }
    if not math.isfinite(ratio):
        result["pass"] = False
    emit(result, args.out)


if __name__ == "__main__":
    main()
