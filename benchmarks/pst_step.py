"""Per-step cost and memory of PST's train step vs full fine-tuning and vs LoRA on minilm (no fixed goal yet).

All three are built by train.py's own code (_common.build_ours) and stepped by the loop's body (_common.train_step):
PST (rank 8, score rank 8, sparsity 0.9 from step 0, scheduler none: the mask costs the same at any k > 0), full
fine-tuning, and LoRA r 8, the same six maps + the task head. Same fixed RTE batch of 32, same seed, train mode;
--warmup untimed steps each, then --steps timed steps each, interleaved in blocks of --block.

Memory, side by side in one process: after the timed steps, one more step of each variant runs under
torch.profiler (profile_memory) and the peak of the tensors alive during that step (parameters, gradients, AdamW
moments, activations, the method's temporaries) is read from its memory timeline (`step_peak_mb`); `persistent_mb`
adds up parameters and AdamW moments, which live across steps.

  SPARSE_PEFT_DATA=/work/shared/data python benchmarks/pst_step.py --out benchmarks/results/pst_step.json
"""
from __future__ import annotations


import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from _common import (add_timing_args, base_args, bootstrap_ratio_ci, build_ours, emit, environment,
                     first_train_batch, load_data, median, run_config, setup, time_train_steps)

VARIANTS = {"pst": ["method=pst", "method.sparsity=0.9", "method.rank=8", "method.score_rank=8"],
            "full": ["method=full"],
            "lora": ["method=lora", "method.lora_r=8"]}
MB = 2 ** 20


def step_peak_mb(step) -> float | None:
    """Peak MB of the tensors alive during one call of `step`, from the profiler's memory timeline (CPU)."""
    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return float(np.array(sizes).sum(1).max()) / MB


def persistent_mb(model, optimizer) -> float:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    return (params + moments) / MB


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    add_timing_args(p, steps=30, warmup=5, block=5)
    p.add_argument("--no-memory", action="store_true", help="skip the profiled memory step")
    args = p.parse_args()
    setup(args)

    runs = {name: run_config(overrides, args) for name, overrides in VARIANTS.items()}
    assert list(runs["pst"].method.target_modules) == list(runs["lora"].method.target_modules)
    data, task, tok = load_data(runs["lora"])
    batch = first_train_batch(data, runs["lora"].trainer.batch_size, args.seed)
    built = {name: build_ours(run, data, task, tok, args.seed) for name, run in runs.items()}
    times, losses, steppers = time_train_steps(built, runs, batch, args)
    report = {}
    for name, (model, method, optimizer, _) in built.items():
        report[name] = {"median_s": median(times[name]), "all_s": [round(t, 4) for t in times[name]],
                        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                        "total_params": sum(p.numel() for p in model.parameters()),
                        "retained_params": method.retained_params(model),
                        "persistent_mb": round(persistent_mb(model, optimizer), 1),
                        "first_loss": losses[name][0], "last_loss": losses[name][-1]}
        report[name]["trainable_percent"] = 100 * report[name]["trainable_params"] / report[name]["total_params"]
    if not args.no_memory:
        for name in runs:
            peak = step_peak_mb(steppers[name])
            report[name]["step_peak_mb"] = None if peak is None else round(peak, 1)
    ratios = {}
    for den in ("full", "lora"):
        lo, hi = bootstrap_ratio_ci(times["pst"], times[den])
        ratios[f"pst/{den}"] = {"median_ratio": median(times["pst"]) / median(times[den]), "ci95_bootstrap": [lo, hi]}
        if not args.no_memory and report[den].get("step_peak_mb"):
            ratios[f"pst/{den}"]["step_peak_mb_ratio"] = report["pst"]["step_peak_mb"] / report[den]["step_peak_mb"]
    emit({"benchmark": "pst_step", "task": "glue/rte", "model": "minilm", "goal": None,
          "batch_shape": list(batch["input_ids"].shape), "steps": args.steps, "warmup": args.warmup,
          "block": args.block, **report, "ratios": ratios, "env": environment(args), "note": args.note}, args.out)


if __name__ == "__main__":
    main()
