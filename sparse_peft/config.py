"""Typed schemas for the config nodes: a typo'd key or a wrong type fails at start, not deep in training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparse_peft import UserError
from sparse_peft.methods import method_config
from sparse_peft.schedulers import check_scheduler
from sparse_peft.schema import check_positive, typed
from sparse_peft.tasks import task_config


@dataclass
class TrainerConfig:
    seed: int = 42
    epochs: float = 3.0
    max_steps: int = -1  # -1: use epochs
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    grad_accum: int = 1
    eval_every: int = -1  # steps; -1: at the end of every epoch
    save_every: int = -1  # steps; -1: at the end of every epoch (resume checkpoint)
    select: str = "best"  # which checkpoint metrics.json reports: best (by the task's selection metric) | last
    output_dir: Optional[str] = None  # null: Hydra's run dir
    overwrite: bool = False
    resume: bool = True  # continue from <output_dir>/checkpoints/last when it exists
    keep_checkpoints: bool = False  # keep checkpoints/ after a completed run
    device: str = "auto"  # auto | cpu | cuda
    progress_bar: bool = True
    num_threads: int = 0  # torch intra-op threads; 0: torch's default
    fused_adamw: bool = True  # torch's fused AdamW kernel (same update, rounding aside); false: its per-tensor loop
    dry_run: bool = False  # print what would run (or is complete) and stop; also `--dry-run`
    CHOICES: ClassVar[dict] = {"select": ("best", "last"), "device": ("auto", "cpu", "cuda")}


@dataclass
class DataConfig:
    root: Optional[str] = None  # local data dir; null: $SPARSE_PEFT_DATA, else the Hugging Face hub
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    max_length: int = 128
    pad_to_max_length: bool = False  # false: dynamic padding per batch
    group_by_length: bool = True  # training batches of similar length (shuffled mega-batches), as HF's group_by_length
    cache_dir: Optional[str] = None  # tokenised datasets; null: $HF_DATASETS_CACHE/sparse_peft
    num_workers: int = 0


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "sparse_peft"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ModelConfig:
    name: str = "minilm"
    source: str = "package"  # package (weights inside a pip package) | hub | random (init from `config`)
    path: str = ""  # package name, hub id or local dir
    tokenizer: Optional[str] = None  # same syntax as path; null: same as path
    arch: Optional[str] = None  # random init: a transformers model_type (bert, deberta-v2, ...)
    config: dict = field(default_factory=dict)  # random init: config kwargs
    modules: dict = field(default_factory=dict)  # role -> module-name pattern (query, key, ..., ffn_out)
    head_modules: list = field(default_factory=lambda: ["classifier", "pooler"])  # decoders (causal LM): []
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (bfloat16 where the GPU supports it)
    gguf_file: Optional[str] = None  # weights and tokenizer from this GGUF file in the package / dir (`gguf` package)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower steps
    CHOICES: ClassVar[dict] = {"source": ("package", "hub", "random"),
                               "dtype": ("float32", "bfloat16", "float16", "auto")}


@dataclass
class SchedulerConfig:
    name: str = "none"  # none | linear | log_linear | exp_linear (SoRA's xi stages) | cubic (PST's sparsity per step)
    max_lambda: float = 7e-4
    lambda_num: int = 7
    stage_epochs: float = 15.0
    restart_lr: bool = True
    train_subset: int = 1000
    initial_warmup: float = 0.1  # cubic: fraction of steps at value 0
    final_warmup: float = 0.3  # cubic: fraction of steps at the target at the end


@dataclass
class RunConfig:
    trainer: TrainerConfig
    data: DataConfig
    logger: LoggerConfig
    model: ModelConfig
    task: Any  # the task family's dataclass, see sparse_peft.tasks
    scheduler: SchedulerConfig
    method: Any  # the method's own dataclass, see sparse_peft.methods


PRESET_KEYS = ("per_method", "per_task", "per_method_task")


def apply_presets(cfg: DictConfig, overrides: Optional[list[str]] = None) -> DictConfig:
    """Experiment presets hold values that depend on the job's method or task: `per_method.<method>`,
    `per_task.<task>` and `per_method_task.<method>@<task>` are partial configs (e.g. each method's learning rate
    per task in one sweep), merged over the composed config in that order; `<method>` is the method's `label`
    (`lora_r4`, `sora_gates_only`) when the preset has an entry for it, else its name. The result is what the run uses and saves. A
    value set on the command line (`overrides`, default: Hydra's for this job) wins over the preset's, so
    `method.lora_r=4` means r 4."""
    label, name, task = cfg.method.get("label"), cfg.method.name, cfg.task.name

    def entry(node, key):  # a variant's own entry, else its method's
        node = cfg.get(node) or {}
        return node.get(key.format(label)) if label and key.format(label) in node else node.get(key.format(name))

    layers = [entry("per_method", "{}"), (cfg.get("per_task") or {}).get(task), entry("per_method_task", f"{{}}@{task}")]
    layers = [layer for layer in layers if layer]
    if not layers:
        return cfg
    base = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in PRESET_KEYS])
    try:
        merged = OmegaConf.merge(base, *layers)
    except OmegaConfBaseException as e:
        raise UserError(f"config `per_method`/`per_task`/`per_method_task`: {str(e).splitlines()[0]}") from None
    absent = object()
    for key in _value_override_keys(job_overrides() if overrides is None else overrides):
        value = OmegaConf.select(cfg, key, default=absent)
        # `method=lora` picks a group (the preset still applies to it); `per_method.*` is the preset itself
        if not isinstance(value, DictConfig) and OmegaConf.select(merged, key, default=absent) is not absent:
            OmegaConf.update(merged, key, value, merge=False)
    return merged


def job_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _value_override_keys(overrides: list[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.key_or_group for o in parsed
            if not o.is_delete() and "/" not in o.key_or_group and not o.key_or_group.startswith("hydra.")]


def load_run_config(cfg: DictConfig) -> RunConfig:
    run = RunConfig(
        trainer=typed(cfg.get("trainer"), TrainerConfig, "trainer"),
        data=typed(cfg.get("data"), DataConfig, "data"),
        logger=typed(cfg.get("logger"), LoggerConfig, "logger"),
        model=typed(cfg.get("model"), ModelConfig, "model"),
        task=task_config(cfg.get("task")),
        scheduler=typed(cfg.get("scheduler"), SchedulerConfig, "scheduler"),
        method=method_config(cfg.get("method")),
    )
    t = run.trainer
    check_positive("trainer", batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, lr=t.lr, grad_accum=t.grad_accum)
    if t.max_steps <= 0:
        check_positive("trainer", epochs=t.epochs)
    if not 0 <= t.warmup_ratio < 1:
        raise UserError(f"config `trainer.warmup_ratio` must be in [0, 1), got {t.warmup_ratio}")
    check_positive("data", max_length=run.data.max_length)
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(run.data, key)
        if value is not None and value < 1:
            raise UserError(f"config `data.{key}` must be >= 1 (or null for all examples), got {value}")
    if run.logger.wandb.mode not in ("offline", "online", "disabled"):
        raise UserError(f"config `logger.wandb.mode={run.logger.wandb.mode}` is not one of offline, online, disabled")
    check_scheduler(run)
    return run
