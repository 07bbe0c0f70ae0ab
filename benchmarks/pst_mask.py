"""The top-k mask on CPU: its selection (`kth_smallest`, numpy's introselect, vs `torch.kthvalue`) and its dtype.

1. The selection alone, on |randn| scores of minilm's map shapes at sparsity 0.5 and 0.9: median milliseconds of
   each, interleaved, and whether both return the same value.
2. The train step of PST and of magnitude pruning (sparsity 0.9 from step 0, scheduler none) on the fixed first
   batch of `--task` (CoLA's short sentences: the mask is a large share of the step there), built and stepped by
   train.py's code, once with `kth_smallest` and once with `torch.kthvalue` patched in: both builds start from the
   same seed and each step reseeds dropout, so their losses must agree exactly (`identical_losses`); the step
   ratio is side by side.
3. The same two steps with the training mask as 0/1 in the weight's dtype (`masked` multiplies; the code's) vs a
   bool mask (`masked` calls torch.where), patched in the same way (`*_step_mask_dtype`).

  SPARSE_PEFT_DATA=/work/shared/data python benchmarks/pst_mask.py --threads 1 --out benchmarks/results/pst_mask.json
"""
from __future__ import annotations

import torch

import sparse_peft.methods.pst as pst
from _common import compare_steps, emit, environment, median, run_config, step_args, time_interleaved, timed

SHAPES = [(384, 384), (1536, 384), (384, 1536)]  # minilm's q/k/v/attn_out, ffn_in, ffn_out
FAST = pst.kth_smallest
SELECTORS = {"kth_smallest": FAST, "torch_kthvalue": lambda flat, k: flat.kthvalue(k).values}
GOAL = 0.9  # kth_smallest / torch_kthvalue, PST step seconds
TOPK = pst.topk_mask
# the step's 0/1 mask in the weight's dtype (masked() multiplies) vs a bool mask (masked() uses torch.where)
MASKS = {"float_mask": {"topk_mask": TOPK},
         "bool_mask": {"topk_mask": lambda s, sparsity, dtype=None: TOPK(s, sparsity)}}
MASK_GOAL = 0.95  # float_mask / bool_mask, step seconds
METHODS = ("pst", "magnitude")


def selection(args) -> list[dict]:
    rows = []
    for shape in SHAPES:
        for sparsity in (0.5, 0.9):
            flat = torch.randn(shape).abs().flatten()
            k = int(flat.numel() * sparsity)
            times = time_interleaved({name: timed(lambda f=f: f(flat, k)) for name, f in SELECTORS.items()},
                                     steps=args.steps, warmup=2, block=5)
            ms = {name: median(ts) * 1e3 for name, ts in times.items()}
            rows.append({"shape": list(shape), "sparsity": sparsity, **{f"{n}_ms": round(v, 3) for n, v in ms.items()},
                         "ratio": ms["kth_smallest"] / ms["torch_kthvalue"],
                         "same_value": bool(SELECTORS["kth_smallest"](flat, k) == flat.kthvalue(k).values)})
    return rows


def step(method: str, args, variants: dict[str, dict], goal: float) -> dict:
    """The train step with each variant's functions patched into sparse_peft.methods.pst (the first variant is the
    code's own): the losses must agree exactly."""
    run = run_config([f"method={method}", "method.sparsity=0.9", "scheduler=none", f"task={args.task}"], args)
    own = {attr: getattr(pst, attr) for fns in variants.values() for attr in fns}

    def patch(name: str) -> None:
        for attr, fn in variants[name].items():
            setattr(pst, attr, fn)  # looked up at call time

    try:
        return compare_steps({name: run for name in variants}, args, goal, patch)[0]
    finally:
        for attr, fn in own.items():
            setattr(pst, attr, fn)


def main() -> None:
    args = step_args(__doc__.splitlines()[0])
    emit({"benchmark": "pst_mask", "model": "minilm", "task": args.task, "steps": args.steps, "warmup": args.warmup,
          "block": args.block, "selection": selection(args),
          **{f"{m}_step": step(m, args, {n: {"kth_smallest": f} for n, f in SELECTORS.items()}, GOAL) for m in METHODS},
          **{f"{m}_step_mask_dtype": step(m, args, MASKS, MASK_GOAL) for m in METHODS},
          "env": environment(args), "note": args.note}, args.out)


if __name__ == "__main__":
    main()
