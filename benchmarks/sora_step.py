"""Per-step cost of SoRA's training step vs our LoRA step at the same rank and targets.

Both are built by train.py's own code (_common.build_ours: build_model, the method's apply, method.param_groups
AdamW, the warmup/decay schedule) and stepped by train.py's loop body (_common.train_step). SoRA adds: gated B
(B * g per forward), the L1 term on the gates, their own AdamW group and the proximal soft-threshold after each
step. Same fixed RTE batch of 32 (first of a seeded permutation, dynamic padding, max_length 128), same seed, train
mode; --warmup untimed steps each, then --steps timed steps each, interleaved in blocks of --block.

  SPARSE_PEFT_DATA=/work/shared/data python benchmarks/sora_step.py --out benchmarks/results/sora_step.json
"""
from __future__ import annotations



from _common import (add_timing_args, base_args, build_ours, emit, environment, first_train_batch, load_data,
                     ratio_report, run_config, setup, step_summary, time_train_steps)

GOAL = 1.05


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    add_timing_args(p, steps=30, warmup=5, block=5)
    args = p.parse_args()
    setup(args)

    runs = {name: run_config([f"method={name}", "method.lora_r=8"], args) for name in ("sora", "lora")}
    assert runs["sora"].method.target_modules == runs["lora"].method.target_modules
    data, task, tok = load_data(runs["lora"])
    batch = first_train_batch(data, runs["lora"].trainer.batch_size, args.seed)

    built = {name: build_ours(run, data, task, tok, args.seed) for name, run in runs.items()}
    times, losses, _ = time_train_steps(built, runs, batch, args)
    report = ratio_report(times, "sora", "lora", GOAL)
    for name, (model, method, _, _) in built.items():
        report[name].update(step_summary(model, method, losses[name]))
    emit({"benchmark": "sora_step", "task": "glue/rte", "model": "minilm", "lora_r": 8,
          "batch_shape": list(batch["input_ids"].shape), "steps": args.steps, "warmup": args.warmup,
          "block": args.block, **report, "env": environment(args), "note": args.note}, args.out)


if __name__ == "__main__":
    main()
