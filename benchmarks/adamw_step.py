"""The train step with torch's fused AdamW (`trainer.fused_adamw=true`, the default) vs its per-tensor loop (false,
torch's default on CPU and what runs made before commit a55b468 used), for full fine-tuning, magnitude pruning and
PST (sparsity 0.9 from step 0, scheduler none) at the pst_glue experiment's preset lr and weight decay, on the fixed
first batch of `--task` (CoLA's short sentences: the per-parameter update is a large share of the step there). Each
pair is built from one seed and stepped by train.py's code with dropout reseeded per step, interleaved; besides the
step ratio it reports how far the two runs drift apart (largest loss and parameter differences after the steps).
  SPARSE_PEFT_DATA=/work/shared/data python benchmarks/adamw_step.py --threads 1 \
      --out benchmarks/results/adamw_step.json
"""
from __future__ import annotations

from _common import compare_steps, emit, environment, run_config, step_args

METHODS = {"full": ["trainer.lr=5e-5", "trainer.weight_decay=0.01"],  # configs/experiment/pst_glue.yaml's presets
           "magnitude": ["method.sparsity=0.9", "trainer.lr=5e-5", "trainer.weight_decay=0.01"],
           "pst": ["method.sparsity=0.9", "trainer.lr=1e-4"]}
GOALS = {"full": 0.9, "magnitude": 0.9, "pst": 1.02}  # fused / loop step seconds; PST trains 4%: no slowdown


def compare(method: str, args) -> dict:
    runs = {kind: run_config([f"method={method}", f"task={args.task}", "scheduler=none", *METHODS[method],
                              f"trainer.fused_adamw={kind == 'fused'}"], args) for kind in ("fused", "loop")}
    report, built = compare_steps(runs, args, GOALS[method])
    (a, _, fused, _), (b, _, loop, _) = built["fused"], built["loop"]
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    return {**report, "lr": runs["fused"].trainer.lr,
            "trainable_params": sum(p.numel() for p in a.parameters() if p.requires_grad),
            "max_parameter_difference": max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))}


def main() -> None:
    args = step_args(__doc__.splitlines()[0])
    emit({"benchmark": "adamw_step", "model": "minilm", "task": args.task, "steps": args.steps, "warmup": args.warmup,
          "block": args.block, **{m: compare(m, args) for m in METHODS}, "env": environment(args), "note": args.note},
         args.out)


if __name__ == "__main__":
    main()
