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


def stage_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "curve.jsonl").read_text().splitlines() if (run_dir / "curve.jsonl").exists() else []
    return [r for r in map(json.loads, filter(str.strip, lines)) if r.get("type") == "stage"]


def stages_report(run_dir: Path, out_dir: Path) -> str:
    """A sparsifying-scheduler run: one row per stage (its best checkpoint) -> stages.md and stages.png, the
    validation and training-subset metric against retained parameters (SoRA's Figure 3 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = stage_records(run_dir)
    if not stages:
        raise SystemExit(f"error: {run_dir}/curve.jsonl has no stage records; run with scheduler=linear|log_linear|exp_linear")
    metric = json.loads((run_dir / "metrics.json").read_text())["selection_metric"]
    lines = [f"| stage | xi | retained params | validation {metric} | train-subset {metric} | generalization | "
             "memorization | best step |", "|---|---|---|---|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s['stage']} | {s['lambda']:.3g} | {s['retained_params']:,} | {s['eval'][metric] * 100:.2f} | "
                     f"{s['train'][metric] * 100:.2f} | {s['generalization']:.1f} | {s['memorization']:.1f} | "
                     f"{s['best_step']} |")
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stages.md").write_text(text)
    fig, ax = plt.subplots(figsize=(6, 4))
    kept = [s["retained_params"] for s in stages]
    ax.plot(kept, [s["eval"][metric] * 100 for s in stages], "o-", label=f"validation {metric}")
    ax.plot(kept, [s["train"][metric] * 100 for s in stages], "s--", label=f"training subset {metric}")
    for s in stages:
        ax.annotate(f"xi={s['lambda']:.2g}", (s["retained_params"], s["eval"][metric] * 100), fontsize=7,
                    textcoords="offset points", xytext=(3, 5))
    ax.set_xlabel("retained parameters")
    ax.set_ylabel(f"{metric} x 100")
    ax.invert_xaxis()  # sparser to the right, as the schedule proceeds
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{run_dir.name}: sparsifying scheduler stages")
    fig.tight_layout()
    fig.savefig(out_dir / "stages.png", dpi=120)
    plt.close(fig)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("root", type=Path)
    p.add_argument("--split", choices=("eval", "test"), default="eval",
                   help="eval: validation metrics; test: the held-out test split (split protocol sora)")
    p.add_argument("--retained", action="store_true", help="add a table of retained parameters (mean ± std)")
    p.add_argument("--stages", type=Path, default=None, metavar="DIR",
                   help="root is one scheduler run: write its per-stage table and plot (stages.md, stages.png) to DIR")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here (default: stdout)")
    a = p.parse_args(argv)
    if a.stages:
        print(stages_report(a.root, a.stages), end="")
        return
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
