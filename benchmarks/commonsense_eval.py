"""Evaluation throughput of the commonsense scoring modes on SmolLM2-135M: `loglik` vs `generate` (items/s).

Both score the same test items with the project's own code (the Commonsense task's load / eval_loader / predict):
`generate` greedy (or `--num-beams`), `--max-new-tokens` (reference 32), left-padded batches of `--batch-size`;
`loglik` the label log-likelihoods (one forward per item when the labels differ in their last token only).
`--repeats` timed passes per mode, interleaved, after one untimed warm-up batch each. Reports each mode's accuracy
per task (and their mean) and, with both modes, how often they agree.

The model is the packaged SmolLM2 as it ships (zero-shot; `--n` seeded test items per task, the same items a
training run with `data.max_eval_samples=<n>` scores), or with `--run DIR` a finished run's trained model on that
run's own test subset (`--n` is then ignored). The packaged model is not fine-tuned on the answer format: its
generations rarely contain a label and run the full `--max-new-tokens`, so zero-shot `generate` is its worst case.

  SPARSE_PEFT_DATA=/work/shared/data python benchmarks/commonsense_eval.py --out benchmarks/results/commonsense_eval.json
  python benchmarks/commonsense_eval.py --run RUN_DIR --tasks arc_e,obqa --repeats 1   # agreement after training
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from _common import base_args, emit, environment, load_data, run_config, setup
from sparse_peft.export import load_run
from sparse_peft.models import build_model
from sparse_peft.tasks.commonsense import EvalBatches


def load(args):
    """(test items per task, model in eval mode, task, load seconds)."""
    t0 = time.perf_counter()
    if args.run:
        _, task, model, _, tokenizer, _ = load_run(Path(args.run))
        if task.name != "all":
            raise SystemExit(f"error: {args.run} is a commonsense/{task.name} run; --run needs a commonsense/all run")
        tests = task.load(tokenizer).eval_splits["test"]
    else:
        run = run_config(["model=smollm2", "task=commonsense/all", f"data.max_eval_samples={args.n}"], args)
        data, task, tokenizer = load_data(run)
        tests = data.eval_splits["test"]
        model = build_model(run.model, task, tokenizer)
    for key in ("num_beams", "max_new_tokens"):  # unset: the run's (zero-shot: the task config's defaults)
        if getattr(args, key) is not None:
            setattr(task.cfg, key, getattr(args, key))
    wanted = args.tasks.split(",") if args.tasks else sorted(tests)
    missing = [t for t in wanted if t not in tests]
    if missing:
        raise SystemExit(f"error: no test set for {missing}; choose from {sorted(tests)}")
    return {t: tests[t].items for t in wanted}, model.eval(), task, time.perf_counter() - t0


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--tasks", default=None, help="comma-separated commonsense tasks (default: every test set)")
    p.add_argument("--n", type=int, default=24, help="test items per task (zero-shot)")
    p.add_argument("--run", default=None, help="a finished commonsense/all run dir: score its trained model")
    p.add_argument("--modes", default="loglik,generate", help="comma-separated: loglik, generate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's (zero-shot: 32)")
    p.add_argument("--num-beams", type=int, default=None, help="default: the run's (zero-shot: 1, greedy)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    setup(args)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    modes = args.modes.split(",")
    tasks, model, task, load_s = load(args)
    model.to(device)

    results = {}
    for name, items in tasks.items():
        answers = [it["answer"] for it in items]
        times, preds = {m: [] for m in modes}, {}
        for mode in modes:  # warm-up: one batch
            task.predict(model, EvalBatches(items[:args.batch_size], mode, args.batch_size), device)
        for r in range(args.repeats):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = task.predict(model, EvalBatches(items, mode, args.batch_size), device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t0)
                assert preds.setdefault(mode, out) == out, "predictions changed between passes"
        results[name] = {
            "items": len(items),
            **{mode: {"median_s": statistics.median(ts), "items_per_s": len(items) / statistics.median(ts),
                      "all_s": [round(t, 3) for t in ts],
                      "accuracy": sum(p == a for p, a in zip(preds[mode], answers)) / len(items),
                      "no_label_extracted": sum(p == "" for p in preds[mode])} for mode, ts in times.items()}}
        if len(modes) == 2:
            results[name].update(
                speedup_loglik_over_generate=statistics.median(times["generate"]) / statistics.median(times["loglik"]),
                agreement=sum(a == b for a, b in zip(preds["loglik"], preds["generate"])) / len(items))
        if "generate" in modes:
            results[name]["sample_generations"] = task.generate_texts(
                model, EvalBatches(items[:2], "generate", args.batch_size), device)
    mean = {m: sum(r[m]["accuracy"] for r in results.values()) / len(results) for m in modes}
    emit({"benchmark": "commonsense_eval", "model": "smollm2", "run": args.run, "device": str(device),
          "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
          "batch_size": args.batch_size, "max_new_tokens": task.cfg.max_new_tokens, "num_beams": task.cfg.num_beams,
          "repeats": args.repeats, "load_s": round(load_s, 2), "dtype": str(next(model.parameters()).dtype),
          "mean_accuracy": mean, "tasks": results, "env": environment(args), "note": args.note}, args.out)


if __name__ == "__main__":
    main()
