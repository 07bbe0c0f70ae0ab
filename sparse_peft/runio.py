"""What a run writes: its output dir, atomic JSON, curve.jsonl, resume checkpoints, wandb."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from sparse_peft import UserError


def crash_point(name: str, out: Path) -> None:
    """Fault injection for the crash tests: `SPARSE_PEFT_CRASH_AT=<name>[@<output dir substring>]` SIGKILLs this
    process when the run writing to `out` reaches the named point (a real kill: no cleanup, no handlers)."""
    spec = os.environ.get("SPARSE_PEFT_CRASH_AT")
    if spec:
        point, _, where = spec.partition("@")
        if point == name and where in str(out):
            os.kill(os.getpid(), signal.SIGKILL)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj) -> None:
    """Temp file, fsync, rename: a reader sees the old file or the whole new one, also after a power cut."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    fsync_file(tmp)
    crash_point("final_write", path.parent)
    os.replace(tmp, path)


def is_completed(out: Path) -> bool:
    try:
        return json.loads((out / "metrics.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


# Keys that cannot change a run's result (beyond rounding, as thread counts and kernels do): a completed run that
# differs only in these is the same run.
VOLATILE = {"trainer": ("output_dir", "overwrite", "resume", "progress_bar", "num_threads", "fused_adamw", "dry_run",
                        "keep_checkpoints"),
            "data": ("root", "cache_dir", "num_workers"), "logger": None}


def run_dirname(overrides) -> str:
    """A sweep job's dir name: its command-line overrides, sorted, without those that cannot change a result (and
    the experiment preset, the set's own), so a rerun that differs only in them finds its completed cell."""
    def named(line: str) -> bool:
        key = line.split("=", 1)[0].lstrip("+~").split("@")[0]
        node, _, leaf = key.partition(".")
        return key != "experiment" and not (node in VOLATILE and (VOLATILE[node] is None or leaf in VOLATILE[node]))

    return ",".join(sorted(filter(named, overrides))).replace("/", "-") or "default"  # task=glue/rte: not a nested dir


def result_config(cfg) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
    for node, keys in VOLATILE.items():
        if keys is None:
            c.pop(node, None)
        else:
            c[node] = {k: v for k, v in (c.get(node) or {}).items() if k not in keys}
    return c


def in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_name() -> Optional[str]:
    """The sweep dir's name inside a Hydra multirun (wandb groups a sweep's runs by it), else None."""
    if not in_sweep():
        return None
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().sweep.dir).name


def config_diff(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two result configs."""
    keys = []
    for node in sorted(set(saved) | set(current)):
        a, b = saved.get(node), current.get(node)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += [f"{node}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            keys.append(node)
    return keys


_LOCKS: dict[str, object] = {}


def lock_output_dir(out: Path) -> None:
    """One writer per output dir: an exclusive `flock` on `<out>/.lock`, held until `unlock_output_dir` or the
    process ends (the kernel drops it on a kill, so a crashed run never leaves it stuck)."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UserError(f"{out} is in use by another run (pid {holder}); wait for it to finish or choose another "
                        f"trainer.output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _LOCKS[str(out)] = f


def unlock_output_dir(out: Path) -> None:
    f = _LOCKS.pop(str(out), None)
    if f is not None:
        f.close()  # closing the file releases the flock


def prepare_output_dir(trainer_cfg, cfg) -> tuple[Path, Optional[dict]]:
    """The run's output dir, locked for this process, and the metrics of the completed run already there when it
    may be reused: in a sweep, a job whose dir holds a completed run of the same config is skipped (re-running a
    sweep runs only the missing or failed jobs). An unfinished run there resumes only with the same config. A dry
    run writes nothing."""
    if trainer_cfg.output_dir:
        out = Path(trainer_cfg.output_dir)
    else:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise UserError("no output directory: set trainer.output_dir")
        out = Path(HydraConfig.get().runtime.output_dir)
    if is_completed(out) and not trainer_cfg.overwrite:
        if not in_sweep() and not trainer_cfg.dry_run:
            raise UserError(f"{out} already holds a completed run; pass trainer.overwrite=true to re-run it "
                            f"or choose another trainer.output_dir")
        diff = config_diff(result_config(OmegaConf.load(out / "config.yaml")), result_config(cfg))
        if diff:
            raise UserError(f"{out} holds a completed run with another config (`{diff[0]}` differs); pass "
                            f"trainer.overwrite=true to replace it or use another hydra.sweep.dir")
        return out, json.loads((out / "metrics.json").read_text())
    if trainer_cfg.dry_run:
        return out, None
    lock_output_dir(out)
    if trainer_cfg.overwrite:
        for name in ("metrics.json", "curve.jsonl", "model.safetensors", "method_state.pt", "config.yaml"):
            (out / name).unlink(missing_ok=True)
        for name in ("checkpoints", "stages", "wandb"):
            shutil.rmtree(out / name, ignore_errors=True)
    elif trainer_cfg.resume and (out / "checkpoints" / "last").exists() and (out / "config.yaml").exists():
        diff = config_diff(result_config(OmegaConf.load(out / "config.yaml")), result_config(cfg))
        if diff:
            unlock_output_dir(out)
            raise UserError(f"{out} holds an unfinished run with another config (`{'`, `'.join(diff)}` differ"
                            f"{'s' if len(diff) == 1 else ''}); re-run with its config to resume it, or pass "
                            f"trainer.overwrite=true to discard it and start fresh")
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    keep_launch_record()
    return out, None


def keep_launch_record() -> None:
    """Copy this launch's Hydra record (`hydra.output_subdir`) to `.hydra/` beside it: only a launch that trains
    does, so a relaunched sweep leaves its completed jobs' records as they were."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().output_subdir in (None, ".hydra"):
        return
    launch = Path(HydraConfig.get().runtime.output_dir) / HydraConfig.get().output_subdir
    if launch.is_dir():
        shutil.copytree(launch, launch.parent / ".hydra", dirs_exist_ok=True)


def discard_failed_start(out: Path) -> None:
    """A run that failed before its first checkpoint leaves nothing that looks like a run (config.yaml, wandb/,
    curve.jsonl, stages/); a run with a checkpoint keeps everything, so that it can resume."""
    if (out / "checkpoints" / "last").exists() or is_completed(out):
        return
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish(exit_code=1)  # close its files before they are removed
    for name in ("config.yaml", "curve.jsonl", "model.safetensors", "method_state.pt"):
        (out / name).unlink(missing_ok=True)
    for name in ("wandb", "stages", "checkpoints"):
        shutil.rmtree(out / name, ignore_errors=True)


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Atomic: a kill mid-write leaves the previous file (or none), never a truncated one that a resume reads."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    fsync_file(tmp)
    os.replace(tmp, path)



def save_method_state(state: dict, path: Path) -> None:
    """A method's non-parameter state (masks, thresholds) beside the weights it belongs to; atomic."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    fsync_file(tmp)
    os.replace(tmp, path)


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    missing = set(state) - {n for n, _ in model.named_parameters()}
    if missing:
        raise UserError(f"checkpoint holds parameters the model lacks ({sorted(missing)[:3]}...); "
                        f"was it written with another method or model config?")
    model.load_state_dict(state, strict=False)


@dataclass
class TrainState:
    step: int = 0
    best_metric: Optional[float] = None  # the selection metric of the best checkpoint of stage 0 (the whole run
    best_step: Optional[int] = None  # when there is no sparsifying scheduler)
    train_time_s: float = 0.0
    stage: int = 0  # scheduler stage being trained
    stage_best: Optional[dict] = None  # the current stage's best evaluation record
    stage0_eval: Optional[float] = None  # stage 0's best validation / training-subset metric: the 100% of
    stage0_train: Optional[float] = None  # SoRA's generalization / memorization curves


def save_checkpoint(ckpt_dir: Path, model, method, optimizer, scheduler, state: TrainState, best: Optional[dict]) -> None:
    weights = method.trained_state(model)
    bad = [n for n, w in weights.items() if not torch.isfinite(w).all()]
    if bad:  # never save a diverged state: the last good checkpoint stays
        raise UserError(f"parameters became non-finite at step {state.step} ({bad[0]}, ...): the run diverged; lower "
                        f"trainer.lr (or set trainer.max_grad_norm) and re-run with trainer.overwrite=true (resuming "
                        f"the last good checkpoint with this config would diverge again)")
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(weights, tmp / "trainable.safetensors")
    crash_point("checkpoint_mid", ckpt_dir.parent.parent)
    if best is not None:
        save_weights(best, tmp / "best.safetensors")
    # On a GPU, dropout draws from the CUDA generator: without its state a resumed run gets other masks.
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "method": method.state_dict()},
               tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state)))
    for f in tmp.iterdir():
        fsync_file(f)
    # Swap in two renames: a kill between them leaves `last.old` (whole), which the next start puts back.
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)  # a checkpoint dir is either whole or absent
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(ckpt_dir: Path) -> None:
    """After a kill mid-swap only `last.old` may exist: it is the last whole checkpoint."""
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    if not ckpt_dir.exists() and old.exists():
        os.replace(old, ckpt_dir)


def load_checkpoint(ckpt_dir: Path, model, method, optimizer, scheduler) -> tuple[TrainState, Optional[dict]]:
    load_trainable(model, load_file(str(ckpt_dir / "trainable.safetensors")))
    extra = torch.load(ckpt_dir / "optim.pt", weights_only=True)
    method.load_state_dict(extra.get("method") or {})
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    if extra.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    saved = json.loads((ckpt_dir / "state.json").read_text())
    state = TrainState(**{k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__})
    best_path = ckpt_dir / "best.safetensors"
    return state, (load_file(str(best_path)) if best_path.exists() else None)


class RunLogger:
    """curve.jsonl (one line per evaluation), wandb (offline by default) and the Python log."""

    def __init__(self, out: Path, logger_cfg, run_name: str, config: dict, resume_step: int, write: bool = True):
        self.write = write  # false on the non-zero ranks of a data-parallel run: they log nothing
        self.curve_path = out / "curve.jsonl"
        self.wandb = None
        if not write:
            return
        # On resume, drop evaluations written after the checkpoint we restart from.
        if self.curve_path.exists():
            lines = [ln for ln in self.curve_path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln)["step"] <= resume_step] if resume_step else []
            self.curve_path.write_text("".join(ln + "\n" for ln in kept))
        w = logger_cfg.wandb
        # WANDB_MODE=disabled in the environment wins over the config (wandb's own convention)
        if w.mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(mode=w.mode, project=w.project, entity=w.entity, group=w.group or sweep_name(),
                                    tags=list(w.tags),
                                    name=run_name, config=config, dir=str(out), reinit="finish_previous")

    def curve(self, record: dict) -> None:
        if not self.write:
            return
        with open(self.curve_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("type") == "stage":  # one point per scheduler stage: the retained-vs-metric curves
            self.log({"stage/lambda": record["lambda"], "stage/retained_params": record["retained_params"],
                      "stage/generalization": record["generalization"], "stage/memorization": record["memorization"],
                      **{f"stage/eval_{k}": v for k, v in record["eval"].items()},
                      **{f"stage/train_{k}": v for k, v in (record["train"] or {}).items()}}, record["step"])

    def records(self, kind: str) -> list[dict]:
        """The curve's records of one type (`eval` or `stage`), resumed runs included."""
        lines = self.curve_path.read_text().splitlines() if self.curve_path.exists() else []
        return [r for r in map(json.loads, filter(str.strip, lines)) if r.get("type") == kind]

    def log(self, values: dict, step: int) -> None:
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def finish(self, summary: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(summary)
            self.wandb.finish()
