"""Evaluation throughput of the commonsense scoring modes on SmolLM2-135M: `loglik` vs `generate` (items/s).

Both score the same `--n` test items per task with the project's own code (load_tokenizer, the Commonsense task's
load / eval_loader / predict, build_model): `generate` greedy (or `--num-beams`), `--max-new-tokens` (reference
32), left-padded batches of `--batch-size`; `loglik` the label log-likelihoods (one forward per item when the
labels differ in their last token only). `--repeats` timed passes per mode, interleaved, after one untimed
warm-up batch each. Also reports each mode's accuracy and how often the two modes agree. The packaged model is
not fine-tuned on this format: its generations rarely contain a label and run the full `max_new_tokens`, so
`generate` here is its worst case (a tuned model stops at EOS after ~7 tokens).

  SPARSE_PEFT_DATA=/work/shared/data python benchmarks/commonsense_eval.py --out benchmarks/results/commonsense_eval.json
"""
from __future__ import annotations

import statistics
import time

import torch

from _common import base_args, emit, environment, run_config, setup
from sparse_peft.models import build_model, load_tokenizer
from sparse_peft.tasks import build_task
from sparse_peft.tasks.commonsense import EvalBatches


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--tasks", default="boolq,arc_c", help="comma-separated commonsense tasks")
    p.add_argument("--n", type=int, default=24, help="test items per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    setup(args)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    results, model, tokenizer = {}, None, None
    for name in args.tasks.split(","):
        run = run_config(["model=smollm2", f"task=commonsense/{name}", f"data.max_eval_samples={args.n}",
                          "data.max_train_samples=8", "task.val_set_size=1", f"task.num_beams={args.num_beams}",
                          f"task.max_new_tokens={args.max_new_tokens}"], args)
        if model is None:
            t0 = time.perf_counter()
            tokenizer = load_tokenizer(run.model)
            tok_s = time.perf_counter() - t0
        task = build_task(run.task, run.data)
        data = task.load(tokenizer)
        if model is None:
            t0 = time.perf_counter()
            model = build_model(run.model, task, tokenizer).to(device).eval()
            load_s = time.perf_counter() - t0
        items = data.eval_splits["test"].items
        answers = [it["answer"] for it in items]
        times, preds = {"loglik": [], "generate": []}, {}
        for mode in times:  # warm-up: one batch
            task.predict(model, EvalBatches(items[:args.batch_size], mode, args.batch_size), device)
        for r in range(args.repeats):
            for mode in (list(times) if r % 2 == 0 else list(times)[::-1]):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = task.predict(model, EvalBatches(items, mode, args.batch_size), device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t0)
                assert preds.setdefault(mode, out) == out, "predictions changed between passes"
        texts = task.generate_texts(model, EvalBatches(items[:2], "generate", args.batch_size), device)
        results[name] = {
            "items": len(items),
            **{mode: {"median_s": statistics.median(ts), "items_per_s": len(items) / statistics.median(ts),
                      "all_s": [round(t, 3) for t in ts],
                      "accuracy": sum(p == a for p, a in zip(preds[mode], answers)) / len(items),
                      "no_label_extracted": sum(p == "" for p in preds[mode])} for mode, ts in times.items()},
            "speedup_loglik_over_generate": statistics.median(times["generate"]) / statistics.median(times["loglik"]),
            "agreement": sum(a == b for a, b in zip(preds["loglik"], preds["generate"])) / len(items),
            "sample_generations": texts,
        }
    emit({"benchmark": "commonsense_eval", "model": "smollm2", "device": str(device),
          "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
          "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams,
          "repeats": args.repeats, "tokenizer_load_s": round(tok_s, 2), "model_load_s": round(load_s, 2),
          "dtype": str(next(model.parameters()).dtype), "tasks": results, "env": environment(args), "note": args.note},
         args.out)


if __name__ == "__main__":
    main()
