"""`python -m sparse_peft.report <dir> [--split eval|test] [--retained] [--out table.md]`: every run's metrics.json
below <dir> -> a markdown table of the selection metric (mean ± std over seeds, n) per method and task, on the
validation split (`eval`) or the held-out test split (`test`, split protocol `sora`), and parameter counts;
`--retained` adds a table of retained parameters (mean ± std) per method and task.
Incomplete runs (a dir with config.yaml but no completed metrics.json) are listed, never averaged in."""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def collect(root: Path) -> tuple[list[dict], list[Path]]:
    done, incomplete = [], []
    for cfg in sorted(root.rglob("config.yaml")):
        run_dir = cfg.parent
        try:
            m = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            m = {}
        if m.get("status") == "completed":
            done.append({**m, "dir": str(run_dir)})
        elif not (run_dir.name == ".hydra"):
            incomplete.append(run_dir)
    return done, incomplete


def fmt(values: list[float], scale: float = 100, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    if scale == 1:
        return f"{mean:,.0f} ± {std:,.0f} (n={len(values)})" if len(values) > 1 else f"{mean:,.0f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={len(values)})" if len(values) > 1 else f"{mean:.{digits}f}"


def retained_table(runs: list[dict]) -> str:
    tasks, methods = sorted({r["task"] for r in runs}), sorted({r["method"] for r in runs})
    lines = ["| method | " + " | ".join(f"{t} retained params" for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for m in methods:
        values = [[r["retained_params"] for r in runs if (r["method"], r["task"]) == (m, t)] for t in tasks]
        cells = [fmt(v, scale=1) if v else "–" for v in values]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(runs: list[dict], split: str = "eval") -> str:
    tasks = sorted({r["task"] for r in runs})
    by = defaultdict(list)
    for r in runs:
        by[(r["method"], r["task"])].append(r)
    methods = sorted({r["method"] for r in runs})
    head = "| method | " + " | ".join(f"{t} ({by_metric(runs, t)})" for t in tasks) + " | avg | trainable params | retained params |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    for m in methods:
        cells, means = [], []
        for t in tasks:
            rs = by.get((m, t), [])
            vals = [r[split][r["selection_metric"]] for r in rs if r.get(split)]
            cells.append(fmt(vals) if vals else "–")
            means += [statistics.fmean(vals)] if vals else []
        avg = f"{statistics.fmean(means) * 100:.2f}" if len(means) == len(tasks) else "–"
        counts = sorted({(r["trainable_params"], r["retained_params"]) for t in tasks for r in by.get((m, t), [])})
        lo, hi = counts[0], counts[-1]
        rng = lambda i: f"{lo[i]:,}" if lo[i] == hi[i] else f"{lo[i]:,}–{hi[i]:,}"  # noqa: E731 (head size varies)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} | {rng(0)} | {rng(1)} |")
    return "\n".join(lines) + "\n"


def by_metric(runs: list[dict], task: str) -> str:
    return next(r["selection_metric"] for r in runs if r["task"] == task)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("root", type=Path)
    p.add_argument("--split", choices=("eval", "test"), default="eval",
                   help="eval: validation metrics; test: the held-out test split (split protocol sora)")
    p.add_argument("--retained", action="store_true", help="add a table of retained parameters (mean ± std)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here (default: stdout)")
    a = p.parse_args(argv)
    runs, incomplete = collect(a.root)
    if not runs:
        raise SystemExit(f"error: no completed run (metrics.json with status completed) below {a.root}")
    text = table(runs, a.split) + ("\n" + retained_table(runs) if a.retained else "")
    if incomplete:
        text += "\nIncomplete or failed runs (not averaged): " + ", ".join(str(d) for d in incomplete) + "\n"
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
