"""Task families by config group (`task=<group>/<name>`): each family is one module with its Task class and config
schema; `base.Task` documents the interface."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sparse_peft import UserError
from sparse_peft.schema import typed
from sparse_peft.tasks.base import Task, TaskData  # noqa: F401
from sparse_peft.tasks.glue import Glue


@dataclass
class TaskConfig:
    group: str = "glue"
    name: str = "rte"


@dataclass
class GlueTaskConfig(TaskConfig):
    split_protocol: str = "glue"  # glue (train / GLUE dev) | sora (the SoRA paper's split)
    CHOICES: ClassVar[dict] = {"split_protocol": ("glue", "sora")}


FAMILIES: dict[str, tuple[type, type]] = {"glue": (Glue, GlueTaskConfig)}


def task_config(node):
    group = (node or {}).get("group")
    if group not in FAMILIES:
        raise UserError(f"unknown task group `{group}`; choose task=<group>/<name> with group in {sorted(FAMILIES)}")
    return typed(node, FAMILIES[group][1], "task")


def build_task(task_cfg, data_cfg) -> Task:
    return FAMILIES[task_cfg.group][0](task_cfg, data_cfg)
