"""Peak memory and step time of IST vs its base method (same model, batch, sequence length and targets).

Both are built by train.py's own code (_common.build_ours) and stepped as sparse_peft/loop.py steps them:
`method.on_step_begin` (IST: the importance update every `update_interval` steps, then the layer sampling), the
loop's forward_loss, backward, optimizer_step. IST's importance batches come from the loop's own `draw_batch`.
Time: --warmup untimed steps each, then --steps timed steps each, interleaved in blocks of --block; IST's timed steps
include its importance updates (the amortised cost is the ratio of means). Memory: --mem-steps further steps each,
one variant at a time; see `memory.how` in the JSON. Goals (issue 15): memory <= 0.75x, step time <= 0.85x.

  SPARSE_PEFT_DATA=/work/shared/data python benchmarks/ist_step.py --model minilm --task glue/rte \
      --out benchmarks/results/ist_step.json
  python benchmarks/ist_step.py --model smollm2 --task commonsense/all --batch-size 16 --max-length 256 \
      --base-key lora_r=32 --base-key lora_alpha=64 --device cuda --out benchmarks/results/ist_step_smollm2.json
"""
from __future__ import annotations

import statistics
import time
from functools import partial

import torch

from _common import (add_timing_args, base_args, build_ours, emit, environment, first_train_batch, load_data,
                     ratio_report, run_config, setup, time_interleaved)
from sparse_peft.loop import draw_batch, forward_loss, optimizer_step

MEMORY_GOAL, TIME_GOAL = 0.75, 0.85
HOW = {"cuda": "torch.cuda.max_memory_allocated during the step minus memory_allocated before it (activations, "
               "gradients, temporaries), plus the variant's resident bytes (its parameters and AdamW state)",
       "cpu": "bytes of the non-parameter tensors autograd saved for backward (unique storages, "
              "torch.autograd.graph.saved_tensors_hooks; with `recompute_frozen` also the checkpointed blocks' inputs) "
              "plus gradient buffers after backward, plus the variant's resident bytes (its parameters and AdamW "
              "state); temporaries are not counted"}


def resident_bytes(model, optimizer) -> int:
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *state])


def make_step(model, method, optimizer, scheduler, batch, run, device, counter: list):
    cuda = device.type == "cuda"

    def step(measure: bool = False):
        """One loop step; seconds, or with `measure` the bytes the step needed beyond what was resident."""
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        method.on_step_begin(model, counter[0])
        saved, grads = {}, 0
        if measure and not cuda:
            params = {p.data_ptr() for p in model.parameters()}

            def pack(t):
                if t.data_ptr() not in params:
                    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            def keep_input(module, args, kwargs):  # a checkpointed block keeps its input outside saved tensors
                pack(args[0] if args else kwargs["hidden_states"])
            rerun = [b.register_forward_pre_hook(keep_input, with_kwargs=True)
                     for b in getattr(method, "blocks", {}).values() if b.gradient_checkpointing]
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = forward_loss(model, method, batch, counter[0])
            for h in rerun:
                h.remove()
        else:
            loss = forward_loss(model, method, batch, counter[0])
        loss.backward()
        if measure and not cuda:
            grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        optimizer_step(model, method, optimizer, scheduler, run.trainer.max_grad_norm, counter[0], loss.item())
        if cuda:
            torch.cuda.synchronize()
        counter[0] += 1
        if measure:
            return torch.cuda.max_memory_allocated() - before if cuda else sum(saved.values()) + grads
        return time.perf_counter() - t0
    return step


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="glue/rte")
    p.add_argument("--base", default="lora", help="IST's base method, and the method it is compared with")
    p.add_argument("--base-key", action="append", default=[], metavar="KEY=VALUE",
                   help="a key of the base method, set on both (e.g. lora_r=32)")
    p.add_argument("--ist-key", action="append", default=[], metavar="KEY=VALUE", help="an IST key (e.g. n_update=4)")
    p.add_argument("--batch-size", type=int, default=None, help="default: trainer.batch_size")
    p.add_argument("--max-length", type=int, default=None, help="default: data.max_length")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--mem-steps", type=int, default=10, help="measured steps per variant for memory")
    add_timing_args(p, steps=20, warmup=5, block=5)
    args = p.parse_args()
    setup(args)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)

    common = [f"model={args.model}", f"task={args.task}"]
    common += [f"trainer.batch_size={args.batch_size}"] if args.batch_size else []
    common += [f"data.max_length={args.max_length}"] if args.max_length else []
    runs = {"ist": run_config([*common, "method=ist", f"method.base={args.base}",
                               *[f"+method.inner.{kv}" for kv in args.base_key],
                               *[f"method.{kv}" for kv in args.ist_key]], args),
            "base": run_config([*common, f"method={args.base}", *[f"method.{kv}" for kv in args.base_key]], args)}
    inner = runs["ist"].method.inner_config()
    for key in ("lora_r", "target_modules", "adapter_size"):  # same adapter, like for like
        assert getattr(inner, key, None) == getattr(runs["base"].method, key, None), key
    data, task, tok = load_data(runs["base"])
    batch = {k: v.to(device) for k, v in first_train_batch(data, runs["base"].trainer.batch_size, args.seed).items()}

    built, steps = {}, {}
    for name, run in runs.items():
        model, method, optimizer, scheduler = build_ours(run, data, task, tok, args.seed)
        model.to(device)
        method.draw_batch = partial(draw_batch, task, data, run, device)
        built[name] = (model, method, optimizer)
        steps[name] = make_step(model, method, optimizer, scheduler, batch, run, device, [0])

    times = time_interleaved(steps, args.steps, args.warmup, args.block)
    report = ratio_report(times, "ist", "base", TIME_GOAL)
    amortised = report["ratio_of_means"]
    report.update(amortised_ratio=amortised, amortised_pass=bool(amortised <= TIME_GOAL),
                  goal=f"ist / base, median and mean (amortised over importance updates) seconds <= {TIME_GOAL}")

    memory = {"how": HOW[device.type], "goal": f"ist / base peak bytes <= {MEMORY_GOAL}"}
    for name, (model, method, optimizer) in built.items():  # one variant at a time
        per_step, lowest = [], []
        for _ in range(args.mem_steps):
            per_step.append(steps[name](measure=True))
            if name == "ist":  # the saving depends on how deep backward goes: the lowest trained block
                lowest.append(method.layers.index(method.active[0]))
        resident = resident_bytes(model, optimizer)
        memory[name] = {"resident_bytes": resident, "step_bytes": per_step, "step_bytes_max": max(per_step),
                        "step_bytes_mean": statistics.mean(per_step), "peak_bytes": resident + max(per_step),
                        "params_with_grad_last_step": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if name == "ist":
            memory[name].update(n_update=method.n_update, layers=len(method.layers), lowest_active=lowest,
                                last_scores=method.scores.tolist())
        if device.type == "cuda":
            memory[name]["max_memory_allocated_process"] = torch.cuda.max_memory_allocated()
    memory["ratio_peak"] = memory["ist"]["peak_bytes"] / memory["base"]["peak_bytes"]
    memory["ratio_step_max"] = memory["ist"]["step_bytes_max"] / memory["base"]["step_bytes_max"]
    memory["ratio_step_mean"] = memory["ist"]["step_bytes_mean"] / memory["base"]["step_bytes_mean"]
    memory["pass"] = bool(memory["ratio_peak"] <= MEMORY_GOAL)

    emit({"benchmark": "ist_step", "task": args.task, "model": args.model, "base": args.base,
          "base_keys": args.base_key, "ist_keys": args.ist_key, "device": str(device),
          "batch_shape": list(batch["input_ids"].shape), "steps": args.steps, "warmup": args.warmup,
          "block": args.block, "mem_steps": args.mem_steps, "time": report, "memory": memory,
          "env": environment(args), "note": args.note}, args.out)


if __name__ == "__main__":
    main()
