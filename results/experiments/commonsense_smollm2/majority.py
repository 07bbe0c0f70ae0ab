"""The majority-label row of the commonsense table: the share of the most frequent answer among the 60 seeded test
items per task that every run scored (the same `_subset` the task uses with data.max_eval_samples=60).
  SPARSE_PEFT_DATA=../shared/data python results/experiments/commonsense_smollm2/majority.py > majority.json"""
import collections
import json
import os
from pathlib import Path

from sparse_peft.tasks.commonsense import TASKS, _subset

root = Path(os.environ.get("SPARSE_PEFT_DATA", "../shared/data")) / "commonsense"
out = {}
for name, spec in TASKS.items():
    path = root / spec.dir / "test.json"
    if path.is_file():
        counts = collections.Counter(r["answer"] for r in _subset(json.loads(path.read_text()), 60))
        label, n = counts.most_common(1)[0]
        out[name] = {"label": label, "share": n / sum(counts.values())}
print(json.dumps({"tasks": out, "mean": sum(v["share"] for v in out.values()) / len(out)}, indent=2))
