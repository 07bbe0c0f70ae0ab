"""Every bad input gets one `error:` line, exit code 2, no traceback, no metrics.json; a faulty file is named.

The README's bad-input table is this list's output: `UPDATE_BAD_INPUT_TABLE=1 python -m pytest
tests/test_bad_input.py` rewrites it, and without the variable the test fails when the two differ.
"""
import json
import os
import re
import shutil

import pytest

from conftest import REPO, fast_overrides, make_cfg, train_cli
from sparse_peft import UserError
from sparse_peft.train import train

README = REPO / "README.md"
START, END = "<!-- bad-input:start -->", "<!-- bad-input:end -->"


def copy_task(data, root, task="rte"):
    shutil.copytree(data / "glue" / task, root / "glue" / task)
    return root


def header_only(data, root, split):
    root = copy_task(data, root)
    path = root / "glue" / "rte" / f"{split}.tsv"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    return root


def binary_tsv(data, root):
    root = copy_task(data, root)
    (root / "glue" / "rte" / "train.tsv").write_bytes(bytes(range(256)) * 4)
    return root


def corrupt_parquet(data, root):
    root = copy_task(data, root)
    (root / "glue" / "rte" / "train.parquet").write_bytes(b"PAR1 this is not a parquet file")
    return root


def malformed_row(data, root):
    root = copy_task(data, root)
    with open(root / "glue" / "rte" / "train.tsv", "a") as f:
        f.write("999\tonly two fields\n")
    return root


def bad_label(data, root):
    root = copy_task(data, root)
    with open(root / "glue" / "rte" / "validation.tsv", "a") as f:
        f.write("999\tA\tB\tmaybe\n")
    return root


def boolq_only(data, root):
    (root / "commonsense" / "boolq").mkdir(parents=True)
    record = {"instruction": "Is it? Answer format: true/false", "input": "", "output": "the correct answer is true",
              "answer": "true"}
    for split in ("train", "test"):
        (root / "commonsense" / "boolq" / f"{split}.json").write_text(json.dumps([record] * 4))
    return root


# (case, overrides, data set-up or None, message: a regex the whole error line must match)
CASES = [
    ("unknown method", ["method=nope"], None, r"unknown method `nope`; choose method=<name> with name in \[.*\]"),
    ("unknown task", ["task=glue/nope"], None, r"unknown task `glue/nope`; choose task=<name> with name in \[.*\]"),
    ("unknown model", ["model=nope"], None, r"unknown model `nope`; choose model=<name> with name in \[.*\]"),
    ("unknown experiment", ["+experiment=nope"], None, r"Could not find 'experiment/nope'; choose one of \[.*\]"),
    ("misspelt key", ["trainer.lrr=1"], None,
     r"config `trainer.lrr`: no such key; check its spelling .*"),
    ("wrong type", ["trainer.batch_size=abc"], None, r"config `trainer.batch_size`: Value 'abc' .*"),
    ("negative lr", ["trainer.lr=-1"], None, r"config `trainer.lr` must be > 0, got -1.0"),
    ("warmup ratio out of range", ["trainer.warmup_ratio=1.5"], None,
     r"config `trainer.warmup_ratio` must be in \[0, 1\), got 1.5"),
    ("unknown split protocol", ["task.split_protocol=other"], None,
     r"config `task.split_protocol=other` is not one of \['glue', 'sora'\]"),
    ("no training examples", ["data.max_train_samples=0"], None,
     r"config `data.max_train_samples` must be >= 1 \(or null for all examples\), got 0"),
    ("negative sample count", ["data.max_train_samples=-5"], None, r"config `data.max_train_samples` must be >= 1 .*"),
    ("no evaluation examples", ["data.max_eval_samples=0"], None, r"config `data.max_eval_samples` must be >= 1 .*"),
    ("LoRA rank 0", ["method=lora", "method.lora_r=0"], None, r"config `method.lora_r` must be >= 1, got 0"),
    ("LoRA dropout 1.5", ["method=lora", "method.lora_dropout=1.5"], None,
     r"config `method.lora_dropout` must be in \[0, 1\), got 1.5"),
    ("adapter bottleneck 0", ["method=adapter", "method.adapter_size=0"], None,
     r"config `method.adapter_size` \(bottleneck width\) must be >= 1, got 0"),
    ("adapter activation", ["method=adapter", "method.non_linearity=foo"], None,
     r"config `method.non_linearity=foo` is not one of .*"),
    ("SoRA negative threshold", ["method=sora", "method.sparse_lambda_2=-1"], None,
     r"config `method.sparse_lambda_2` must be >= 0, got -1.0"),
    ("SoRA mode", ["method=sora", "method.mode=other"], None,
     r"config `method.mode=other` is not one of proximal, reference"),
    ("SoRA gate lr 0", ["method=sora", "method.sparse_lr=0"], None,
     r"config `method.sparse_lr` must be > 0 \(or null = trainer.lr\), got 0.0"),
    ("AdaLoRA target above init", ["method=adalora", "method.target_r=20"], None,
     r"config `method.target_r` must be in \[1, init_r=12\], got 20"),
    ("AdaLoRA phases overlap", ["method=adalora", "method.tinit_ratio=0.6", "method.tfinal_ratio=0.5"], None,
     r"config `method.tinit_ratio` and `method.tfinal_ratio` must be >= 0 and sum to < 1"),
    ("scheduler without a threshold", ["method=lora", "scheduler=linear"], None,
     r"scheduler=linear drives a sparsity threshold in stages; method=lora has none .*"),
    ("exp_linear from 0", ["method=sora", "scheduler=exp_linear", "method.sparse_lambda_2=0"], None,
     r"scheduler=exp_linear needs method.sparse_lambda_2 > 0 .*"),
    ("cubic schedule without a sparsity target", ["method=sora", "scheduler=cubic"], None,
     r"scheduler=cubic drives a sparsity target every step; method=sora has none .*"),
    ("cubic warmups overlap", ["method=pst", "scheduler=cubic", "scheduler.initial_warmup=0.6",
                               "scheduler.final_warmup=0.5"], None,
     r"config `scheduler.initial_warmup` \(>= 0\) \+ `scheduler.final_warmup` \(> 0: .*\) must be < 1 together, "
     r"got 0.6 \+ 0.5"),
    ("PST sparsity 1", ["method=pst", "method.sparsity=1.0"], None,
     r"config `method.sparsity` must be in \[0, 1\) \(the fraction of zero weights\), got 1.0"),
    ("PST rank 0", ["method=pst", "method.rank=0"], None, r"config `method.rank` must be >= 1, got 0"),
    ("SparseAdapter sparsity 1", ["method=sparse_adapter", "method.sparsity=1.0"], None,
     r"config `method.sparsity` is the fraction of adapter weights removed and must be in .*, got 1.0.*"),
    ("SparseAdapter unknown pruner", ["method=sparse_adapter", "method.pruner=nope"], None,
     r"config `method.pruner=nope` is not one of \['rand', 'mag', 'snip', 'grasp', 'synflow'\]"),
    ("IST more layers than the model has", ["method=ist", "method.n_update=5"], None,
     r"config `method.n_update=5` must be in \[1, 2\]: the model has 2 .*"),
    ("IST around a method without layers", ["method=ist", "method.base=full"], None,
     r"config `method.base=full` has no per-layer parameters; choose one of \[.*\]"),
    ("commonsense task without its file", ["model=tiny_llama", "task=commonsense/hellaswag"], boolq_only,
     r"no training file for commonsense/hellaswag: <data>/commonsense/hellaswag/train.json is missing; .*"),
    ("missing data dir", ["data.root=/nonexistent"], None, r"data directory /nonexistent/glue/rte does not exist; .*"),
    ("header-only training file", [], lambda d, r: header_only(d, r, "train"),
     r"<data>/glue/rte/train.tsv: no data rows \(a header alone\); re-copy the file"),
    ("header-only validation file", [], lambda d, r: header_only(d, r, "validation"),
     r"<data>/glue/rte/validation.tsv: no data rows \(a header alone\); re-copy the file"),
    ("binary file as TSV", [], binary_tsv, r"<data>/glue/rte/train.tsv: not a UTF-8 text file .*"),
    ("corrupt parquet beside a TSV", [], corrupt_parquet,
     r"<data>/glue/rte/train.parquet: not a readable parquet file \(\w+\); remove it to use train.tsv beside it"),
    ("malformed row", [], malformed_row, r"<data>/glue/rte/train.tsv:42: malformed row with 2 fields, expected 4 .*"),
    ("unknown label", [], bad_label, r"<data>/glue/rte/validation.tsv:22: label `maybe` is not one of .*"),
    ("hub model offline", ["model=bert_base"], None, r"model `bert_base` \(google-bert/bert-base-uncased\) could not be loaded: .*"),
    ("diverged run", ["method=full", "trainer.lr=1e30", "trainer.max_grad_norm=0", "trainer.max_steps=10",
                      "trainer.save_every=1"], None,
     r"(loss is nan at step \d+|parameters became non-finite at step \d+ .*); .*trainer.overwrite=true.*"),
]
CLI_ONLY = {"unknown method", "unknown task", "unknown model", "unknown experiment", "misspelt key"}


def error_line(tmp_path, tiny_glue, overrides, setup) -> tuple[str, int, str]:
    """(the error line with paths made generic, exit code, stderr) of one case."""
    data = setup(tiny_glue, tmp_path / "data") if setup else tiny_glue
    out = tmp_path / "out"
    args = [*fast_overrides(out, data, *overrides), f"hydra.run.dir={tmp_path / 'hydra'}"]
    r = train_cli(*args)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    line = lines[-1] if lines else ""
    return line.replace(str(data), "<data>").replace(str(out), "<out>"), r.returncode, r.stderr


def in_process(tmp_path, tiny_glue, overrides, setup) -> str:
    data = setup(tiny_glue, tmp_path / "data") if setup else tiny_glue
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        train(make_cfg(fast_overrides(out, data, *overrides)))
    assert not (out / "metrics.json").exists()
    return f"error: {e.value}".replace(str(data), "<data>").replace(str(out), "<out>")


RESULTS: dict[str, str] = {}


@pytest.mark.parametrize("case, overrides, setup, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(tmp_path, tiny_glue, case, overrides, setup, message):
    if case in CLI_ONLY or case == "diverged run":  # the real command line: exit code, one line, no traceback
        line, code, stderr = error_line(tmp_path, tiny_glue, overrides, setup)
        assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
        assert len([ln for ln in stderr.splitlines() if ln.startswith("error: ")]) == 1
        assert not (tmp_path / "out" / "metrics.json").exists()
    else:  # the same UserError that main() prints as one line with exit code 2
        line = in_process(tmp_path, tiny_glue, overrides, setup)
    assert re.fullmatch("error: " + message, line), line
    if setup:
        assert "<data>/" in line  # the file at fault is named
    RESULTS[case] = line


def table() -> str:
    rows = ["| bad input | overrides | the one line on stderr (exit code 2, no metrics.json) |", "|---|---|---|"]
    for case, overrides, _, _ in CASES:
        line = RESULTS[case].replace("|", "\\|")
        line = re.sub(r"\(pid \d+\)", "(pid N)", line)
        args = f"`{' '.join(overrides)}`" if overrides else "(none: the data file is at fault)"
        rows.append(f"| {case} | {args} | `` {line} `` |")  # double backticks: the messages quote with backticks
    return "\n".join(rows)


def test_readme_table_matches_the_cases():
    if len(RESULTS) != len(CASES):
        pytest.skip("run with the cases above (the whole file) to compare the README table")
    text = README.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    current, expected = text[start:end].strip(), table()
    if os.environ.get("UPDATE_BAD_INPUT_TABLE"):
        README.write_text(text[:start] + "\n" + expected + "\n" + text[end:])
        return
    assert current == expected, "README bad-input table is stale: UPDATE_BAD_INPUT_TABLE=1 pytest tests/test_bad_input.py"
