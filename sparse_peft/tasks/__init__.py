"""Task families by config group (`task=<group>/<name>`): each family is one module with its Task class and config
schema; `base.Task` documents the interface."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sparse_peft import UserError
from sparse_peft.schema import typed
from sparse_peft.tasks.base import Task, TaskData  # noqa: F401
from sparse_peft.tasks.commonsense import Commonsense
from sparse_peft.tasks.glue import Glue


@dataclass
class TaskConfig:
    group: str = "glue"
    name: str = "rte"


@dataclass
class GlueTaskConfig(TaskConfig):
    split_protocol: str = "glue"  # glue (train / GLUE dev) | sora (the SoRA paper's split)
    CHOICES: ClassVar[dict] = {"split_protocol": ("glue", "sora")}


@dataclass
class CommonsenseTaskConfig(TaskConfig):
    group: str = "commonsense"
    name: str = "boolq"  # one of the eight tasks, or `all` (mixed training set, every task evaluated)
    eval_mode: str = "generate"  # test split: generate (the benchmark's scoring) | loglik (label log-likelihood)
    val_eval_mode: str = "loglik"  # validation (checkpoint selection), every eval_every steps: cheap by default
    train_on_inputs: bool = True  # loss on prompt + response (LLM-Adapters' default) or on the response only
    num_beams: int = 1  # generate: 1 = greedy; LLM-Adapters' eval script uses 4
    max_new_tokens: int = 32  # generate: as LLM-Adapters
    loglik_norm: str = "sum"  # loglik: sum | mean (per token) | char (per character, acc_norm)
    val_set_size: int = 120  # training examples held out for validation, as LLM-Adapters
    CHOICES: ClassVar[dict] = {"eval_mode": ("generate", "loglik"), "val_eval_mode": ("generate", "loglik"),
                               "loglik_norm": ("sum", "mean", "char")}


FAMILIES: dict[str, tuple[type, type]] = {"glue": (Glue, GlueTaskConfig),
                                          "commonsense": (Commonsense, CommonsenseTaskConfig)}


def task_config(node):
    group = (node or {}).get("group")
    if group not in FAMILIES:
        raise UserError(f"unknown task group `{group}`; choose task=<group>/<name> with group in {sorted(FAMILIES)}")
    return typed(node, FAMILIES[group][1], "task")


def build_task(task_cfg, data_cfg) -> Task:
    return FAMILIES[task_cfg.group][0](task_cfg, data_cfg)
