"""GLUE: the nine tasks, read from local TSV/parquet files (with their quirks) or from the hub, split by the
chosen protocol, tokenised, and scored with scikit-learn / scipy (the hub's `evaluate` scripts are not reachable
offline).

Labels use the integer ids of the hub's `nyu-mll/glue`, so local files and the hub give identical data.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import DataCollatorWithPadding

from sparse_peft import UserError
from sparse_peft.tasks.base import Task, TaskData
from sparse_peft.tasks.loaders import cache_dir, eval_loader, subset, tokenize

HUB_ID = "nyu-mll/glue"
log = logging.getLogger("sparse_peft")


@dataclass(frozen=True)
class GlueSpec:
    name: str
    text_keys: tuple  # one or two text columns
    num_labels: int  # 1 = regression
    metric: str  # selection metric
    label_names: tuple = ()  # TSV label strings in id order; empty: the TSV holds the integer / float label
    # TSV: the column names (None = the file has no header and these are positional names)
    tsv_columns: Optional[tuple] = None
    tsv_rename: dict = field(default_factory=dict)  # TSV column -> hub column
    validation_splits: tuple = ("validation",)  # GLUE dev split(s); the first one selects the checkpoint
    sora_large: bool = False  # SoRA protocol: 1000 train examples become validation, dev becomes test

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


GLUE_TASKS = {
    t.name: t
    for t in [
        GlueSpec("cola", ("sentence",), 2, "matthews_correlation",
                 tsv_columns=("source", "label", "original_label", "sentence")),
        GlueSpec("sst2", ("sentence",), 2, "accuracy", sora_large=True),
        GlueSpec("mrpc", ("sentence1", "sentence2"), 2, "f1",
                 tsv_rename={"Quality": "label", "#1 String": "sentence1", "#2 String": "sentence2"}),
        GlueSpec("qqp", ("question1", "question2"), 2, "accuracy", sora_large=True,
                 tsv_rename={"is_duplicate": "label"}),
        GlueSpec("stsb", ("sentence1", "sentence2"), 1, "pearson", tsv_rename={"score": "label"}),
        GlueSpec("mnli", ("premise", "hypothesis"), 3, "accuracy",
                 label_names=("entailment", "neutral", "contradiction"),
                 tsv_rename={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
                 validation_splits=("validation_matched", "validation_mismatched")),
        GlueSpec("qnli", ("question", "sentence"), 2, "accuracy", label_names=("entailment", "not_entailment"),
                 sora_large=True),
        GlueSpec("rte", ("sentence1", "sentence2"), 2, "accuracy", label_names=("entailment", "not_entailment")),
        GlueSpec("wnli", ("sentence1", "sentence2"), 2, "accuracy"),
    ]
}

# Alternative file stems accepted for each split (the original GLUE release names dev files `dev*.tsv`).
SPLIT_ALIASES = {
    "validation": ("validation", "dev"),
    "validation_matched": ("validation_matched", "dev_matched"),
    "validation_mismatched": ("validation_mismatched", "dev_mismatched"),
    "train": ("train",),
    "test": ("test",),
}


def get_spec(name: str) -> GlueSpec:
    if name not in GLUE_TASKS:
        raise UserError(f"unknown GLUE task `{name}`; choose task=glue/<name> with name in {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[name]


def _label_value(task: GlueSpec, raw: str, where: str):
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise UserError(f"{where}: score `{raw}` is not a number; fix or remove the row") from None
    if task.label_names:
        if raw not in task.label_names:
            raise UserError(f"{where}: label `{raw}` is not one of {list(task.label_names)}; fix or remove the row")
        return task.label_names.index(raw)
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{where}: label `{raw}` is not an integer; fix or remove the row") from None


def read_glue_tsv(task: GlueSpec, path: Path) -> datasets.Dataset:
    """Read a GLUE TSV as the original loader does: tab-separated, no quoting (quotes are text), BOM stripped."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason}); is it a GLUE TSV? re-copy it "
                        f"from the GLUE release") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a readable TSV ({e}); re-copy it from the GLUE release") from None
    if task.tsv_columns is not None:
        header, body, first_line = list(task.tsv_columns), rows, 1
    elif rows:
        header, body, first_line = rows[0], rows[1:], 2
    else:
        raise UserError(f"{path}: the file is empty; re-copy it from the GLUE release")
    header = [task.tsv_rename.get(c, c) for c in header]
    missing = [k for k in task.text_keys if k not in header]
    if missing:
        raise UserError(f"{path}: header {header} lacks column(s) {missing}; is this the {task.name} file?")
    columns: dict[str, list] = {k: [] for k in task.text_keys}
    columns["label"] = []
    has_label = "label" in header
    for i, row in enumerate(body):
        where = f"{path}:{first_line + i}"
        if len(row) != len(header):
            raise UserError(f"{where}: malformed row with {len(row)} fields, expected {len(header)} "
                            f"(tab-separated, no quoting); fix or remove that line")
        rec = dict(zip(header, row))
        for k in task.text_keys:
            columns[k].append(rec[k])
        # Unlabelled (test) files get -1, as the hub does.
        columns["label"].append(_label_value(task, rec["label"], where) if has_label else -1)
    features = datasets.Features({**{k: datasets.Value("string") for k in task.text_keys},
                                  "label": datasets.Value("float32" if task.is_regression else "int64")})
    return datasets.Dataset.from_dict(columns, features=features)


def read_glue_file(task: GlueSpec, path: Path) -> datasets.Dataset:
    if path.suffix == ".tsv":
        ds = read_glue_tsv(task, path)
    else:
        try:
            ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        except Exception as e:  # pyarrow raises many types for a damaged file
            tsv = path.with_suffix(".tsv")
            hint = f"remove it to use {tsv.name} beside it" if tsv.exists() else "re-copy it"
            raise UserError(f"{path}: not a readable parquet file ({type(e).__name__}); {hint}") from None
        missing = [k for k in (*task.text_keys, "label") if k not in ds.column_names]
        if missing:
            raise UserError(f"{path}: columns {ds.column_names} lack {missing}; expected the hub's nyu-mll/glue parquet")
        ds = ds.select_columns([*task.text_keys, "label"])
    if len(ds) == 0:
        raise UserError(f"{path}: no data rows (a header alone); re-copy the file")
    log.info("%s: %d rows from %s", task.name, len(ds), path)
    return ds


def find_split_file(task_dir: Path, split: str) -> Optional[Path]:
    for stem in SPLIT_ALIASES.get(split, (split,)):
        for ext in (".parquet", ".tsv"):  # parquet first: typed, no quirks
            if (task_dir / f"{stem}{ext}").is_file():
                return task_dir / f"{stem}{ext}"
    return None


def data_root(root: Optional[str]) -> Optional[Path]:
    root = root or os.environ.get("SPARSE_PEFT_DATA") or None
    return Path(root).expanduser() if root else None


def load_raw_glue(task: GlueSpec, root: Optional[Path], splits: tuple, files: Optional[dict] = None) -> dict[str, datasets.Dataset]:
    """The raw splits; `files` (if given) receives the file each split was read from."""
    files = {} if files is None else files
    if root is not None:
        task_dir = root / "glue" / task.name
        if not task_dir.is_dir():
            raise UserError(f"data directory {task_dir} does not exist; set data.root or SPARSE_PEFT_DATA to a "
                            f"directory laid out as glue/<task>/<split>.tsv|parquet")
        out = {}
        for split in splits:
            path = find_split_file(task_dir, split)
            if path is None:
                raise UserError(f"no `{split}` split for {task.name} in {task_dir} (looked for "
                                f"{'/'.join(SPLIT_ALIASES.get(split, (split,)))}.parquet|tsv); add the file")
            out[split], files[split] = read_glue_file(task, path), str(path)
        return out
    try:
        hub = datasets.load_dataset(HUB_ID, task.name)
    except Exception as e:  # no network, no cache: the datasets library raises many types here
        raise UserError(f"cannot load {HUB_ID}/{task.name} from the Hugging Face hub ({type(e).__name__}); "
                        f"set data.root or SPARSE_PEFT_DATA to a local GLUE directory") from None
    files.update({split: f"hub:{HUB_ID}/{task.name}" for split in splits})
    return {split: hub[split] for split in splits}


def _seeded_perm(n: int, seed: int = 42) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g).tolist()


def load_glue(task_name: str, root: Optional[str], split_protocol: str, files: Optional[dict] = None) -> dict[str, datasets.Dataset]:
    """Return {"train", "validation", "test"?, extra validation splits...} under the chosen split protocol.

    glue: train / GLUE dev (MNLI: matched selects, mismatched is reported too); no test.
    sora: (SoRA / OpenDelta processor, shuffles with torch.randperm seeded 42) small tasks: dev halved,
          first half validation, second half test; large tasks (sst2, qnli, qqp): first 1000 of the
          shuffled train set are validation, the rest train, the GLUE dev set is the test set.
    """
    task = get_spec(task_name)
    raw = load_raw_glue(task, data_root(root), ("train", *task.validation_splits), files)
    dev_name = task.validation_splits[0]
    if split_protocol == "glue":
        return {"train": raw["train"], "validation": raw[dev_name],
                **{s: raw[s] for s in task.validation_splits[1:]}}
    if task.sora_large:
        perm = _seeded_perm(len(raw["train"]))
        return {"train": raw["train"].select(perm[1000:]), "validation": raw["train"].select(perm[:1000]),
                "test": raw[dev_name]}
    dev = raw[dev_name]
    perm = _seeded_perm(len(dev))
    half = len(dev) // 2
    return {"train": raw["train"], "validation": dev.select(perm[:half]), "test": dev.select(perm[half:])}


METRICS_BY_TASK = {
    "cola": ("matthews_correlation",),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearmanr"),
}


def glue_metrics(task_name: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """`predictions`: class ids, or scores for STS-B. Names follow the hub's glue metric; the first selects.
    Classification also gets `majority_share`, the share of the most predicted class: a model that names one class
    for every input scores MRPC's F1 at 81 without reading it, and `report --choose` must not pick such a rate."""
    out = {}
    for name in METRICS_BY_TASK.get(task_name, ("accuracy",)):
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "pearson":
            out[name] = float(pearsonr(predictions, labels)[0]) if np.std(predictions) > 0 else 0.0
        elif name == "spearmanr":
            out[name] = float(spearmanr(predictions, labels)[0]) if np.std(predictions) > 0 else 0.0
    if not get_spec(task_name).is_regression:
        out["majority_share"] = float(np.unique(predictions, return_counts=True)[1].max() / len(predictions))
    return out


class Glue(Task):
    """A GLUE task: sequence classification (STS-B: regression), metrics of the hub's glue metric."""

    group = "glue"
    model_kind = "seq_cls"

    def __init__(self, task_cfg, data_cfg):
        super().__init__(task_cfg, data_cfg)
        self.spec = get_spec(task_cfg.name)
        self.name, self.num_labels, self.metric = self.spec.name, self.spec.num_labels, self.spec.metric

    def load(self, tokenizer) -> TaskData:
        d, spec = self.data_cfg, self.spec
        files: dict = {}
        splits = load_glue(spec.name, d.root, self.cfg.split_protocol, files)

        def fn(batch):
            return tokenizer(*[batch[k] for k in spec.text_keys], truncation=True, max_length=d.max_length,
                             padding="max_length" if d.pad_to_max_length else False)

        key = [tokenizer.name_or_path, len(tokenizer), d.max_length, d.pad_to_max_length, spec.text_keys]
        tok = lambda ds: tokenize(ds, fn, list(spec.text_keys), spec.name, key, cache_dir(d.cache_dir))  # noqa: E731
        train = tok(subset(splits.pop("train"), d.max_train_samples))
        evals = {name: tok(subset(ds, d.max_eval_samples)) for name, ds in splits.items()}
        self.collator = DataCollatorWithPadding(tokenizer)
        return TaskData(train, evals, self.collator, {"split_protocol": self.cfg.split_protocol, "data_files": files})

    def eval_loader(self, split, batch_size):
        return eval_loader(split, self.collator, batch_size)

    @torch.no_grad()
    def evaluate(self, model, loader, device):
        was_training = model.training
        model.eval()
        logits, labels = [], []
        for batch in loader:
            labels.append(batch.pop("labels").numpy())
            logits.append(model(**self.inputs(batch, device)).logits.float().cpu().numpy())
        model.train(was_training)
        logits, labels = np.concatenate(logits), np.concatenate(labels)
        preds = logits[:, 0] if self.spec.is_regression else logits.argmax(-1)
        return glue_metrics(self.name, preds, labels)
