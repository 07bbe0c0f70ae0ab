"""Commonsense reasoning in the LLM-Adapters format: eight multiple-choice tasks posed as instructions to a causal
LM that answers "the correct answer is <label>".

Data: `<root>/commonsense/<dir>/{train,test}.json`, each a JSON list of `{instruction, input, output, answer}`
(LLM-Adapters' `dataset/` folder); `commonsense/all` trains on `<root>/commonsense_170k.json` (or
`<root>/commonsense/commonsense_170k.json`) when present, otherwise on the union of the per-task training files
that exist, and evaluates every task that has a test file.

Protocol (recorded in metrics.json under `protocol`):
- prompt: LLM-Adapters' Alpaca template (`PROMPT`, id `TEMPLATE_ID`); the training target is the record's
  `output` followed by EOS; loss on prompt + response (`train_on_inputs`, the reference default) or the response
  only. A training example longer than `data.max_length` loses tokens from the start of its prompt (after BOS), so
  that the answer is always trained on (the reference cuts the end at 256 tokens, dropping the answer).
- `eval_mode=generate`: greedy (`num_beams=1`) or beam search, `max_new_tokens` (reference 32), left padding with
  the attention mask and position ids from it; the answer is the first match of the task's rule in the generated
  text (`extract_answer`: case-sensitive, "" when none), accuracy = exact match with `answer`.
- `eval_mode=loglik`: the log-likelihood of the response "the correct answer is <label>" after the prompt for every
  label the item's "Answer format:" line lists; the best wins. `loglik_norm`: sum | mean (per token) | char (per
  character, lm-evaluation-harness's acc_norm). One forward per item when the labels differ only in their last
  token (the usual case), else one per label.
- validation (checkpoint selection): `val_set_size` examples held out of the (mixed) training set, as LLM-Adapters
  (120), scored by `val_eval_mode` (default loglik: cheap).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import torch
from torch.utils.data import DataLoader

from sparse_peft import UserError
from sparse_peft.models import prepare_causal_tokenizer
from sparse_peft.tasks.base import Task, TaskData
from sparse_peft.tasks.glue import data_root
from sparse_peft.tasks.loaders import cache_dir, tokenize

log = logging.getLogger("sparse_peft")

TEMPLATE_ID = "llm_adapters_alpaca"
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
          "\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
RESPONSE = "the correct answer is {answer}"  # the records' `output`; loglik scores it per label

# Answer-extraction rules: the first match in the generated text is the prediction.
RULES = {
    "true_false": ("true", "false"),
    "solution": ("solution1", "solution2"),
    "answer": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ending": ("ending1", "ending2", "ending3", "ending4"),
    "option": ("option1", "option2"),
}


@dataclass(frozen=True)
class Spec:
    name: str
    dir: str  # directory under <root>/commonsense
    rule: str  # key of RULES


TASKS = {s.name: s for s in [
    Spec("boolq", "boolq", "true_false"), Spec("piqa", "piqa", "solution"), Spec("siqa", "social_i_qa", "answer"),
    Spec("hellaswag", "hellaswag", "ending"), Spec("winogrande", "winogrande", "option"),
    Spec("arc_e", "ARC-Easy", "answer"), Spec("arc_c", "ARC-Challenge", "answer"), Spec("obqa", "openbookqa", "answer"),
]}
MIXED_FILE = "commonsense_170k.json"


def format_prompt(instruction: str, input: str = "") -> str:
    return PROMPT_WITH_INPUT.format(instruction=instruction, input=input) if input else PROMPT.format(instruction=instruction)


def extract_answer(rule: str, text: str) -> str:
    """The first label of `rule` that occurs in `text` (case-sensitive), or "" when none does."""
    m = re.search("|".join(RULES[rule]), text)
    return m.group(0) if m else ""


def rule_of_answer(answer: str) -> Optional[str]:
    return next((r for r, labels in RULES.items() if answer in labels), None)


def candidates(rule: str, instruction: str) -> list[str]:
    """The labels an item offers: its "Answer format: a/b/c" line, else every label of the rule."""
    m = re.search(r"Answer format:\s*([\w/]+)", instruction)
    listed = [x for x in m.group(1).split("/") if x in RULES[rule]] if m else []
    return listed if len(listed) >= 2 else list(RULES[rule])


def read_records(path: Path, task: Optional[str] = None) -> list[dict]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-copy it from LLM-Adapters") from None
    if not isinstance(rows, list) or any(not isinstance(r, dict) or "instruction" not in r or "answer" not in r
                                         for r in rows):
        raise UserError(f"{path}: expected a JSON list of {{instruction, input, output, answer}} records")
    out = []
    for i, r in enumerate(rows):
        rule = TASKS[task].rule if task else rule_of_answer(r["answer"])
        if rule is None:
            raise UserError(f"{path}: record {i} has answer `{r['answer']}`, not a label of any task")
        out.append({"instruction": r["instruction"], "input": r.get("input") or "",
                    "output": r.get("output") or RESPONSE.format(answer=r["answer"]), "answer": r["answer"],
                    "rule": rule, "task": task or ""})
    return out


def _seeded_perm(n: int, seed: int = 42) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _subset(rows: list, n: Optional[int]) -> list:
    return rows if n is None or n >= len(rows) else [rows[i] for i in _seeded_perm(len(rows))[:n]]


# ---- evaluation sets and their loaders -----------------------------------------------------------------------
@dataclass
class EvalSet:
    items: list[dict]  # prompt_ids, answer, rule, labels
    mode: str  # generate | loglik


@dataclass
class EvalBatches:
    """What `Commonsense.evaluate` consumes: the items, how they are scored, and the evaluation batch size (a batch
    holds up to `batch_size` sequences)."""
    items: list[dict]
    mode: str
    batch_size: int


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        else:
            ids[i, n - len(s):], mask[i, n - len(s):] = torch.tensor(s), 1
    return ids, mask


class CausalCollator:
    """Training batches: right padding (positions 0.. for every example), padded labels -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        ids, mask = pad_batch([list(map(int, f["input_ids"])) for f in features], self.pad_id)
        labels, _ = pad_batch([list(map(int, f["labels"])) for f in features], -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---- the task ------------------------------------------------------------------------------------------------
class Commonsense(Task):
    group = "commonsense"
    model_kind = "causal_lm"
    metric = "accuracy"
    model_inputs = ("input_ids", "attention_mask", "labels")

    def __init__(self, task_cfg, data_cfg):
        super().__init__(task_cfg, data_cfg)
        if task_cfg.name != "all" and task_cfg.name not in TASKS:
            raise UserError(f"unknown commonsense task `{task_cfg.name}`; choose task=commonsense/<name> with name in "
                            f"{sorted(TASKS) + ['all']}")
        if task_cfg.num_beams < 1 or task_cfg.max_new_tokens < 1 or task_cfg.val_set_size < 0:
            raise UserError("config `task.num_beams` and `task.max_new_tokens` must be >= 1, `task.val_set_size` >= 0")
        self.name = task_cfg.name
        self.tokenizer = None

    # -- data ------------------------------------------------------------------------------------------------
    def _root(self) -> Path:
        root = data_root(self.data_cfg.root)
        if root is None:
            raise UserError("commonsense data is read from local files: set data.root or SPARSE_PEFT_DATA to a directory "
                            "holding commonsense/<task>/{train,test}.json (LLM-Adapters' dataset/ folder)")
        return root

    def _file(self, root: Path, task: str, split: str) -> Path:
        return root / "commonsense" / TASKS[task].dir / f"{split}.json"

    def _train_records(self, root: Path) -> tuple[list[dict], dict]:
        if self.name != "all":
            path = self._file(root, self.name, "train")
            if not path.is_file():
                raise UserError(f"no training file for commonsense/{self.name}: {path} is missing; add it, or train on "
                                f"the mixed set with task=commonsense/all")
            return read_records(path, self.name), {"train_files": [str(path)]}
        for mixed in (root / MIXED_FILE, root / "commonsense" / MIXED_FILE):
            if mixed.is_file():
                log.info("commonsense/all: training on %s", mixed)
                return read_records(mixed), {"train_source": "commonsense_170k", "train_files": [str(mixed)]}
        files = {t: self._file(root, t, "train") for t in TASKS}
        present = {t: p for t, p in files.items() if p.is_file()}
        if not present:
            raise UserError(f"commonsense/all: neither {MIXED_FILE} nor any commonsense/<task>/train.json under {root}")
        missing = sorted(set(files) - set(present))
        log.warning("commonsense/all: %s not found; training on the union of the per-task training files of %s "
                    "(missing: %s)", MIXED_FILE, sorted(present), missing)
        records = [r for t, p in present.items() for r in read_records(p, t)]
        return records, {"train_source": "union_of_task_train_files", "train_tasks": sorted(present),
                         "train_tasks_missing": missing, "train_files": [str(p) for p in present.values()]}

    def _test_records(self, root: Path) -> tuple[dict[str, list[dict]], dict]:
        names = list(TASKS) if self.name == "all" else [self.name]
        out, skipped = {}, []
        for t in names:
            path = self._file(root, t, "test")
            if path.is_file():
                out[t] = read_records(path, t)
            elif self.name == "all":
                skipped.append(t)
                log.warning("commonsense/all: %s has no test file (%s); skipped", t, path)
            else:
                raise UserError(f"no test file for commonsense/{t}: {path} is missing; add LLM-Adapters' "
                                f"dataset/{TASKS[t].dir}/test.json there")
        return out, ({"test_tasks": sorted(out), "test_tasks_skipped": skipped} if self.name == "all" else {})

    def load(self, tokenizer) -> TaskData:
        d, c = self.data_cfg, self.cfg
        self.tokenizer = prepare_causal_tokenizer(tokenizer)
        root = self._root()
        train, info = self._train_records(root)
        tests, test_info = self._test_records(root)
        perm = _seeded_perm(len(train))  # validation: a fixed slice of the training set, as LLM-Adapters
        if c.val_set_size >= len(train):
            raise UserError(f"task.val_set_size={c.val_set_size} leaves no training data ({len(train)} examples)")
        val = [train[i] for i in perm[:c.val_set_size]]
        train = _subset([train[i] for i in perm[c.val_set_size:]], d.max_train_samples)
        train_ds = self._tokenize_train(train)
        self.collator = CausalCollator(tokenizer.pad_token_id)
        evals = {"validation": self._eval_set(_subset(val, d.max_eval_samples), c.val_eval_mode)}
        test_sets = {t: self._eval_set(_subset(rows, d.max_eval_samples), c.eval_mode) for t, rows in tests.items()}
        evals["test"] = test_sets if self.name == "all" else test_sets[self.name]
        return TaskData(train_ds, evals, self.collator, {**info, **test_info, "protocol": self.info()})

    def _tokenize_train(self, records: list[dict]) -> datasets.Dataset:
        tok, max_len, on_inputs = self.tokenizer, self.data_cfg.max_length, self.cfg.train_on_inputs
        bos = 1 if tok.bos_token_id is not None and tok("x").input_ids[:1] == [tok.bos_token_id] else 0

        def fn(batch):
            prompts = tok([format_prompt(i, x) for i, x in zip(batch["instruction"], batch["input"])]).input_ids
            responses = tok(batch["output"], add_special_tokens=False).input_ids
            ids, labels = [], []
            for p, r in zip(prompts, responses):
                r = (r + [tok.eos_token_id])[:max_len - bos - 1]
                room = max_len - len(r)
                p = p if len(p) <= room else p[:bos] + p[len(p) - (room - bos):]  # drop the prompt's start
                ids.append(p + r)
                labels.append((p if on_inputs else [-100] * len(p)) + r)
            return {"input_ids": ids, "labels": labels}

        ds = datasets.Dataset.from_list([{k: r[k] for k in ("instruction", "input", "output")} for r in records])
        key = [tok.name_or_path, len(tok), max_len, on_inputs, TEMPLATE_ID, RESPONSE]
        return tokenize(ds, fn, ["instruction", "input", "output"], f"commonsense-{self.name}", key,
                        cache_dir(self.data_cfg.cache_dir))

    def _eval_set(self, records: list[dict], mode: str) -> EvalSet:
        prompts = self.tokenizer([format_prompt(r["instruction"], r["input"]) for r in records]).input_ids if records else []
        return EvalSet([{"prompt_ids": p, "answer": r["answer"], "rule": r["rule"],
                         "labels": candidates(r["rule"], r["instruction"])} for p, r in zip(prompts, records)], mode)

    # -- evaluation -------------------------------------------------------------------------------------------
    def eval_loader(self, split, batch_size):
        if isinstance(split, dict):  # commonsense/all: one set per task
            return {t: EvalBatches(s.items, s.mode, batch_size) for t, s in split.items()}
        return EvalBatches(split.items, split.mode, batch_size)

    def info(self) -> dict:
        c = self.cfg
        scoring = {"generate": {"mode": "generate", "decoding": "greedy" if c.num_beams == 1 else "beam",
                                "num_beams": c.num_beams, "max_new_tokens": c.max_new_tokens, "do_sample": False,
                                "extraction": "first regex match of the task's labels, case-sensitive, '' if none"},
                   "loglik": {"mode": "loglik", "normalisation": c.loglik_norm, "continuation": RESPONSE,
                              "labels": "the item's 'Answer format:' list"}}
        return {"prompt_template": TEMPLATE_ID, "train_on_inputs": c.train_on_inputs, "eos_appended": True,
                "truncation": "prompt start (after BOS), response kept", "test_scoring": scoring[c.eval_mode],
                "validation_scoring": scoring[c.val_eval_mode], "val_set_size": c.val_set_size}

    def evaluate(self, model, loader, device) -> dict[str, float]:
        """`{"accuracy"}`; for commonsense/all's test split `{"accuracy": mean over tasks, "<task>_accuracy"...}`.
        The validation split is scored by `val_eval_mode`, the test split by `eval_mode`; a plain DataLoader of
        training batches (a staged scheduler's probe) gets teacher-forced token accuracy."""
        if isinstance(loader, DataLoader):
            return {"accuracy": self._token_accuracy(model, loader, device)}
        if isinstance(loader, dict):
            per_task = {t: self._accuracy(model, b, device) for t, b in loader.items()}
            return {"accuracy": sum(per_task.values()) / max(len(per_task), 1),
                    **{f"{t}_accuracy": a for t, a in per_task.items()}}
        return {"accuracy": self._accuracy(model, loader, device)}

    def _accuracy(self, model, batches: EvalBatches, device) -> float:
        preds = self.predict(model, batches, device)
        return sum(p == it["answer"] for p, it in zip(preds, batches.items)) / max(len(preds), 1)

    @torch.no_grad()
    def predict(self, model, batches: EvalBatches, device, mode: Optional[str] = None) -> list[str]:
        """The predicted label of every item, in item order (batches run longest first: little padding)."""
        mode = mode or batches.mode
        was_training = model.training
        model.eval()
        try:
            if mode == "generate":
                return self._generate(model, batches, device)
            return self._loglik(model, batches, device)
        finally:
            model.train(was_training)

    def generate_texts(self, model, batches: EvalBatches, device) -> list[str]:
        c, tok, items = self.cfg, self.tokenizer, batches.items
        order = sorted(range(len(items)), key=lambda i: -len(items[i]["prompt_ids"]))
        texts: list[str] = [""] * len(items)
        for start in range(0, len(order), batches.batch_size):
            idx = order[start:start + batches.batch_size]
            ids, mask = pad_batch([items[i]["prompt_ids"] for i in idx], tok.pad_token_id, side="left")
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 num_beams=c.num_beams, max_new_tokens=c.max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            for i, seq in zip(idx, out[:, ids.shape[1]:].tolist()):
                texts[i] = tok.decode(seq, skip_special_tokens=True)
        return texts

    def _generate(self, model, batches, device) -> list[str]:
        return [extract_answer(it["rule"], t) for it, t in zip(batches.items, self.generate_texts(model, batches, device))]

    def _response_ids(self, label: str) -> list[int]:
        cache = self.__dict__.setdefault("_response_cache", {})
        if label not in cache:
            cache[label] = self.tokenizer(RESPONSE.format(answer=label), add_special_tokens=False).input_ids
        return cache[label]

    def _loglik(self, model, batches: EvalBatches, device) -> list[str]:
        """Rows of (item, token ids, number of trailing tokens scored, next-token choices): one row per item when its
        labels' responses share all tokens but the last, else one row per label."""
        items, norm = batches.items, self.cfg.loglik_norm
        rows = []  # (item index, ids, n_scored, [(label index, token)] or label index)
        for i, it in enumerate(items):
            resp = [self._response_ids(lab) for lab in it["labels"]]
            common = resp[0][:-1]
            if all(len(r) == len(resp[0]) and r[:-1] == common for r in resp):
                rows.append((i, it["prompt_ids"] + common, len(common), [(j, r[-1]) for j, r in enumerate(resp)]))
            else:
                rows += [(i, it["prompt_ids"] + r, len(r), j) for j, r in enumerate(resp)]
        scores = [[0.0] * len(it["labels"]) for it in items]
        order = sorted(range(len(rows)), key=lambda k: -len(rows[k][1]))
        for start in range(0, len(order), batches.batch_size):
            batch = [rows[k] for k in order[start:start + batches.batch_size]]
            ids, mask = pad_batch([r[1] for r in batch], self.tokenizer.pad_token_id, side="left")
            keep = max(r[2] for r in batch) + 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=position_ids.to(device), logits_to_keep=keep).logits[:, -keep:]
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()  # (B, keep, V)
            for b, (i, seq, n, choice) in enumerate(batch):
                # token at position L-n+m is predicted by logits index keep-n-1+m
                targets = torch.tensor(seq[len(seq) - n:], dtype=torch.long)
                s = float(logp[b, keep - n - 1:keep - 1].gather(-1, targets[:, None]).sum()) if n else 0.0
                if isinstance(choice, list):
                    for j, t in choice:
                        scores[i][j] = s + float(logp[b, keep - 1, t])
                else:
                    scores[i][choice] = s
        preds = []
        for it, sc in zip(items, scores):
            if norm == "mean":
                sc = [s / len(self._response_ids(lab)) for s, lab in zip(sc, it["labels"])]
            elif norm == "char":
                sc = [s / len(RESPONSE.format(answer=lab)) for s, lab in zip(sc, it["labels"])]
            preds.append(it["labels"][max(range(len(sc)), key=sc.__getitem__)])
        return preds

    @torch.no_grad()
    def _token_accuracy(self, model, loader, device) -> float:
        was_training = model.training
        model.eval()
        right = total = 0
        for batch in loader:
            batch = self.inputs(batch, device)
            pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].argmax(-1)
            labels = batch["labels"][:, 1:]
            right += int(((pred == labels) & (labels != -100)).sum())
            total += int((labels != -100).sum())
        model.train(was_training)
        return right / max(total, 1)
