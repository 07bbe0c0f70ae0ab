"""SoRA's sparsifying scheduler (Algorithm 1) as a plan of stages, and the LR schedule over those stages.

Stage 0 trains `trainer.epochs` with the method's own threshold xi0; stage k >= 1 trains `stage_epochs` more with
the k-th value of the xi list. With `scheduler=none` the plan is the single stage 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from torch.optim.lr_scheduler import LambdaLR
from transformers.optimization import _get_linear_schedule_with_warmup_lr_lambda as linear_warmup_decay

from sparse_peft import UserError

SCHEDULES = ("none", "linear", "log_linear", "exp_linear")


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
    if sched.name == "none":
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
