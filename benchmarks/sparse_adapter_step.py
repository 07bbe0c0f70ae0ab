"""Per-step cost of the masked (sparse) adapter's training step vs the dense adapter's at the same bottleneck.

Both are built by train.py's own code (_common.build_ours: build_model, the method's apply, method.param_groups
AdamW, the warmup/decay schedule) and stepped by train.py's loop body (_common.train_step). The sparse adapter is
pruned first (its `on_train_start` on `method.prune_batches` training batches, SNIP at 40% by default) and then adds,
per step: W * mask in the forward of every adapter matrix and the mask re-applied after the optimizer step. Same
fixed RTE batch of 32 (first of a seeded permutation, dynamic padding, max_length 128), same seed, train mode;
--warmup untimed steps each, then --steps timed steps each, interleaved in blocks of --block.

  SPARSE_PEFT_DATA=/work/shared/data python benchmarks/sparse_adapter_step.py --out benchmarks/results/sparse_adapter_step.json
"""
from __future__ import annotations

import time

from _common import (add_timing_args, base_args, build_ours, emit, environment, first_train_batch, load_data,
                     ratio_report, run_config, setup, step_summary, time_train_steps)

from sparse_peft.loop import start_batches

GOAL = 1.10


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    add_timing_args(p, steps=30, warmup=5, block=5)
    p.add_argument("--adapter-size", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.4, help="fraction of adapter weights removed")
    p.add_argument("--pruner", default="snip")
    p.add_argument("--prune-batches", type=int, default=2, help="batches the pruning scores use (not timed)")
    args = p.parse_args()
    setup(args)

    size = f"method.adapter_size={args.adapter_size}"
    runs = {"sparse_adapter": run_config(["method=sparse_adapter", size, f"method.sparsity={args.sparsity}",
                                          f"method.pruner={args.pruner}", f"method.prune_batches={args.prune_batches}"], args),
            "adapter": run_config(["method=adapter", size], args)}
    data, task, tok = load_data(runs["adapter"])
    batch = first_train_batch(data, runs["adapter"].trainer.batch_size, args.seed)

    built = {name: build_ours(run, data, task, tok, args.seed) for name, run in runs.items()}
    model, method, _, _ = built["sparse_adapter"]
    t0 = time.perf_counter()
    method.on_train_start(model, start_batches(task, data, runs["sparse_adapter"], method.train_start_batches, "cpu"))
    prune_s = time.perf_counter() - t0
    times, losses, _ = time_train_steps(built, runs, batch, args)
    report = ratio_report(times, "sparse_adapter", "adapter", GOAL)
    for name, (model, method, _, _) in built.items():
        report[name].update(step_summary(model, method, losses[name]))
    weights, masks = built["sparse_adapter"][1].weights_and_masks()
    report["sparse_adapter"].update(
        prune_s=round(prune_s, 3), pruned_still_zero=all(bool((weights[n][m == 0] == 0).all()) for n, m in masks.items()),
        density=sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()))
    emit({"benchmark": "sparse_adapter_step", "task": "glue/rte", "model": "minilm", "adapter_size": args.adapter_size,
          "sparsity": args.sparsity, "pruner": args.pruner, "prune_batches": args.prune_batches,
          "batch_shape": list(batch["input_ids"].shape), "steps": args.steps, "warmup": args.warmup,
          "block": args.block, **report, "env": environment(args), "note": args.note}, args.out)


if __name__ == "__main__":
    main()
