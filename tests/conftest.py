"""Shared fixtures: config composition, a tiny GLUE directory written per session, the real data dir."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = Path(os.environ.get("SPARSE_PEFT_DATA") or REPO.parent / "shared" / "data")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying
os.environ.setdefault("WANDB_MODE", "disabled")

WORDS = "the a cat dog sat ran on under mat house big small red blue quickly slowly sees likes".split()


def sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, n)))


def write_tiny_glue(root: Path, rows: int = 40) -> Path:
    """Small GLUE TSVs in the original formats (header quirks included) for the fast tests."""
    rng = random.Random(0)
    specs = {
        "rte": ("index\tsentence1\tsentence2\tlabel", lambda i: f"{i}\t{sentence(rng)}\t{sentence(rng)}\t{rng.choice(['entailment', 'not_entailment'])}"),
        "sst2": ("sentence\tlabel", lambda i: f"{sentence(rng)}\t{rng.randint(0, 1)}"),
        "cola": (None, lambda i: f"src\t{rng.randint(0, 1)}\t*\t{sentence(rng)}"),
        "stsb": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                 lambda i: f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{sentence(rng)}\t{sentence(rng)}\t{rng.uniform(0, 5):.3f}"),
        "mrpc": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String", lambda i: f"{rng.randint(0, 1)}\t{i}\t{i + 1}\t{sentence(rng)}\t{sentence(rng)}"),
    }
    for task, (header, row) in specs.items():
        d = root / "glue" / task
        d.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", rows), ("validation", rows // 2)):
            lines = ([header] if header else []) + [row(i) for i in range(n)]
            (d / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    mnli = root / "glue" / "mnli"
    mnli.mkdir(parents=True, exist_ok=True)
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
    for split, n in (("train", rows), ("validation_matched", rows // 2), ("validation_mismatched", rows // 2)):
        lines = [header] + [f"{i}\t{i}\t{i}\tfiction\t{sentence(rng)}\t{sentence(rng)}\tneutral\t"
                            f"{rng.choice(['entailment', 'neutral', 'contradiction'])}" for i in range(n)]
        (mnli / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def hydra_outputs() -> set[Path]:
    return {p for d in ("outputs", "multirun") for p in (REPO / d).glob("**/.hydra*")}


@pytest.fixture(scope="session", autouse=True)
def no_hydra_output_in_the_repo():
    """A command-line run without `hydra.run.dir` writes its Hydra dir into the repo's outputs/ at every test run."""
    before = hydra_outputs()
    yield
    new = sorted(str(p.parent.relative_to(REPO)) for p in hydra_outputs() - before)
    assert not new, f"a test wrote Hydra output into the repo (give it hydra.run.dir under tmp_path): {new[:3]}"


@pytest.fixture(scope="session")
def tiny_glue(tmp_path_factory) -> Path:
    return write_tiny_glue(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "glue" / "rte" / "train.tsv").is_file():
        pytest.skip(f"real GLUE data not found at {SHARED_DATA} (set SPARSE_PEFT_DATA)")
    return SHARED_DATA


def make_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def train_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m sparse_peft.train ARGS` from the repo, offline; `env` sets variables (None unsets one)."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env or {})}
    full = {k: v for k, v in full.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "sparse_peft.train", *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=timeout)


def fast_overrides(tmp_path: Path, data_root: Path, *extra: str) -> list[str]:
    """A 2-step run of a tiny random model: seconds."""
    return ["model=tiny_bert", f"data.root={data_root}", f"trainer.output_dir={tmp_path}", "trainer.max_steps=2",
            "trainer.batch_size=8", "trainer.eval_every=1", "trainer.progress_bar=false",
            "logger.wandb.mode=disabled", f"data.cache_dir={tmp_path.parent / 'tok_cache'}", *extra]


class Crash(Exception):
    """Raised by `crash_at` to interrupt a run in-process (the kill tests use real SIGKILLs)."""


def crash_at(monkeypatch, step: int):
    """Make the next run raise Crash right after writing its evaluation at `step`; returns the real writer."""
    import sparse_peft.runio as runio

    real = runio.RunLogger.curve

    def curve(self, record):
        real(self, record)
        if record["step"] == step:
            raise Crash

    monkeypatch.setattr(runio.RunLogger, "curve", curve)
    return real
