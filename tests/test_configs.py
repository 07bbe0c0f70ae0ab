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
    assert options("task") == [f"glue/{t}" for t in sorted(["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"])]


def test_hub_models_share_the_role_names():
    for name in options("model"):
        run = load_run_config(make_cfg([f"model={name}"]))
        assert set(run.model.modules) == {"query", "key", "value", "attn_out", "ffn_in", "ffn_out"}, name
