"""Data-parallel training: 2 CPU processes (gloo) launched by torchrun through the normal entrypoint."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from sparse_peft import UserError
from sparse_peft.distributed import World, shard

NO_DROPOUT = ["model.config.hidden_dropout_prob=0", "model.config.attention_probs_dropout_prob=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, tiny_glue, name, nproc):
    args = ["-m", "sparse_peft.train", "model=tiny_bert", f"data.root={tiny_glue}", "task=glue/mrpc", "method=sora",
            "trainer.max_steps=6", "trainer.batch_size=8", "trainer.eval_every=3", "trainer.progress_bar=false",
            "trainer.num_threads=1", "trainer.device=cpu", "logger.wandb.mode=disabled",
            f"trainer.output_dir={tmp_path / name}",
            f"hydra.run.dir={tmp_path / name / 'hydra'}", "method.sparse_lambda_2=0.02", "trainer.lr=0.02",
            *[f"+{o}" for o in NO_DROPOUT]]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}"] if nproc > 1 else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def test_two_processes_agree_and_only_rank0_writes(tmp_path, tiny_glue):
    log = run(tmp_path, tiny_glue, "ddp", 2)
    sums = dict(re.findall(r"rank (\d) of 2: trainable checksum (\w+)", log))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"], log[-3000:]
    out = tmp_path / "ddp"
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 6
    assert [json.loads(x)["step"] for x in (out / "curve.jsonl").read_text().splitlines()] == [3, 6]  # one writer

    # Without dropout, 2 ranks x 4 examples with averaged gradients = 1 process x 8 examples.
    run(tmp_path, tiny_glue, "single", 1)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "single" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_shard_splits_every_global_batch_and_tops_up_a_short_last_one():
    order = list(range(11))  # batches of 4: [0 1 2 3] [4 5 6 7] [8 9 10]; then 3 ranks -> 2 ranks
    assert shard(order, 4, World()) == order
    r0, r1 = shard(order, 4, World(0, 2)), shard(order, 4, World(1, 2))
    assert r0 == [0, 2, 4, 6, 8, 10] and r1 == [1, 3, 5, 7, 9]
    assert shard(list(range(5)), 4, World(1, 2)) == [1, 3, 0]  # last batch [4] + [0] topped up: one each
    with pytest.raises(UserError, match="divisible"):
        shard(order, 5, World(0, 2))


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    from sparse_peft.distributed import init_world

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="at most one process per GPU"):
        init_world("auto")
