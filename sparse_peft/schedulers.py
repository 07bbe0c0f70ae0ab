"""Schedulers of a method's threshold (the config key the method names in `threshold_key`), and the LR schedule.

- `linear | log_linear | exp_linear`: SoRA's sparsifying scheduler (Algorithm 1) as a plan of stages. Stage 0
  trains `trainer.epochs` with the method's own threshold xi0; stage k >= 1 trains `stage_epochs` more with the k-th
  value of the xi list, from the previous stage's best checkpoint. `Stages` keeps the bookkeeping of such a run:
  each stage's best checkpoint (`stages/stage<k>.safetensors`), the memorization probe (a fixed training subset),
  and the stage records of curve.jsonl.
- `cubic`: PST's sparsity, 0 for the first `initial_warmup` of the steps, the method's target for the last
  `final_warmup`, cubic in between; updated every step.
- `none`: a single stage; the method keeps its own threshold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors.torch import load_file
from torch.optim.lr_scheduler import LambdaLR
from transformers.optimization import _get_linear_schedule_with_warmup_lr_lambda as linear_warmup_decay

from sparse_peft import UserError
from sparse_peft.methods import METHODS
from sparse_peft.runio import save_weights
from sparse_peft.schema import check_positive

STAGED = ("linear", "log_linear", "exp_linear")
SCHEDULES = ("none", *STAGED, "cubic")


def lambda_values(name: str, xi0: float, max_lambda: float, num: int) -> list[float]:
    """The xi list of Algorithm 1 (the reference's three formulas); the first value is xi0."""
    if name == "linear":
        values = np.linspace(xi0, max_lambda, num)
    elif name == "log_linear":
        values = np.log(np.linspace(math.exp(xi0), math.exp(max_lambda), num))
    elif name == "exp_linear":
        if xi0 <= 0 or max_lambda <= 0:
            raise UserError(f"scheduler=exp_linear needs method.sparse_lambda_2 > 0 and scheduler.max_lambda > 0 "
                            f"(it interpolates log xi), got {xi0} and {max_lambda}; use scheduler=linear for a zero start")
        values = np.exp(np.linspace(math.log(xi0), math.log(max_lambda), num))
    else:
        raise UserError(f"unknown lambda schedule `{name}`; choose one of {list(SCHEDULES)}")
    return [float(v) for v in values]


@dataclass
class Stage:
    index: int
    xi: Optional[float]  # None: no threshold schedule (the method keeps its own)
    start: int  # first optimizer step (global)
    end: int  # step count at which the stage is complete


def stage_plan(sched, xi0: Optional[float], stage0_steps: int, steps_per_epoch: int) -> list[Stage]:
    if sched.name not in STAGED:
        return [Stage(0, None, 0, stage0_steps)]
    stages, start = [], 0
    for i, xi in enumerate(lambda_values(sched.name, xi0, sched.max_lambda, sched.lambda_num)):
        length = stage0_steps if i == 0 else math.ceil(sched.stage_epochs * steps_per_epoch)
        stages.append(Stage(i, xi, start, start + length))
        start += length
    return stages


def lr_schedule(optimizer, stages: list[Stage], warmup_ratio: float, restart: bool) -> LambdaLR:
    """Linear warmup then linear decay to 0, per stage (`restart`) or once over stage 0 and 0 after it (the
    reference, whose later stages only threshold)."""

    def factor(step: int) -> float:
        stage = next((s for s in stages if s.start <= step < s.end), stages[-1])
        if stage.index > 0 and not restart:
            return 0.0
        length = stage.end - stage.start
        return linear_warmup_decay(step - stage.start, num_warmup_steps=math.ceil(warmup_ratio * length),
                                   num_training_steps=length)

    return LambdaLR(optimizer, factor)


def cubic_value(step: int, total: int, target: float, initial_warmup: float, final_warmup: float) -> float:
    """PST's schedule: 0 until `initial_warmup * total`, `target` from `(1 - final_warmup) * total`, and
    target * (1 - (1 - (t - t0) / (t1 - t0))^3) in between."""
    t0, t1 = initial_warmup * total, (1 - final_warmup) * total
    if step < t0:
        return 0.0
    if step >= t1:
        return target
    return target + (0.0 - target) * (1 - (step - t0) / (t1 - t0)) ** 3


@dataclass
class Plan:
    """The run in optimizer steps: its stages, and the value of the method's threshold at each step."""
    sched: object  # SchedulerConfig
    stages: list[Stage]
    steps_per_epoch: int
    target: Optional[float]  # the method's own value of its threshold key (SoRA: xi0; PST: the final sparsity)

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end

    @property
    def staged(self) -> bool:
        return len(self.stages) > 1

    def value(self, step: int) -> Optional[float]:
        """The threshold to set before `step`, or None to leave the method's own."""
        if self.sched.name == "cubic":
            return cubic_value(step, self.total_steps, self.target, self.sched.initial_warmup, self.sched.final_warmup)
        return self.stage(step).xi

    def settled(self, step: int) -> bool:
        """Whether the threshold reached its final value by `step` (steps done): a checkpoint from before that
        (PST at a lower sparsity) is no candidate for the best one."""
        return self.sched.name != "cubic" or self.value(max(step - 1, 0)) == self.target

    def stage(self, step: int) -> Stage:
        return next((s for s in self.stages if s.start <= step < s.end), self.stages[-1])


def plan(run, n_train: int) -> Plan:
    """The scheduler's stages in optimizer steps (stage 0 = trainer.max_steps or trainer.epochs)."""
    t = run.trainer
    steps_per_epoch = math.ceil(math.ceil(n_train / t.batch_size) / t.grad_accum)
    stage0 = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    key = METHODS[run.method.name].threshold_key
    target = getattr(run.method, key) if key else None
    return Plan(run.scheduler, stage_plan(run.scheduler, target, stage0, steps_per_epoch), steps_per_epoch, target)


def check_scheduler(run) -> None:
    s = run.scheduler
    if s.name not in SCHEDULES:
        raise UserError(f"unknown scheduler `{s.name}`; choose scheduler=<name> with name in {list(SCHEDULES)}")
    if s.name == "none":
        return
    key = METHODS[run.method.name].threshold_key
    wanted = "a sparsity threshold in stages" if s.name in STAGED else "a sparsity target every step"
    if key is None or (s.name == "cubic") != (key == "sparsity"):
        users = sorted(n for n, m in METHODS.items() if m.threshold_key and (m.threshold_key == "sparsity") == (s.name == "cubic"))
        raise UserError(f"scheduler={s.name} drives {wanted}; method={run.method.name} has none "
                        f"(use method={'|'.join(users)}, or scheduler=none)")
    if s.name == "cubic":
        if not (0 <= s.initial_warmup and 0 < s.final_warmup and s.initial_warmup + s.final_warmup < 1):
            raise UserError(f"config `scheduler.initial_warmup` (>= 0) + `scheduler.final_warmup` (> 0: the last steps "
                            f"train at the target) must be < 1 together, got {s.initial_warmup} + {s.final_warmup}")
        return
    if s.max_lambda < 0 or s.lambda_num < 1:
        raise UserError(f"config `scheduler.max_lambda` must be >= 0 and `scheduler.lambda_num` >= 1, "
                        f"got {s.max_lambda} and {s.lambda_num}")
    check_positive("scheduler", stage_epochs=s.stage_epochs, train_subset=s.train_subset)
    lambda_values(s.name, getattr(run.method, key), s.max_lambda, s.lambda_num)  # exp_linear: xi0 > 0


def percent_of(value, reference):
    """SoRA's generalization / memorization: a metric as a percentage of its stage-0 best."""
    return None if value is None or not reference else 100.0 * value / reference


class Stages:
    """A staged run's bookkeeping (Algorithm 1): every evaluation also scores a fixed training subset (the
    memorization probe); each stage's best checkpoint is kept in `stages/stage<k>.safetensors`; at a stage's end
    its best is recorded and the next stage starts from it."""

    def __init__(self, out: Path, probe, write: bool):
        self.dir, self.probe, self.write = out / "stages", probe, write
        self.best_weights = None

    def file(self, k: int) -> Path:
        return self.dir / f"stage{k}.safetensors"

    def resume(self, stage: int) -> None:
        if self.file(stage).exists():
            self.best_weights = load_file(str(self.file(stage)))

    def curves(self, state, scores: dict, train_scores: Optional[dict], metric: str) -> dict:
        return {"generalization": percent_of(scores[metric], state.stage0_eval),
                "memorization": percent_of(train_scores and train_scores[metric], state.stage0_train)}

    def new_best(self, stage: int, weights: dict) -> None:
        self.best_weights = weights
        if self.write:
            self.dir.mkdir(exist_ok=True)
            save_weights(weights, self.file(stage))

    def end_stage(self, state, stage: Stage, metric: str) -> dict:
        """The stage's record for curve.jsonl; the caller loads `best_weights` to continue from them."""
        rec = state.stage_best
        if stage.index == 0:
            state.stage0_eval, state.stage0_train = rec["eval"][metric], rec["train"][metric]
        record = {"type": "stage", "step": state.step, "best_step": rec["step"], "stage": stage.index,
                  "lambda": stage.xi, "retained_params": rec["retained_params"], "eval": rec["eval"],
                  "train": rec["train"], **self.curves(state, rec["eval"], rec["train"], metric), "ranks": rec["ranks"]}
        state.stage, state.stage_best = state.stage + 1, None
        return record
