"""Tokenisation (datasets.map, cached on disk) and dataloaders with dynamic or fixed padding."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding
from transformers.trainer_pt_utils import get_length_grouped_indices

from sparse_peft.data.glue import GlueTask, get_task, load_glue


@dataclass
class TaskData:
    task: GlueTask
    train: datasets.Dataset
    eval_splits: dict  # name -> tokenised dataset; "validation" selects the checkpoint
    collator: object


def _cache_dir(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    base = os.environ.get("HF_DATASETS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "datasets")
    return Path(base) / "sparse_peft"


def tokenize(ds: datasets.Dataset, task: GlueTask, tokenizer, max_length: int, pad_to_max_length: bool,
             cache_dir: Path) -> datasets.Dataset:
    # Key the cache on the data itself and on everything that changes the tokens.
    key = hashlib.sha256(json.dumps([ds._fingerprint, tokenizer.name_or_path, len(tokenizer), max_length,
                                     pad_to_max_length, task.text_keys]).encode()).hexdigest()[:20]
    cache_dir.mkdir(parents=True, exist_ok=True)

    def fn(batch):
        texts = [batch[k] for k in task.text_keys]
        return tokenizer(*texts, truncation=True, max_length=max_length,
                         padding="max_length" if pad_to_max_length else False)

    return ds.map(fn, batched=True, remove_columns=list(task.text_keys),
                  cache_file_name=str(cache_dir / f"{task.name}-{key}.arrow"), new_fingerprint=key,
                  desc=f"tokenising {task.name}")


def subset(ds: datasets.Dataset, n: int | None, seed: int = 42) -> datasets.Dataset:
    # A fixed seeded subset, so that runs with different training seeds see the same examples.
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def build_task_data(task_cfg, data_cfg, tokenizer) -> TaskData:
    task = get_task(task_cfg.name)
    splits = load_glue(task.name, data_cfg.root, task_cfg.split_protocol)
    cache = _cache_dir(data_cfg.cache_dir)
    tok = lambda ds: tokenize(ds, task, tokenizer, data_cfg.max_length, data_cfg.pad_to_max_length, cache)  # noqa: E731
    train = tok(subset(splits.pop("train"), data_cfg.max_train_samples))
    evals = {name: tok(subset(ds, data_cfg.max_eval_samples)) for name, ds in splits.items()}
    return TaskData(task, train, evals, DataCollatorWithPadding(tokenizer))


def train_order(lengths: list[int], batch_size: int, seed: int, group_by_length: bool) -> list[int]:
    """The example order of one epoch: a seeded permutation, or (default) length-grouped mega-batches, so that
    dynamic padding pads little (>= 3x faster than padding RTE to 320 tokens; benchmarks/padding.py)."""
    g = torch.Generator().manual_seed(seed)
    if not group_by_length:
        return torch.randperm(len(lengths), generator=g).tolist()
    return get_length_grouped_indices(lengths, batch_size, generator=g)


def lengths(ds: datasets.Dataset) -> list[int]:
    return [len(x) for x in ds.with_format(None)["input_ids"]]


def eval_loader(ds: datasets.Dataset, collator, batch_size: int) -> DataLoader:
    # Longest first: little padding, fast; every example is scored once, so metrics ignore the order.
    order = sorted(range(len(ds)), key=lengths(ds).__getitem__, reverse=True)
    return make_loader(ds, collator, batch_size, sampler=order)


def eval_loaders(data: TaskData, batch_size: int) -> dict[str, DataLoader]:
    """One length-sorted loader per evaluation split (validation, test, MNLI mismatched)."""
    return {name: eval_loader(ds, data.collator, batch_size) for name, ds in data.eval_splits.items()}


def make_loader(ds: datasets.Dataset, collator, batch_size: int, sampler: list[int], num_workers: int = 0) -> DataLoader:
    """`sampler`: an explicit index order (the trainer's seeded per-epoch order, resumable mid-epoch)."""
    # Its own generator: creating an iterator then draws no number from the global RNG, so a run resumed
    # mid-epoch sees the same dropout masks as an uninterrupted one.
    return DataLoader(ds.with_format("torch"), batch_size=batch_size, sampler=sampler,
                      collate_fn=collator, num_workers=num_workers, generator=torch.Generator())
