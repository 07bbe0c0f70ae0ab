"""Shared by every task: tokenisation cached on disk, seeded subsets, the per-epoch training order, loaders."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import datasets
import torch
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import get_length_grouped_indices


def cache_dir(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    base = os.environ.get("HF_DATASETS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "datasets")
    return Path(base) / "sparse_peft"


def tokenize(ds: datasets.Dataset, fn: Callable, remove_columns: list[str], name: str, key_parts: list,
             cache: Path) -> datasets.Dataset:
    """`ds.map(fn, batched=True)` cached under a key of the data itself and of everything that changes the tokens
    (`key_parts`: tokenizer, lengths, prompt template, ...)."""
    key = hashlib.sha256(json.dumps([ds._fingerprint, *key_parts]).encode()).hexdigest()[:20]
    cache.mkdir(parents=True, exist_ok=True)
    return ds.map(fn, batched=True, remove_columns=remove_columns, cache_file_name=str(cache / f"{name}-{key}.arrow"),
                  new_fingerprint=key, desc=f"tokenising {name}")


def subset(ds: datasets.Dataset, n: int | None, seed: int = 42) -> datasets.Dataset:
    # A fixed seeded subset, so that runs with different training seeds see the same examples.
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


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


def make_loader(ds: datasets.Dataset, collator, batch_size: int, sampler: list[int], num_workers: int = 0) -> DataLoader:
    """`sampler`: an explicit index order (the trainer's seeded per-epoch order, resumable mid-epoch)."""
    # Its own generator: creating an iterator then draws no number from the global RNG, so a run resumed
    # mid-epoch sees the same dropout masks as an uninterrupted one.
    return DataLoader(ds.with_format("torch"), batch_size=batch_size, sampler=sampler,
                      collate_fn=collator, num_workers=num_workers, generator=torch.Generator())
