"""`python -m sparse_peft.export <run_dir> [--out DIR] [--stage K] [--merge] [--verify]`

Writes what a finished run's method exports: for SoRA the compact rank-pruned LoRA adapter (per-module ranks,
task head in `modules_to_save`) that `peft.PeftModel.from_pretrained(base_model, DIR)` loads; for LoRA/AdaLoRA
their peft adapter; for PST / magnitude pruning a whole model in the base architecture holding the sparse merged
weights (`AutoModelFor....from_pretrained(DIR)`); for the other methods their trainable tensors. `--merge` also
writes the base model with the adapter merged in (`DIR/merged`, loadable by transformers alone); `--verify` reloads
the export (through peft, or transformers alone for a whole model) and re-evaluates it against the run's metrics.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import set_seed

from sparse_peft import UserError
from sparse_peft.config import load_run_config
from sparse_peft.devices import device_name, pick_device
from sparse_peft.loop import evaluate_splits
from sparse_peft.methods import build_method
from sparse_peft.models import AUTO_CLASSES, build_model, load_tokenizer
from sparse_peft.runio import is_completed, load_trainable
from sparse_peft.tasks import build_task

TOLERANCE = 1e-6  # metrics of the reloaded export vs the run's (floats; predictions themselves must agree)
# A run trained on a GPU and verified on a CPU (or another GPU model) differs by float rounding alone.
CROSS_DEVICE_TOLERANCE = 1e-4


def load_run(run_dir: Path, stage: int | None = None):
    """(run config, trained model, method, tokenizer, the metrics to reproduce) of a completed run dir."""
    if not is_completed(run_dir):
        raise UserError(f"{run_dir} holds no completed run (no metrics.json with status completed)")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run = load_run_config(OmegaConf.load(run_dir / "config.yaml"))
    weights = run_dir / ("model.safetensors" if stage is None else f"stages/stage{stage}.safetensors")
    if not weights.exists():
        hint = ("--stage needs a run with a sparsifying scheduler (see its stages/)" if stage is not None else
                "the run's trained weights are missing; re-run it with trainer.overwrite=true")
        raise UserError(f"{weights} not found; {hint}")
    tokenizer = load_tokenizer(run.model)
    task = build_task(run.task, run.data)
    model = base_model(run, task, tokenizer)
    method = build_method(run.method, run.model, metrics["steps"], task)
    model = method.inject(model)
    if (run_dir / "method_state.pt").exists():  # masks and the like, as at the end of training
        method.load_state_dict(torch.load(run_dir / "method_state.pt", weights_only=True))
    load_trainable(model, load_file(str(weights)))
    if stage is None:
        expected = {"eval": metrics["eval"], "test": metrics["test"]}
    else:
        record = next((s for s in metrics.get("stages") or [] if s["stage"] == stage), None)
        expected = {"eval": record["eval"], "test": None} if record else None
    if expected:  # runs from before metrics.json recorded its environment all ran on a CPU
        expected["device"] = (metrics.get("environment") or {}).get("device", "cpu")
    return run, task, model.eval(), method, tokenizer, expected


def base_model(run, task, tokenizer):
    set_seed(run.trainer.seed)  # the same random task head as in training, should it have stayed frozen
    return build_model(run.model, task, tokenizer)


def export(run_dir: Path, out: Path, stage: int | None = None, merge: bool = False, verify: bool = False) -> dict:
    from peft import PeftModel

    run, task, model, method, tokenizer, expected = load_run(run_dir, stage)
    fmt = method.export_format  # checked before anything is written
    if merge and fmt != "peft":
        raise UserError(f"method={run.method.name} exports "
                        f"{'a whole model (already merged)' if fmt == 'model' else 'no peft adapter'}; --merge needs one")
    if verify and fmt not in ("peft", "model"):
        raise UserError(f"method={run.method.name} exports no peft adapter; --merge and --verify need one")
    method.export(model, out)
    report = {"run_dir": str(run_dir), "out": str(out), "method": run.method.name,
              "retained_params": method.retained_params(model), "ranks": method.ranks(model)}
    if merge:
        merged = PeftModel.from_pretrained(base_model(run, task, tokenizer), str(out)).merge_and_unload()
        merged.save_pretrained(str(out / "merged"))
        tokenizer.save_pretrained(str(out / "merged"))
        report["merged"] = str(out / "merged")
    if verify:
        device = pick_device(run.trainer.device)
        reloaded = (PeftModel.from_pretrained(base_model(run, task, tokenizer), str(out)) if fmt == "peft"
                    else AUTO_CLASSES[task.model_kind].from_pretrained(str(out))).eval().to(device)
        data = task.load(tokenizer)
        loaders = {name: task.eval_loader(split, run.trainer.eval_batch_size) for name, split in data.eval_splits.items()}
        got = evaluate_splits(reloaded, task, loaders, device)
        diffs = [abs(got[split][k] - v) for split in ("eval", "test") if expected and expected[split]
                 for k, v in expected[split].items()]
        here = device_name(device)
        tolerance = TOLERANCE if expected and expected["device"] == here else CROSS_DEVICE_TOLERANCE
        report.update(reloaded_eval=got["eval"], reloaded_test=got["test"], run_eval=expected and expected["eval"],
                      run_device=expected and expected["device"], verify_device=here, tolerance=tolerance,
                      max_abs_diff=max(diffs) if diffs else None, reproduced=bool(diffs) and max(diffs) <= tolerance)
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_peft.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="default: <run_dir>/export (or export_stage<K>)")
    parser.add_argument("--stage", type=int, help="export the best checkpoint of scheduler stage K")
    parser.add_argument("--merge", action="store_true", help="also write the merged model to <out>/merged")
    parser.add_argument("--verify", action="store_true", help="reload through peft and compare metrics with the run")
    args = parser.parse_args(argv)
    out = args.out or args.run_dir / ("export" if args.stage is None else f"export_stage{args.stage}")
    try:
        report = export(args.run_dir, out, args.stage, args.merge, args.verify)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    if args.verify and not report["reproduced"]:
        print(f"error: the reloaded export does not reproduce the run's metrics (max diff {report['max_abs_diff']} > "
              f"{report['tolerance']}; trained on {report['run_device']}, verified on {report['verify_device']})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
