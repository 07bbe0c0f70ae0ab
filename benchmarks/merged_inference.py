"""Inference cost of a compacted + merged SoRA model vs the base model it came from.

The SoRA model is either a finished run (--run-dir: its exported weights, via sparse_peft.export.load_run) or
minilm with SoRA r=8 on the six maps, random B and half of the gates zeroed (default). It is compacted to a peft
LoRA with per-module ranks (Sora.to_peft), merged (merge_and_unload) and timed against a freshly built base
model: forward passes in eval mode under torch.no_grad on the same RTE validation batches (batch 64, dynamic
padding, longest first), interleaved in blocks. Also checks that the merged logits equal the gated model's.

  SPARSE_PEFT_DATA=/work/shared/data python benchmarks/merged_inference.py --out benchmarks/results/merged_inference.json
"""
from __future__ import annotations

from pathlib import Path

import torch

from _common import (MODEL_INPUTS, add_timing_args, base_args, emit, environment, load_data, ratio_report, run_config, setup,
                     time_interleaved, timed)
from sparse_peft.tasks.loaders import eval_loader
from sparse_peft.methods import build_method
from sparse_peft.methods.sora import sora_modules
from sparse_peft.models import build_model

GOAL = 1.02


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, default=None, help="a finished SoRA run to compact (default: random)")
    p.add_argument("--batches", type=int, default=4, help="validation batches per timed call")
    add_timing_args(p, steps=20, warmup=2, block=2)
    args = p.parse_args()
    setup(args)

    run = run_config(["method=sora"], args)
    data, task, tok = load_data(run)
    if args.run_dir:
        from sparse_peft.export import load_run

        run, _, gated, method, _, _ = load_run(args.run_dir)
    else:
        torch.manual_seed(args.seed)
        method = build_method(run.method, run.model)
        gated = method.inject(build_model(run.model, task, tok))
        with torch.no_grad():
            for _, m in sora_modules(gated):
                m.lora_B.normal_(0, 0.02)
                m.lora_gate[torch.randperm(m.lora_gate.numel())[: m.lora_gate.numel() // 2]] = 0.0
    merged = method.to_peft(gated).merge_and_unload().eval()
    torch.manual_seed(args.seed)
    base = build_model(run.model, task, tok).eval()
    gated.eval()

    loader = eval_loader(data.eval_splits["validation"], data.collator, 64)
    batches = [{k: v for k, v in b.items() if k in MODEL_INPUTS and k != "labels"} for _, b in zip(range(args.batches), loader)]
    with torch.no_grad():
        max_diff = max((merged(**b).logits - gated(**b).logits).abs().max().item() for b in batches)

    def forward_all(model):
        @torch.no_grad()
        def call() -> None:
            for b in batches:
                model(**b)
        return timed(call)

    times = time_interleaved({"merged": forward_all(merged), "base": forward_all(base)}, args.steps, args.warmup,
                             args.block)
    emit({"benchmark": "merged_inference", "task": "glue/rte", "model": "minilm",
          "source": str(args.run_dir) if args.run_dir else "random gates, half zero",
          "retained_params": method.retained_params(gated), "kept_ranks": sum(method.ranks(gated).values()),
          "max_abs_logit_diff_merged_vs_gated": max_diff, "batches_per_call": len(batches),
          "tokens_per_call": sum(int(b["attention_mask"].sum()) for b in batches),
          "param_count": {"merged": sum(p.numel() for p in merged.parameters()),
                          "base": sum(p.numel() for p in base.parameters())},
          "steps": args.steps, **ratio_report(times, "merged", "base", GOAL), "env": environment(args),
          "note": args.note}, args.out)


if __name__ == "__main__":
    main()
