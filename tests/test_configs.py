"""Every config file composes and passes its schema; defaults are the documented ones."""
import pytest

from conftest import CONFIGS, make_cfg
from sparse_peft.config import load_run_config


def options(group):
    return sorted(str(p.relative_to(CONFIGS / group).with_suffix("")) for p in (CONFIGS / group).rglob("*.yaml"))


@pytest.mark.parametrize("group", ["method", "model", "task", "scheduler"])
def test_every_option_composes(group):
    assert options(group)
    for name in options(group):
        # the xi schedules need a method with a threshold; cubic a method with a sparsity target
        extra = [f"method={'pst' if name == 'cubic' else 'sora'}"] if group == "scheduler" else []
        run = load_run_config(make_cfg([f"{group}={name}", *extra]))
        node = getattr(run, group)  # the option's own file was composed and typed, not a default
        composed = {"task": lambda: f"{node.group}/{node.name}", "method": lambda: node.label or node.name}
        assert composed.get(group, lambda: node.name)() == name


def test_defaults():
    run = load_run_config(make_cfg([]))
    assert (run.method.name, run.model.name, run.task.name, run.scheduler.name) == ("lora", "minilm", "rte", "none")
    assert run.logger.wandb.mode == "offline" and run.data.pad_to_max_length is False
    assert list(run.method.target_modules) == ["query", "key", "value", "attn_out", "ffn_in", "ffn_out"]


def test_all_nine_glue_tasks_have_configs():
    glue = [f"glue/{t}" for t in sorted(["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"])]
    assert [o for o in options("task") if o.startswith("glue/")] == glue


def test_commonsense_tasks_have_configs():
    names = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa", "all"]
    assert [o for o in options("task") if o.startswith("commonsense/")] == sorted(f"commonsense/{t}" for t in names)
    for name in names:
        run = load_run_config(make_cfg([f"task=commonsense/{name}", "model=smollm2"]))
        assert (run.task.group, run.task.name, run.task.eval_mode, run.task.train_on_inputs) == \
            ("commonsense", name, "generate", True)
        assert run.model.head_modules == [] and run.model.gguf_file


def test_lora_ist_targets_preset():
    run = load_run_config(make_cfg(["+experiment=lora_ist_targets", "model=smollm2"]))
    assert list(run.method.target_modules) == ["query", "key", "value", "ffn_in", "ffn_out"]
    assert (run.method.lora_r, run.method.lora_alpha, run.task.name, run.data.max_length) == (32, 64, "all", 256)


def test_hub_models_share_the_role_names():
    for name in options("model"):
        run = load_run_config(make_cfg([f"model={name}"]))
        assert set(run.model.modules) == {"query", "key", "value", "attn_out", "ffn_in", "ffn_out"}, name
