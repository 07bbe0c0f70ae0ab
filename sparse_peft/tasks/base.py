"""What is task-specific, in one small interface: the splits, the collator, the model kind, evaluation.

A task family (GLUE, commonsense) is one module that registers its tasks' group name; the rest of the harness
asks the task instead of assuming classification.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft import TaskType


@dataclass
class TaskData:
    train: Any  # a tokenised datasets.Dataset with `input_ids` (lengths drive batching)
    eval_splits: dict  # name -> what `Task.eval_loader` takes; "validation" selects the checkpoint, "test" is reported
    collator: Any  # training batches
    info: dict  # facts recorded in metrics.json (e.g. which files the training set came from)


class Task:
    group: str = ""
    name: str = ""
    model_kind: str = "seq_cls"  # seq_cls (AutoModelForSequenceClassification) | causal_lm (AutoModelForCausalLM)
    num_labels: int = 0  # seq_cls: 1 = regression
    metric: str = "accuracy"  # the selection metric (higher is better)
    model_inputs: tuple = ("input_ids", "attention_mask", "token_type_ids", "labels")

    def __init__(self, task_cfg, data_cfg):
        self.cfg = task_cfg
        self.data_cfg = data_cfg

    @property
    def peft_task_type(self) -> TaskType:
        return TaskType.SEQ_CLS if self.model_kind == "seq_cls" else TaskType.CAUSAL_LM

    def load(self, tokenizer) -> TaskData:
        raise NotImplementedError

    def eval_loader(self, split, batch_size: int):
        """An iterable over one evaluation split, as `evaluate` consumes it."""
        raise NotImplementedError

    def evaluate(self, model, loader, device: torch.device) -> dict[str, float]:
        raise NotImplementedError

    def inputs(self, batch: dict, device: torch.device) -> dict:
        """The model's keyword inputs from a training batch."""
        return {k: v.to(device) for k, v in batch.items() if k in self.model_inputs}

    def info(self) -> dict:
        """Protocol facts recorded in metrics.json (prompt template, scoring mode, ...)."""
        return {}
